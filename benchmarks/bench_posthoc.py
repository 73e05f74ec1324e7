"""What post-hoc EMA costs and how precise its snapshots must be.

    python benchmarks/bench_posthoc.py [--cfgs yolov5n.yaml yolov5s.yaml ...] [--run RUN_DIR]

Cost, per model: the floats one power EMA holds, the size of one snapshot (the two power EMAs of
--posthoc-ema, in the weights' fp32), of 20 snapshots, the time to write one (atomically, with
fsync, as train.py does at the end of an epoch) and the time the two extra EMA updates add to each
optimizer step. Precision, with --run (a run trained with --posthoc-ema and --average
power-0.07): the snapshots cast to fp16 and bf16 before the reconstruction of width 0.07, against
the power EMA tracked directly: relative weight error and mAP@0.5:0.95 on the run's val split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.state_dicts import relative_difference  # noqa: E402
from models.yolo import build_model  # noqa: E402
from utils.checkpoint.format import load_checkpoint, model_from_checkpoint, posthoc_snapshot, save_checkpoint  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.train.as_trained import evaluate_as_trained, val_loader_as_trained  # noqa: E402
from utils.train.ema import build_average, posthoc_names  # noqa: E402
from utils.train.posthoc import reconstruct  # noqa: E402
from utils.train.posthoc_sweep import PosthocRun, prepared_model, reconstructed_checkpoint  # noqa: E402


def median_ms(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of `action` in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cost(cfgs: list[str], repeats: int) -> None:
    """Snapshot size, write time and the two power EMAs' update time per model."""
    print(
        "| model | floats per EMA | one snapshot (2 EMAs, fp32) | 20 snapshots | write one | 2 EMA updates per step |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as folder:
        for cfg in cfgs:
            model = build_model(cfg, nc=80)
            averages = {name: build_average(name, model, {}) for name in posthoc_names()}
            floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
            path = Path(folder) / "snapshot.pt"
            snapshot = posthoc_snapshot(0, {n: a.state_dict() for n, a in averages.items()})
            write_ms = median_ms(lambda path=path, snapshot=snapshot: save_checkpoint(path, snapshot), repeats)
            size_mb = path.stat().st_size / 1e6

            def update(model=model, averages=averages):
                for average in averages.values():
                    average.update(model, 64)

            update()  # the first update copies; time the ones after
            update_ms = median_ms(update, repeats)
            print(
                f"| {Path(cfg).stem} | {floats / 1e6:.2f} M | {size_mb:.1f} MB | {20 * size_mb:.0f} MB | "
                f"{write_ms:.0f} ms | {update_ms:.1f} ms |"
            )


def precision(run_dir: Path) -> None:
    """Snapshots rounded to fp16 and bf16 before the width-0.07 reconstruction, against the
    power EMA tracked directly: relative weight error and mAP@0.5:0.95."""
    device = select_device("")
    run = PosthocRun.open(run_dir)
    tracked = load_checkpoint(run_dir / "weights" / "power-0.07.pt")
    probe = model_from_checkpoint(run.last, "ema")
    loader = val_loader_as_trained(run.last, probe, load_dataset_config(run.last["opt"]["data"]), workers=2)

    def validated(checkpoint: dict) -> float:
        model = prepared_model(checkpoint, "average", None, device)
        return evaluate_as_trained(model, checkpoint, loader, device).metrics.map50_95

    print(f"\n{run_dir}: width 0.07 at step {run.updates}, tracked mAP@0.5:0.95 {validated(tracked):.4f}\n")
    print("| snapshots stored as | relative weight error | mAP@0.5:0.95 |\n|---|--:|--:|")
    rebuilt = reconstructed_checkpoint(run, 0.07)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        weights = reconstruct(run.snapshots, 0.07, run.updates, stored_as=dtype).weights
        checkpoint = {**rebuilt, "ema": weights, "model": weights}
        error = relative_difference(weights, tracked["ema"])
        print(f"| {str(dtype).split('.')[1]} | {error:.2e} | {validated(checkpoint):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfgs", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml", "yolo11n.yaml", "yolo11s.yaml"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", type=Path, default=None, help="a run with snapshots and power-0.07.pt")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    cost(args.cfgs, args.repeats)
    if args.run is not None:
        precision(args.run)


if __name__ == "__main__":
    main()
