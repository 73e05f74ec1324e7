"""BatchNorm recalibration of averaged weights on part of the train split against all of it.

    python benchmarks/bench_bn_recalibration.py --weights RUN/weights/swa.pt [--images 128 256 0] [--seeds 0 1 2]

The checkpoint's averaged weights (its 'ema': SWA's, SWAP's or average.py's) get their BatchNorm
statistics recomputed, as train.py recomputes SWA's and SWAP's, on the first batches of the last
epoch's seeded order holding N augmented training images (0: the whole split; train.py and
average.py --bn-images), then are validated as the run validated. Each --seeds value draws
another order, so another N images: the spread a cap adds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.checkpoint.format import load_checkpoint, model_from_checkpoint, training_option  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.train.as_trained import evaluate_as_trained, val_loader_as_trained  # noqa: E402
from utils.train.averaging import TrainingBatches, recalibrate_on_training_batches  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a checkpoint of averaged weights (swa.pt, swap.pt, average.py's)")
    p.add_argument("--data", default=None, help="dataset YAML (default: the run's)")
    p.add_argument("--images", nargs="+", type=int, default=[128, 256, 0], help="images to recompute on (0: all)")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="orders to draw the images from (default: the run's seed, +1, +2)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    opt = p.parse_args()

    device = select_device(opt.device)
    checkpoint = load_checkpoint(opt.weights)
    data = load_dataset_config(opt.data or training_option(checkpoint, "data"))
    model = model_from_checkpoint(checkpoint, "ema", source=opt.weights)
    batches = TrainingBatches(checkpoint, data, model.nc, int(checkpoint["epoch"]), workers=opt.workers)
    seeds = opt.seeds or [batches.seed + k for k in range(3)]  # the first is the one train.py uses
    loader = val_loader_as_trained(checkpoint, model, data, workers=opt.workers)
    print(
        f"{opt.weights}: BatchNorm statistics recomputed on the augmented batches of epoch {batches.epoch} "
        f"({len(batches.dataset)} train images, batch {batches.batch_size}), validated on "
        f"{len(loader.dataset)} images\n"
    )
    print("| images | order seed | images seen | recalibration s | P | R | mAP@0.5 | mAP@0.5:0.95 |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for images in opt.images:
        for seed in seeds if images else seeds[:1]:  # all of the split: the order changes only rounding
            model = model_from_checkpoint(checkpoint, "ema", source=opt.weights)
            model = model.to(device, memory_format=torch.channels_last)
            started = time.perf_counter()
            seen = recalibrate_on_training_batches(
                model,
                batches.dataset,
                epoch=batches.epoch,
                batch_size=batches.batch_size,
                workers=batches.workers,
                seed=seed,
                device=device,
                amp_dtype=batches.precision(model, device).dtype,
                max_images=images,
            )
            seconds = time.perf_counter() - started
            m = evaluate_as_trained(model, checkpoint, loader, device).metrics
            print(
                f"| {images or 'all'} | {seed} | {seen} | {seconds:.1f} | {m.precision:.4f} | {m.recall:.4f} | "
                f"{m.map50:.4f} | {m.map50_95:.4f} |"
            )


if __name__ == "__main__":
    main()
