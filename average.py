"""Average the weights of compatible checkpoints into one checkpoint that val.py and detect.py read.

    python average.py --weights runs/train/exp/weights/epoch27.pt epoch28.pt epoch29.pt --out avg.pt
    python average.py --weights a.pt b.pt --coef 0.7 0.3 --source model \
        --data data/shapes.yaml --recalibrate-bn --out avg.pt

Averages the EMA weights (--source ema, default) or the raw model weights (--source model),
with coefficients that default to uniform and must sum to 1. Checkpoints whose tensors differ
in name, shape or dtype are refused, naming the first difference (--no-strict keeps such tensors
from the first file and lists them). BatchNorm statistics of an average are averages of
statistics, not statistics of the averaged network: --recalibrate-bn recomputes them over one
epoch of --data's training batches, augmented as in training (the statistics the weights were
trained under; see utils/train/averaging.py's recalibrate_on_training_batches).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.yolo import DetectionModel
from utils.atomic_write import atomic_write
from utils.checkpoint.format import (
    averaged_checkpoint,
    batch_per_process,
    image_size,
    load_checkpoint,
    model_from_checkpoint,
    serialise,
    trained_with_amp,
    training_option,
)
from utils.data.config import load_dataset_config
from utils.data.loader import build_train_dataset
from utils.device import inference_amp_dtype, select_device
from utils.errors import UserError, run_cli
from utils.image_size import check_image_size
from utils.log import LOGGER, setup_logging
from utils.train.averaging import (
    average_state_dicts,
    first_non_finite,
    recalibrate_on_training_batches,
    resolve_coefficients,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Average the weights of compatible checkpoints.")
    p.add_argument("--weights", nargs="+", required=True, help="two or more checkpoints written by train.py")
    p.add_argument("--coef", nargs="+", type=float, default=None, help="one coefficient per checkpoint, summing to 1")
    p.add_argument("--source", choices=("ema", "model"), default="ema", help="average the EMA or the raw weights")
    p.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse checkpoints whose tensors differ (--no-strict keeps such tensors from the first)",
    )
    p.add_argument(
        "--recalibrate-bn", action="store_true", help="recompute BatchNorm statistics on --data's train split"
    )
    p.add_argument("--data", default=None, help="dataset YAML for --recalibrate-bn")
    p.add_argument("--imgsz", type=int, default=None, help="image size for --recalibrate-bn (default: the run's)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size for --recalibrate-bn (default: the run's batch per process)",
    )
    p.add_argument("--workers", type=int, default=None, help="dataloader workers for --recalibrate-bn (default 2)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    return p.parse_args(argv)


def average_checkpoints(
    checkpoints: list[dict], paths: list[str], coefficients: list[float], source: str, strict: bool
) -> tuple[dict, list[str]]:
    """An average-kind checkpoint of the first file's model and metadata holding the averaged
    weights, and the tensors kept from the first file because they differ (with --no-strict)."""
    states = []
    for path, checkpoint in zip(paths, checkpoints):
        if checkpoint.get(source) is None:
            raise UserError(f"{path} holds no '{source}' weights")
        not_finite = first_non_finite(checkpoint[source])
        if not_finite is not None:
            raise UserError(
                f"{path}: its '{source}' weights hold NaN or inf in '{not_finite}'; leave it out of the average"
            )
        states.append(checkpoint[source])
    averaged, kept = average_state_dicts(states, coefficients, strict=strict, labels=paths)
    recipe = ", ".join(f"{p} x {c:g}" for p, c in zip(paths, coefficients))
    description = f"average of {source} weights: {recipe}"
    if kept:
        description += f"; {len(kept)} tensor(s) that differ between them taken from {paths[0]} alone"
    result = averaged_checkpoint(
        checkpoints[0],
        averaged,
        description,
        averaged={"weights": list(paths), "coefficients": coefficients, "source": source, "kept_from_first": kept},
    )
    return result, kept


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    setup_logging()
    if len(opt.weights) < 2:
        raise UserError("--weights needs at least two checkpoints to average")
    if opt.recalibrate_bn and not opt.data:
        raise UserError("--recalibrate-bn needs --data: the dataset whose training images give the statistics")
    if (opt.batch_size is not None and opt.batch_size < 1) or (opt.workers is not None and opt.workers < 0):
        raise UserError("--batch-size must be at least 1, --workers not negative")
    unused = [name for name in ("data", "imgsz", "batch_size", "workers") if getattr(opt, name) is not None]
    if unused and not opt.recalibrate_bn:
        options = ", ".join("--" + name.replace("_", "-") for name in unused)
        LOGGER.warning(
            f"WARNING: --recalibrate-bn was not given, so {options} went unused: BatchNorm statistics stay averaged"
        )
    out = Path(opt.out)
    if any(out.resolve() == Path(path).resolve() for path in opt.weights):
        raise UserError(f"--out {opt.out} is one of the --weights: write the average to a new file")
    coefficients = resolve_coefficients(opt.coef, len(opt.weights))
    checkpoints = [load_checkpoint(path) for path in opt.weights]
    result, kept = average_checkpoints(checkpoints, opt.weights, coefficients, opt.source, opt.strict)
    if kept:
        LOGGER.warning(
            f"WARNING: {len(kept)} tensor(s) differ between the checkpoints and were kept from "
            f"{opt.weights[0]}: {', '.join(kept)}"
        )
    if opt.recalibrate_bn:
        device = select_device(opt.device)
        model = model_from_checkpoint(result, "ema", source=opt.out).to(device, memory_format=torch.channels_last)
        last_epoch = max(int(c.get("epoch", 0)) for c in checkpoints)  # the newest weights' augmentation
        images = recalibrate_on_train_split(model, result, last_epoch, opt, device)
        result["ema"] = result["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        result["source"] += f"; BatchNorm statistics recomputed on {images} augmented training images"
        not_finite = first_non_finite(result["ema"])
        if not_finite is not None:
            raise UserError(
                f"BatchNorm recalibration gave NaN or inf in '{not_finite}' (the average's activations "
                f"overflow on --data's images); {opt.out} was not written"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, serialise(result))
    except OSError as error:
        reason = (
            f"{out.parent} is not a folder"
            if out.parent.exists() and not out.parent.is_dir()
            else error.strerror or error
        )
        raise UserError(f"could not write --out {opt.out}: {reason}") from None
    LOGGER.info(f"{result['source']}\nSaved {opt.out}")
    return 0


def recalibrate_on_train_split(
    model: DetectionModel, checkpoint: dict, epoch: int, opt: argparse.Namespace, device: torch.device
) -> int:
    """BatchNorm statistics of `model` recomputed on the train split of --data, augmented as the run
    augmented `epoch`; returns the image count."""
    data = load_dataset_config(opt.data)
    single_cls = bool(training_option(checkpoint, "single_cls", False))
    nc = data.num_classes(single_cls)
    if nc != model.nc:
        raise UserError(
            f"the checkpoints detect {model.nc} classes but {data.source} has {nc}"
            + (" (the run trained with --single-cls)" if single_cls else "")
        )
    # BatchNorm saw each process's share of the batch in training (train.py splits it over torchrun ranks)
    batch_size = opt.batch_size or batch_per_process(checkpoint)
    img_size = check_image_size(
        opt.imgsz or image_size(checkpoint), model, batch_size=batch_size, device=device, training=False
    )
    seed = int(training_option(checkpoint, "seed", 0))
    dataset = build_train_dataset(
        data,
        checkpoint["hyp"],
        img_size=img_size,
        seed=seed,
        single_cls=single_cls,
        cache="off",
        epochs=int(training_option(checkpoint, "epochs", epoch + 1)),
    )
    amp_dtype = inference_amp_dtype(model, device, enabled=trained_with_amp(checkpoint))
    return recalibrate_on_training_batches(
        model,
        dataset,
        epoch=epoch,
        batch_size=batch_size,
        workers=2 if opt.workers is None else opt.workers,
        seed=seed,
        device=device,
        amp_dtype=amp_dtype,
    )


if __name__ == "__main__":
    run_cli(main, "average.py")
