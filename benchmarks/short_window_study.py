"""The epoch's last, short accumulation window: how far its optimizer step moves the weights, and
how much of that is weight decay, against a full window's, with three ways of treating it.

    python benchmarks/short_window_study.py [--batch-size 24] [--epochs 2] [--imgsz 320] [--threads 2]

Smallest run (the CI smoke test): 72 training images, --batch-size 16 --epochs 1 --imgsz 64
--threads 1 (each epoch a full window of 64 images and a short one of 8).

train.py cuts accumulation windows at the end of each epoch (no gradient crosses an epoch
boundary, so every epoch-end checkpoint is at a step boundary). When the epoch's micro-batches
do not divide by the accumulation, its last window holds fewer images than the nominal 64 while
weight decay is scaled for a full window. Variants, run on the same batches from the same weights:

- as is: the window's summed gradient (the loss is a sum over images), full weight decay;
- gradient rescaled: the short window's gradient scaled up to a full window's images (timm's
  treatment of its mean-per-window loss);
- decay scaled: the gradient as is, weight decay scaled to the window's share of a full window's
  images (decay per image constant, as weight_decay x batch x accumulate / 64 intends).

For each optimizer (SGD as in YOLOv5's recipe, AdamW as --optimizer auto picks for short runs)
it prints the median update norm of full and short windows, their ratio (the short window's
images over a full window's is the ratio a per-image treatment gives), and the share of the
update that is weight decay (lr x wd x |w| over |update|, medians).

Measured (2-core AMD EPYC, AVX2, fp32; batch 24: full windows of 72 images, short ones of 8),
from scratch and from the default run's 5-epoch last.pt:

| optimizer | variant | short / full, scratch | short / full, trained | decay share of an update |
|---|---|--:|--:|--:|
| SGD | as is | 0.81 | 0.64 | 0.1-0.2% |
| SGD | gradient rescaled | 1.08 | 1.11 | 0.1% |
| AdamW | as is | 0.79 | 0.82 | 0.0% |
| AdamW | gradient rescaled | 0.82 | 0.85 | 0.0% |

So train.py keeps the short window as is. Weight decay is at most 0.2% of an update, so a
decay scaled for a full window changes nothing measurable; momentum already makes the short
step 64-82% of a full one; and rescaling 8 images' gradient to 72 images' weighs each of them
9 times as much as any other image, for a step larger than a full window's (1.11x with SGD).
With the loss summed over images, as YOLOv5 sums it, every image moves the weights alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import build_model  # noqa: E402
from utils.checkpoint.format import load_checkpoint  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.loader import build_train_dataset, build_train_loader  # noqa: E402
from utils.device import to_model_input  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.train.loss import DetectionLoss  # noqa: E402
from utils.train.optim import NOMINAL_BATCH_SIZE, accumulation_steps, build_optimizer  # noqa: E402
from utils.train.rng import seed_everything  # noqa: E402
from utils.train.step import optimizer_step  # noqa: E402

VARIANTS = ("as is", "gradient rescaled", "decay scaled")


def parameters_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def decayed_norm(optimizer: torch.optim.Optimizer) -> float:
    """lr x wd x |w| over the decayed group: the direct weight-decay term of one step."""
    group = optimizer.param_groups[1]
    weights = torch.cat([p.detach().flatten() for p in group["params"]])
    return group["lr"] * group["weight_decay"] * weights.norm().item()


def run(
    variant: str, optimizer_name: str, args: argparse.Namespace, batches: list, model0: torch.nn.Module, hyp: dict
) -> dict:
    """Step through `batches` (one list of micro-batches per window) from `model0`'s weights."""
    model = copy.deepcopy(model0).train()
    accumulate = accumulation_steps(args.batch_size)
    full_images = args.batch_size * accumulate
    weight_decay = hyp["weight_decay"] * full_images / NOMINAL_BATCH_SIZE
    lr = hyp["auto_lr0"] if optimizer_name == "AdamW" else hyp["lr0"]
    optimizer = build_optimizer(model, optimizer_name, lr, hyp["momentum"], weight_decay)
    criterion = DetectionLoss(model.detect_head, hyp, args.imgsz)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    updates: dict[str, list[float]] = {"full": [], "short": []}
    decay_share: dict[str, list[float]] = {"full": [], "short": []}
    for window in batches:
        images = sum(len(b.images) for b in window)
        for batch in window:
            loss, _ = criterion(model(to_model_input(batch.images, torch.device("cpu"))), batch.targets)
            loss.backward()
        share = images / full_images
        kind = "full" if share == 1 else "short"
        if variant == "gradient rescaled" and share < 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad /= share
        if variant == "decay scaled":
            optimizer.param_groups[1]["weight_decay"] = weight_decay * share
        decay = decayed_norm(optimizer)
        before = parameters_vector(model)
        assert optimizer_step(optimizer, scaler, model)
        update = (parameters_vector(model) - before).norm().item()
        optimizer.param_groups[1]["weight_decay"] = weight_decay
        updates[kind].append(update)
        decay_share[kind].append(decay / update)
    return {kind: (statistics.median(updates[kind]), statistics.median(decay_share[kind])) for kind in updates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--batch-size", type=int, default=24, help="512 images / 24: 22 micro-batches, the last of 8")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--weights", default="", help="start from this checkpoint's raw weights (default: scratch)")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads (the docstring's table: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(0)
    data = load_dataset_config(args.data)
    hyp = load_hyp("scratch-low.yaml")
    model0 = build_model("yolov5n.yaml", nc=data.nc)
    if args.weights:
        model0.load_state_dict(load_checkpoint(args.weights)["model"])
    dataset = build_train_dataset(
        data, hyp, img_size=args.imgsz, seed=0, single_cls=False, cache="auto", epochs=args.epochs
    )
    loader = build_train_loader(dataset, batch_size=args.batch_size, workers=2, seed=0, pin_memory=False)
    accumulate = accumulation_steps(args.batch_size)
    windows = []
    for epoch in range(args.epochs):  # the epoch's windows as train.py cuts them after warmup
        loader.sampler.set_epoch(epoch)
        micro = list(loader)
        windows += [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
    sizes = sorted({sum(len(b.images) for b in w) for w in windows})
    print(
        f"{len(dataset)} images, batch {args.batch_size} x {accumulate} accumulated = "
        f"{args.batch_size * accumulate} per full window; window sizes {sizes}; "
        f"{sum(sum(len(b.images) for b in w) < args.batch_size * accumulate for w in windows)} short of "
        f"{len(windows)} windows over {args.epochs} epochs (yolov5n, {args.imgsz} px, fp32, "
        f"{'from ' + args.weights if args.weights else 'from scratch'})\n"
    )
    print(
        "| optimizer | variant | update, full window | update, short window | short / full | "
        "decay share, full | decay share, short |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    for optimizer_name in ("SGD", "AdamW"):
        for variant in VARIANTS:
            stats = run(variant, optimizer_name, args, windows, model0, hyp)
            (full, full_decay), (short, short_decay) = stats["full"], stats["short"]
            print(
                f"| {optimizer_name} | {variant} | {full:.4g} | {short:.4g} | {short / full:.3f} | "
                f"{full_decay:.1%} | {short_decay:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
