"""Average the weights of compatible checkpoints into one checkpoint that val.py and detect.py read,
or reconstruct a post-hoc EMA of any width from a run's snapshots.

    python average.py --weights runs/train/exp/weights/epoch27.pt epoch28.pt epoch29.pt --out avg.pt
    python average.py --weights a.pt b.pt --coef 0.7 0.3 --source model \
        --data data/shapes.yaml --recalibrate-bn --out avg.pt
    python average.py --posthoc runs/train/exp --sigma-rel 0.08 --out ema_0.08.pt
    python average.py --posthoc runs/train/exp --sweep --out best_ema.pt

Post-hoc EMA (a run trained with --posthoc-ema N; utils/train/posthoc.py): the power-function EMA of
relative width --sigma-rel at the end of training (or of --at-epoch E) as the least-squares
combination of the run's snapshots. --sweep reconstructs a grid of widths (or those of
--sigma-rel), validates each on the run's val split as train.py did, prints the table, plots mAP
against width next to --out and writes the best (by fitness, as best.pt) to --out. --bn average
(the default) keeps the BatchNorm statistics combined like the weights; --bn recalibrate
recomputes them on augmented training batches (on the shapes dataset, 30 epochs, seed 0, the
combined statistics scored 0.003-0.005 mAP@0.5:0.95 higher for every average measured:
benchmarks/averaging_study.py).

Averages the EMA weights (--source ema, default) or the raw model weights (--source model),
with coefficients that default to uniform and must sum to 1. Checkpoints whose tensors differ
in name, shape or dtype are refused, naming the first difference (--no-strict keeps such tensors
from the first file and lists them). BatchNorm statistics of an average are averages of
statistics, not statistics of the averaged network: --recalibrate-bn recomputes them over
--bn-images images (0: one epoch) of --data's training batches, augmented as in training (the
statistics the weights were trained under; see utils/train/averaging.py's
recalibrate_on_training_batches).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from utils.checkpoint.format import (
    averaged_checkpoint,
    batch_per_process,
    image_size,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    training_option,
)
from utils.data.config import DatasetConfig, load_dataset_config
from utils.device import select_device
from utils.errors import UserError, run_cli
from utils.eval.plots import plot_posthoc_sweep
from utils.image_size import check_image_size
from utils.log import LOGGER, setup_logging
from utils.option_checks import check_range, warn_no_effect
from utils.output_paths import check_output_file
from utils.train.as_trained import val_loader_as_trained
from utils.train.averaging import (
    RECALIBRATION_IMAGES,
    TrainingBatches,
    average_state_dicts,
    first_non_finite,
    resolve_coefficients,
)
from utils.train.ema import power_exponent
from utils.train.posthoc import SNAPSHOT_FOLDER
from utils.train.posthoc_sweep import (
    BN_MODES,
    SWEEP_WIDTHS,
    PosthocRun,
    posthoc_run_dir,
    prepared_model,
    reconstructed_checkpoint,
    sweep,
    sweep_table,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Average the weights of compatible checkpoints.")
    p.add_argument("--weights", nargs="+", default=None, help="two or more checkpoints written by train.py")
    p.add_argument("--posthoc", default=None, metavar="RUN_DIR", help="a run folder with --posthoc-ema snapshots")
    p.add_argument(
        "--sigma-rel", nargs="+", type=float, default=None, help="--posthoc: relative width(s) of the EMA to make"
    )
    p.add_argument(
        "--sweep", action="store_true", help=f"--posthoc: validate widths ({' '.join(map(str, SWEEP_WIDTHS))})"
    )
    p.add_argument("--at-epoch", type=int, default=None, help="--posthoc: the EMA at the end of this epoch")
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default=None,
        help="--posthoc: BatchNorm statistics combined as the weights (default) or recomputed on training batches",
    )
    p.add_argument("--coef", nargs="+", type=float, default=None, help="one coefficient per checkpoint, summing to 1")
    p.add_argument("--source", choices=("ema", "model"), default="ema", help="average the EMA or the raw weights")
    p.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    p.add_argument(
        "--names-from",
        default=None,
        metavar="FILE",
        help="--weights whose class names differ (spelling, say) but mean the same classes in the same order: "
        "ship FILE's names (one of --weights); without it, checkpoints must name the same classes in the same order",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse checkpoints whose tensors differ (--no-strict keeps such tensors from the first)",
    )
    p.add_argument(
        "--recalibrate-bn", action="store_true", help="recompute BatchNorm statistics on --data's train split"
    )
    p.add_argument("--data", default=None, help="dataset YAML for --recalibrate-bn and --posthoc (default: the run's)")
    p.add_argument("--imgsz", type=int, default=None, help="image size for --recalibrate-bn (default: the run's)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size for --recalibrate-bn (default: the run's batch per process)",
    )
    p.add_argument("--workers", type=int, default=None, help="dataloader workers for --recalibrate-bn (default 2)")
    p.add_argument(
        "--bn-images",
        type=int,
        default=None,
        metavar="N",
        help=f"--recalibrate-bn, --bn recalibrate: training images to recompute on (default {RECALIBRATION_IMAGES}, "
        "the first batches of the epoch's seeded order; 0: all of the train split)",
    )
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    return p.parse_args(argv)


def shipped_names(checkpoints: list[dict], paths: list[str], names_from: str | None, kept: list[str]) -> list[str]:
    """The class names of the average: those every checkpoint gives (same names, same order), or with
    `names_from` (one of `paths`) that file's; a difference without it is a UserError naming the first.
    Another class count is left to the tensor check: with --no-strict the first file's head, and
    names, are `kept`."""
    names = [list(c.get("names") or []) for c in checkpoints]
    if names_from is not None:
        chosen = next((i for i, path in enumerate(paths) if Path(path).resolve() == Path(names_from).resolve()), None)
        if chosen is None:
            raise UserError(f"--names-from {names_from} is not one of --weights: give the file whose names to ship")
        if any(len(n) != len(names[chosen]) for n in names):
            counts = ", ".join(f"{path}: {len(n)}" for path, n in zip(paths, names))
            raise UserError(f"--names-from: the checkpoints detect different numbers of classes ({counts})")
        if any(n != names[chosen] for n in names):
            LOGGER.warning(f"WARNING: the checkpoints name their classes differently; the average ships {names_from}'s")
        return names[chosen]
    for path, other in zip(paths[1:], names[1:]):
        if other == names[0] or (kept and len(other) != len(names[0])):
            continue
        if len(other) != len(names[0]):
            difference = f"{len(names[0])} classes against {len(other)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(names[0], other)) if a != b)
            difference = f"class {i} is '{names[0][i]}' in {paths[0]} but '{other[i]}' in {path}"
            if sorted(other) == sorted(names[0]):
                difference += " (the same names in another order)"
        raise UserError(
            f"{paths[0]} and {path} do not describe the same classes: {difference}; their weights mean different "
            "things. Average checkpoints trained on the same classes, or, if these are the same classes spelled "
            "differently, give --names-from FILE to ship FILE's names"
        )
    return names[0]


def average_checkpoints(
    checkpoints: list[dict],
    paths: list[str],
    coefficients: list[float],
    source: str,
    strict: bool,
    names_from: str | None = None,
) -> tuple[dict, list[str]]:
    """An average-kind checkpoint of the first file's model and metadata (the class names of
    shipped_names) holding the averaged weights, and the tensors kept from the first file because
    they differ (with --no-strict)."""
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
    names = shipped_names(checkpoints, paths, names_from, kept)
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
    result["names"] = names
    return result, kept


def check_mode_options(opt: argparse.Namespace) -> None:
    """Refuse options of the other mode (--weights averages checkpoints, --posthoc a run's snapshots)
    and values out of range; warn about options that act on nothing."""
    if opt.bn_images is not None and opt.bn_images < 0:
        raise UserError(f"--bn-images {opt.bn_images}: a number of images, or 0 for all of the train split")
    check_range("--at-epoch", opt.at_epoch, 0, meaning="an epoch of the run, counted from 0")
    check_range("--imgsz", opt.imgsz, 1, meaning="pixels")
    for width in opt.sigma_rel or ():
        try:
            power_exponent(width)
        except UserError as error:
            raise UserError(f"--sigma-rel {width:g}: {error}") from None
    if opt.posthoc is not None and opt.bn != "recalibrate":
        warn_no_effect(
            {
                "--imgsz": opt.imgsz is not None,
                "--batch-size": opt.batch_size is not None,
                "--bn-images": opt.bn_images is not None,
            },
            "they size the training batches of --bn recalibrate",
        )
    if opt.posthoc is not None and opt.weights:
        raise UserError("give --weights (checkpoints to average) or --posthoc (a run's snapshots), not both")
    if opt.posthoc is not None:
        given = {
            "--coef": opt.coef is not None,
            "--source": opt.source != "ema",
            "--recalibrate-bn": opt.recalibrate_bn,
            "--names-from": opt.names_from is not None,
        }
        given["--no-strict"] = not opt.strict
        other = "--weights"
    else:
        given = {"--sigma-rel": opt.sigma_rel is not None, "--sweep": opt.sweep, "--at-epoch": opt.at_epoch is not None}
        given["--bn"] = opt.bn is not None
        other = "--posthoc"
    wrong = [name for name, was_given in given.items() if was_given]
    if wrong:
        raise UserError(f"{' '.join(wrong)} only act(s) with {other}")


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    setup_logging()
    check_mode_options(opt)
    check_out(opt)
    if opt.posthoc is not None:
        return posthoc(opt)
    if not opt.weights or len(opt.weights) < 2:
        raise UserError("--weights needs at least two checkpoints to average")
    if opt.recalibrate_bn and not opt.data:
        raise UserError("--recalibrate-bn needs --data: the dataset whose training images give the statistics")
    if (opt.batch_size is not None and opt.batch_size < 1) or (opt.workers is not None and opt.workers < 0):
        raise UserError("--batch-size must be at least 1, --workers not negative")
    unused = [
        name for name in ("data", "imgsz", "batch_size", "workers", "bn_images") if getattr(opt, name) is not None
    ]
    if unused and not opt.recalibrate_bn:
        options = ", ".join("--" + name.replace("_", "-") for name in unused)
        LOGGER.warning(
            f"WARNING: --recalibrate-bn was not given, so {options} went unused: BatchNorm statistics stay averaged"
        )
    out = Path(opt.out)
    coefficients = resolve_coefficients(opt.coef, len(opt.weights))
    checkpoints = [load_checkpoint(path, mmap=True) for path in opt.weights]  # only --source's tensors are read
    result, kept = average_checkpoints(checkpoints, opt.weights, coefficients, opt.source, opt.strict, opt.names_from)
    if kept:
        LOGGER.warning(
            f"WARNING: {len(kept)} tensor(s) differ between the checkpoints and were kept from "
            f"{opt.weights[0]}: {', '.join(kept)}"
        )
    if opt.recalibrate_bn:
        device = select_device(opt.device)
        last_epoch = max(int(c.get("epoch", 0)) for c in checkpoints)  # the newest weights' augmentation
        batches = training_batches(opt, result, load_dataset_config(opt.data), last_epoch, device)
        prepared_model(result, "recalibrate", batches, device)
    write_output(out, result)
    LOGGER.info(f"{result['source']}\nSaved {opt.out}")
    return 0


def check_out(opt: argparse.Namespace) -> None:
    """Before any work: --out can be written, and is not a checkpoint this command reads."""
    out = Path(opt.out)
    if opt.posthoc is None:
        if any(out.resolve() == Path(path).resolve() for path in opt.weights or ()):
            raise UserError(f"--out {opt.out} is one of the --weights: write the average to a new file")
        check_output_file(out, f"--out {opt.out}")
        return
    weights = posthoc_run_dir(opt.posthoc) / "weights"
    check_output_file(out, f"--out {opt.out}", files=[weights / "last.pt"], trees=[weights / SNAPSHOT_FOLDER])


def write_output(out: Path, checkpoint: dict) -> None:
    """Write --out atomically; a path that cannot be written is a UserError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, checkpoint)
    except OSError as error:
        reason = (
            f"{out.parent} is not a folder"
            if out.parent.exists() and not out.parent.is_dir()
            else error.strerror or error
        )
        raise UserError(f"could not write --out {out}: {reason}") from None


