"""What a checkpoint costs: size and time to write (atomically, with fsync) and to load, for
yolov5n and yolov5s, and the share of training time that a --save-interval costs.

    python benchmarks/bench_checkpoint.py [--repeats 5] [--cfg yolov5n.yaml yolov5s.yaml]
        [--dir /path/on/the/training/disk]
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
from utils.train.ema import ModelEMA  # noqa: E402
from utils.train.optim import build_optimizer  # noqa: E402
from utils.train.run import state_of  # noqa: E402


def checkpoint_for(cfg: str) -> dict:
    """A checkpoint as train.py writes it mid-run: model, EMA, SGD with momentum buffers, nc=80."""
    model = build_model(cfg, nc=80)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    model(torch.rand(1, 3, 64, 64))[0].sum().backward()
    optimizer.step()
    ema = ModelEMA(model)
    return training_checkpoint(
        state_of(model, ema, optimizer),
        finished=False,
        model_yaml=model.yaml,
        names=[str(i) for i in range(80)],
        hyp=load_hyp("scratch-low.yaml"),
        opt={},
        world_size=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml"], help="model YAMLs, nc=80")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.repeats} repeats, median times\n")
    print("| model   | parameters | last.pt (MB) | write + fsync (ms) | load (ms) | cost at 10 min | at 1 min |")
    print("|---------|-----------:|-------------:|-------------------:|----------:|---------------:|---------:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name in args.cfg:
            checkpoint = checkpoint_for(name)
            path = Path(folder) / "last.pt"
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
                f"{statistics.median(loads) * 1e3:9.0f} | {write_s / 600:14.4%} | {write_s / 60:8.3%} |"
            )


if __name__ == "__main__":
    main()
