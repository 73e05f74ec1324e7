"""What a checkpoint costs: size, time to write (atomically, with fsync) and to load, and the
memory the write takes beyond the run's own (peak RSS during the write minus RSS before it, read
from /proc: Linux), for yolov5n and yolov5s, and the share of training time a --save-interval costs.

    python benchmarks/bench_checkpoint.py [--repeats 5] [--cfg yolov5n.yaml yolov5s.yaml]
        [--dir /path/on/the/training/disk] [--all-averages]

--all-averages: the checkpoint of a run with every average on besides its EMA (--average
ema-steps ema-images, --posthoc-ema's two power EMAs, --swa-epochs), as issue 29 measures yolov5x
and yolo11x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import build_model  # noqa: E402
from utils.checkpoint.format import load_checkpoint, save_checkpoint, training_checkpoint  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.peak_memory import PeakMemory  # noqa: E402
from utils.train.ema import EMA_IMAGES, EMA_STEPS, ModelEMA, UniformAverage, build_average, posthoc_names  # noqa: E402
from utils.train.optim import build_optimizer  # noqa: E402
from utils.train.run import state_of  # noqa: E402


def checkpoint_for(cfg: str, all_averages: bool = False) -> dict:
    """A checkpoint as train.py writes it mid-run: model, EMA, SGD with momentum buffers, nc=80;
    with all_averages, every other average a run can keep too."""
    model = build_model(cfg, nc=80)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    model(torch.rand(1, 3, 64, 64))[0].sum().backward()
    optimizer.step()
    hyp = load_hyp("scratch-low.yaml")
    ema = ModelEMA(model)
    averages, swa = {}, None
    if all_averages:
        averages = {name: build_average(name, model, hyp) for name in (EMA_STEPS, EMA_IMAGES, *posthoc_names())}
        swa = UniformAverage(ema.module)
    return training_checkpoint(
        state_of(model, ema, optimizer, averages=averages, swa=swa),
        finished=False,
        model_yaml=model.yaml,
        names=[str(i) for i in range(80)],
        hyp=hyp,
        opt={},
        world_size=1,
    )


def write_memory(path: Path, checkpoint: dict) -> int:
    """Bytes the write adds at its peak: the resident set's peak during it minus the RSS before."""
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.in_use()
    save_checkpoint(path, checkpoint)
    return memory.peak() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml"], help="model YAMLs, nc=80")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--all-averages", action="store_true", help="every average on besides the EMA")
    args = parser.parse_args()
    averages = "EMA"
    if args.all_averages:
        averages = "EMA and every average (ema-steps, ema-images, 2 post-hoc power EMAs, SWA)"
    print(f"torch {torch.__version__}, {args.repeats} repeats, median times; model, {averages}, SGD\n")
    print(
        "| model   | parameters | last.pt (MB) | write + fsync (ms) | write memory (MB) | load (ms) "
        "| cost at 10 min | at 1 min |"
    )
    print(
        "|---------|-----------:|-------------:|-------------------:|------------------:|----------:"
        "|---------------:|---------:|"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name in args.cfg:
            checkpoint = checkpoint_for(name, args.all_averages)
            path = Path(folder) / "last.pt"
            memory = write_memory(path, checkpoint)
            writes, loads = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                save_checkpoint(path, checkpoint)
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                load_checkpoint(path)
                loads.append(time.perf_counter() - started)
            write_s = statistics.median(writes)
            params = sum(t.numel() for t in checkpoint["model"].values())
            print(
                f"| {name[:-5]:7s} | {params:10,d} | {path.stat().st_size / 1e6:12.1f} | {write_s * 1e3:18.0f} | "
                f"{memory / 1e6:17.0f} | {statistics.median(loads) * 1e3:9.0f} | {write_s / 600:14.4%} | "
                f"{write_s / 60:8.3%} |"
            )


if __name__ == "__main__":
    main()
