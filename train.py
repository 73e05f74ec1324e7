"""Train a YOLOv5-style detector with a ModelEMA updated after every optimizer step.

    python train.py                                   # yolov5n on the embedded shapes dataset
    python train.py --data coco.yaml --cfg yolov5s.yaml --imgsz 640 --epochs 300
    python train.py --resume [runs/train/exp/weights/last.pt]
    torchrun --nproc_per_node 2 train.py --batch-size 64 --sync-bn   # DDP; --batch-size is the global batch

Each epoch validates the EMA weights, appends a row to results.csv and writes
weights/last.pt (and best.pt) holding everything needed to resume exactly; at the end best.pt is
stripped to its EMA weights for inference (--keep-optimizer keeps it whole).
"""

from __future__ import annotations

import argparse

from utils.dist import close_process_group, world_from_env
from utils.errors import UserError, run_cli
from utils.log import LOGGER, setup_logging
from utils.peak_memory import is_out_of_memory
from utils.precision import add_amp_arguments
from utils.run_dir import add_run_dir_arguments
from utils.stop_signals import Preempted
from utils.train.autobatch import out_of_memory_message
from utils.train.averaging import RECALIBRATION_IMAGES
from utils.train.config import AUTOBATCH_FRACTION
from utils.train.ema import check_average_name, check_validated_name
from utils.train.lookahead import LookaheadAction
from utils.train.loop import train
from utils.train.optim import OPTIMIZERS
from utils.train.prepare import DEFAULT_CFG, prepare_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a YOLOv5-style detector with EMA weight averaging.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--weights", default="", help="initial weights: a checkpoint of this framework ('' = from scratch)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="with --weights: start from the checkpoint's raw model weights instead of its EMA",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --weights to be a pickled YOLOv5 or Ultralytics checkpoint (unpickling runs code: trust it)",
    )
    p.add_argument("--cfg", default="", help=f"model YAML (default: the --weights checkpoint's, else {DEFAULT_CFG})")
    p.add_argument("--data", default="data/shapes.yaml", help="dataset YAML (shapes.yaml is generated on first use)")
    p.add_argument(
        "--hyp",
        default=None,
        help="hyperparameter YAML (default: hyp/scratch-low.yaml for YOLOv5's anchor-based models, "
        "hyp/anchor-free.yaml for YOLOv5u/YOLOv8/YOLO11)",
    )
    p.add_argument("--epochs", type=int, default=30, help="total training epochs")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per micro-batch, over all ranks under torchrun (gradients accumulate to 64); -1: AutoBatch, "
        "the largest batch whose measured training step fills --autobatch-fraction of the free memory",
    )
    p.add_argument(
        "--autobatch-fraction",
        type=float,
        default=AUTOBATCH_FRACTION,
        help="with --batch-size -1: the share of the device's free memory (CPU: available memory) a step may fill",
    )
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=320, help="train and val image size (pixels)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="resume the newest run under --project, or the given last.pt (or run folder: its weights/last.pt)",
    )
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="keep the final best.pt whole (raw model, optimizer, averages) as last.pt is; by default the run's "
        "end strips it to what inference needs (its EMA weights), 1/3 of the size with SGD",
    )
    p.add_argument("--noval", action="store_true", help="only validate the final epoch")
    p.add_argument(
        "--noautoanchor",
        action="store_true",
        help="keep the model YAML's anchors: no check against the training labels, no fit (YOLOv5's AutoAnchor)",
    )
    p.add_argument(
        "--cache",
        nargs="?",
        const="ram",
        default="auto",
        choices=("auto", "ram", "off"),
        help="cache decoded train images in RAM; auto: when they take under 10%% of the available memory",
    )
    p.add_argument("--device", default=None, help="cuda device, i.e. 0, or cpu (default: CUDA if available)")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument(
        "--no-ema",
        action="store_true",
        help="no weight averaging: validate and save the raw weights (decay 0, for an honest comparison)",
    )
    p.add_argument(
        "--ema",
        choices=("steps", "images"),
        default="steps",
        help="the EMA's decay rule: YOLOv5's ramp over optimizer steps (hyp ema_decay, ema_tau) or a half-life "
        "in images (hyp ema_half_life, ema_ramp), the same at any batch size and process count",
    )
    p.add_argument(
        "--average",
        nargs="+",
        type=check_average_name,
        default=[],
        metavar="NAME",
        help="also track these averages, saved in every checkpoint and at the end as weights/NAME.pt: "
        "ema-steps, ema-images, power-S (power-function EMA of relative width S, e.g. power-0.07)",
    )
    p.add_argument(
        "--val",
        nargs="+",
        type=check_validated_name,
        default=[],
        metavar="NAME",
        help="also validate these each epoch (NAME/... columns in results.csv): raw, or an average as for --average",
    )
    p.add_argument("--val-raw", action="store_true", help="also validate the raw model each epoch (as --val raw)")
    p.add_argument(
        "--posthoc-ema",
        type=int,
        default=0,
        metavar="N",
        help="post-hoc EMA: track power EMAs of widths 0.05 and 0.10 and save N snapshots of them into "
        "weights/posthoc/; average.py --posthoc RUN_DIR then makes the EMA of any width",
    )
    p.add_argument(
        "--swa-epochs",
        type=int,
        default=0,
        help="SWA: average the weights at the end of each of the last K epochs into weights/swa.pt",
    )
    p.add_argument("--swa-source", choices=("ema", "raw"), default="ema", help="what SWA averages")
    p.add_argument(
        "--bn-images",
        type=int,
        default=RECALIBRATION_IMAGES,
        metavar="N",
        help="SWA and SWAP: recompute the average's BatchNorm statistics on N augmented training images of the "
        "last epoch (0: all of the train split)",
    )
    p.add_argument(
        "--swap-epoch",
        type=int,
        default=0,
        metavar="E",
        help="SWAP under torchrun: from epoch E each process trains alone on its own shuffle; at the end their "
        "weights are averaged, BatchNorm recomputed and saved as weights/swap.pt (0: off)",
    )
    p.add_argument(
        "--graft",
        action="store_true",
        help="filter grafting under torchrun: each process trains a network of its own (seed + rank) and after each "
        "epoch grafts the next process's into it, layer by layer by the entropy of their weights",
    )
    p.add_argument(
        "--graft-hyp",
        nargs="+",
        default=[],
        metavar="FILE",
        help="with --graft: a hyperparameter file per process, in rank order (default: --hyp for all)",
    )
    p.add_argument(
        "--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over all ranks' batches"
    )
    p.add_argument(
        "--optimizer",
        default="auto",
        choices=OPTIMIZERS,
        help="auto: AdamW (the hyp's auto_lr0 and auto_momentum) for runs under 10,000 optimizer steps, else SGD",
    )
    p.add_argument(
        "--lookahead",
        nargs="*",
        action=LookaheadAction,
        default=(),
        metavar="K ALPHA",
        help="Lookahead around the optimizer: every K steps the slow weights move ALPHA of the way to the "
        "fast ones, which restart from them (defaults 5 and 0.5 for values not given)",
    )
    p.add_argument(
        "--lookahead-ema",
        choices=("slow", "fast"),
        default="slow",
        help="with --lookahead: what the EMA (and --average's averages) fold in after each step; --val raw and "
        "--swa-source raw use the fast weights (the model's)",
    )
    p.add_argument("--workers", type=int, default=None, help="max dataloader workers (default: 8, capped by cores)")
    add_run_dir_arguments(p, "runs/train")
    p.add_argument("--cos-lr", action="store_true", help="cosine learning-rate schedule")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon, in [0, 1)")
    p.add_argument("--patience", type=int, default=100, help="early stopping: epochs without improvement (0: off)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: first N, or a list of indices")
    p.add_argument("--save-period", type=int, default=-1, help="also save epochN.pt every N epochs (< 1: off)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    add_amp_arguments(
        p,
        default="auto",
        auto="fp16 autocast + GradScaler on CUDA; on a CPU, bf16 autocast where a few timed training steps say "
        "it is faster than fp32 (the verdict cached per CPU, model, batch and size), else fp32",
    )
    p.add_argument(
        "--float64",
        action="store_true",
        help="train in double precision, without autocast (several times slower): for checking numerics, "
        "e.g. that torchrun's processes together compute what one process does",
    )
    p.add_argument("--no-plots", action="store_true", help="do not save plots")
    p.add_argument(
        "--save-interval",
        type=float,
        default=10.0,
        help="also write last.pt every N minutes inside an epoch, at a step boundary (0: off)",
    )
    p.add_argument(
        "--max-bad-steps",
        type=int,
        default=10,
        help="stop after this many optimizer steps in a row skipped for a non-finite loss or gradient",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms only: a resumed run then equals an uninterrupted one bit for bit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """train.py's command line: prepare the run, train it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world = world_from_env()
    setup_logging(world.rank)
    run = prepare_run(args, vars(parser.parse_args([])), world)
    if run is None:  # a resumed run that had already finished
        close_process_group()
        return 0
    out_of_memory = False
    try:
        train(run)
    except Preempted as stopped:  # SIGTERM or SIGUSR1: every rank stops at the same step, last.pt written
        LOGGER.info(f"\n{stopped}")
        if run.run_dir_lock is not None:
            run.run_dir_lock.release()
        close_process_group()
        return stopped.status
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        out_of_memory = True  # advised below, once the failed step's tensors are freed with the exception
    except KeyboardInterrupt:
        last = run.run_dir / "weights" / "last.pt"
        LOGGER.info(
            f"\nInterrupted. Continue with: python train.py --resume {last}"
            if last.exists()
            else "\nInterrupted before the first checkpoint was written."
        )
        return 130
    if out_of_memory:
        raise UserError(out_of_memory_message(run))
    close_process_group()  # not after an exception: torchrun then ends the other ranks' processes
    return 0


if __name__ == "__main__":
    run_cli(main, "train.py")