def posthoc(opt: argparse.Namespace) -> int:
    """--posthoc: reconstruct the EMA of --sigma-rel (or, with --sweep, of each width, validated) from
    a run's snapshots and write it (the best) to --out."""
    widths = opt.sigma_rel or (list(SWEEP_WIDTHS) if opt.sweep else None)
    if not widths:
        raise UserError("--posthoc needs --sigma-rel S (the width to make) or --sweep (choose on the val split)")
    if len(widths) > 1 and not opt.sweep:
        raise UserError("several --sigma-rel widths: add --sweep to validate them and keep the best")
    for width in widths:
        power_exponent(width)  # refuses a width no power EMA has, before any work
    run = PosthocRun.open(opt.posthoc, opt.at_epoch)
    data = load_dataset_config(opt.data or training_option(run.last, "data"))
    device = select_device(opt.device)
    bn = opt.bn or "average"
    batches = training_batches(opt, run.last, data, run.epoch, device) if bn == "recalibrate" else None
    out = Path(opt.out)
    if not opt.sweep:
        best = reconstructed_checkpoint(run, widths[0])
        prepared_model(best, bn, batches, device)
    else:
        model = model_from_checkpoint(run.last, "ema", source=str(run.run_dir))
        loader = val_loader_as_trained(run.last, model, data, workers=loader_workers(opt))
        rows, best = sweep(run, widths, bn=bn, batches=batches, loader=loader, device=device)
        LOGGER.info(sweep_table(rows, best["posthoc"]["sigma_rel"]))
        plot_path = out.with_name(f"{out.stem}_sweep.png")
        maps = [row.metrics.map50_95 for row in rows]
        plot_posthoc_sweep([row.sigma_rel for row in rows], maps, best["posthoc"]["sigma_rel"], plot_path)
        LOGGER.info(f"Plot: {plot_path}")
    write_output(out, best)
    LOGGER.info(f"{best['source']}\nSaved {opt.out}")
    return 0


def loader_workers(opt: argparse.Namespace) -> int:
    """--workers, 2 when not given."""
    return 2 if opt.workers is None else opt.workers


def training_batches(
    opt: argparse.Namespace, checkpoint: dict, data: DatasetConfig, epoch: int, device: torch.device
) -> TrainingBatches:
    """The training batches BatchNorm statistics are recomputed on: the run's (--imgsz, --batch-size
    override its image size and batch per process), augmented as `epoch` was."""
    model = model_from_checkpoint(checkpoint, "ema", source=opt.out)
    batch_size = opt.batch_size or batch_per_process(checkpoint)
    img_size = check_image_size(opt.imgsz or image_size(checkpoint), model, batch_size=batch_size, device=device)
    return TrainingBatches(
        checkpoint,
        data,
        model.nc,
        epoch,
        img_size=img_size,
        batch_size=batch_size,
        workers=loader_workers(opt),
        max_images=RECALIBRATION_IMAGES if opt.bn_images is None else opt.bn_images,
    )


if __name__ == "__main__":
    run_cli(main, "average.py")
