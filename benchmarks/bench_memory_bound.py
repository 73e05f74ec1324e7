"""The training pre-check's lower bound against the measured peak of real training steps, and the
bound of the GPU jobs users run.

    python benchmarks/bench_memory_bound.py [--cfgs yolov5n.yaml ...] [--sizes 64 128 256] [--batch 2]
        [--gpu-jobs "yolov5s.yaml:64:V100 16 GB" ...]

Table 1, per model and image size: the bound (weights, EMA, SGD's state and the tensors autograd
keeps, fp32) and the memory a real step holds at its peak on this CPU (AutoBatch's measurement:
the resident set's high-water mark above what was in use before the step, plus the weights, EMA and
SGD's state), and their ratio, which must lie in [0.5, 1]. Table 2: the bound of jobs at 640 px
under fp16 autocast on the GPUs they run on (no GPU needed: the bound is counted on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import build_model  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.train.autobatch import measure_step_memory  # noqa: E402
from utils.train.memory_bound import step_memory_lower_bound  # noqa: E402

GPU_JOBS = ("yolov5s.yaml:64:V100 16 GB", "yolov5x.yaml:16:V100 16 GB", "yolov5x.yaml:64:H100 80 GB")
GPU_JOBS += ("yolo11x.yaml:32:A100 40 GB",)  # MODEL:BATCH:GPU
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cfgs",
        nargs="+",
        default=["yolov5n.yaml", "yolov5s.yaml", "yolov5x.yaml", "yolo11n.yaml", "yolo11s.yaml", "yolo11x.yaml"],
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gpu-jobs", nargs="*", default=list(GPU_JOBS), help="table 2's jobs, MODEL:BATCH:GPU")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(f"| model | imgsz | batch {args.batch}: bound (MiB) | measured peak (MiB) | bound / peak |")
    print("|---|--:|--:|--:|--:|")
    for cfg in args.cfgs:
        model = build_model(cfg, nc=80)
        hyp = load_hyp(None, anchor_free=model.anchor_free)
        bound = step_memory_lower_bound(model, amp_dtype=None, optimizer="SGD", averages=1, weights_resident=False)
        for size in args.sizes:
            fit = measure_step_memory(
                model, hyp, img_size=size, device=cpu, amp_dtype=None, weights_dtype=torch.float32,
                optimizer="SGD", batches=(args.batch,),
            )  # fmt: skip
            peak = fit.measured[0][1] + 2 * fit.weight_bytes + fit.optimizer_state_bytes
            estimate = bound.needed(args.batch, size)
            print(f"| {cfg} | {size} | {estimate / MIB:.1f} | {peak / MIB:.1f} | {estimate / peak:.3f} |", flush=True)
    print("\n| job at 640 px, fp16 autocast | bound (GiB) | runs on |")
    print("|---|--:|---|")
    for job in args.gpu_jobs:
        cfg, batch, gpu = job.split(":", 2)
        model = build_model(cfg, nc=80)
        bound = step_memory_lower_bound(
            model, amp_dtype=torch.float16, optimizer="SGD", averages=1, weights_resident=False
        )
        print(f"| {cfg} batch {batch} | {bound.needed(int(batch), 640) / 2**30:.1f} | {gpu} |")


if __name__ == "__main__":
    main()
