"""What one EMA update costs: ours (two foreach kernels over the state dict), a per-tensor loop as
YOLOv5 writes it, and a single flat lerp_ over the same number of floats (the memory-bandwidth
floor), for yolov5n and yolov5s, with the model prepared as train.py prepares it (channels_last),
plus the update as a share of one training step (an optimizer step of the default run:
4 micro-batches of 16 images at 320 px, forward + loss + backward, then the optimizer).

    python benchmarks/bench_ema.py [--repeats 200] [--rounds 5] [--step-repeats 3] [--imgsz 320] [--batch 16]
        [--amp auto] [--models yolov5n.yaml yolov5s.yaml]

Memory bandwidth on a shared machine drifts between seconds, so the three are timed in turn,
in several rounds; the table gives the median of the rounds and the range of ours / floor.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import build_model  # noqa: E402
from utils.device import autocast  # noqa: E402
from utils.dist import World  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.precision import AMP_CHOICES, Precision, describe  # noqa: E402
from utils.train.criterion import build_criterion  # noqa: E402
from utils.train.ema import ModelEMA  # noqa: E402
from utils.train.optim import accumulation_steps, build_optimizer  # noqa: E402
from utils.train.precision import training_precision  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median time of each function, run in turn so that clock and cache drift hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for repeat in range(repeats + 3):
        for fn, fn_times in zip(fns, times):
            started = time.perf_counter()
            fn()
            if repeat >= 3:
                fn_times.append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def per_tensor_update(ema_module: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The straightforward update: a Python loop over the state dict, two kernels per tensor."""
    with torch.no_grad():
        model_state = model.state_dict()
        for key, value in ema_module.state_dict().items():
            if value.dtype.is_floating_point:
                value *= decay
                value += (1 - decay) * model_state[key].detach()


def step_precision(model: torch.nn.Module, amp: str, imgsz: int, batch: int) -> Precision:
    """The autocast train.py's --amp `amp` gives this model's training step on this CPU."""
    hyp = load_hyp(None, anchor_free=model.anchor_free)
    return training_precision(
        amp,
        model,
        hyp,
        img_size=imgsz,
        batch=batch,
        optimizer="SGD",
        device=torch.device("cpu"),
        weights_dtype=torch.float32,
        world=World(),
    )


def training_step_seconds(
    model: torch.nn.Module, imgsz: int, batch: int, repeats: int, dtype: torch.dtype | None
) -> float:
    """One optimizer step of the default recipe: accumulate x (forward + loss + backward) + step."""
    model = model.to(memory_format=torch.channels_last).train()
    criterion = build_criterion(model, load_hyp(None, anchor_free=model.anchor_free), imgsz)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=generator).contiguous(memory_format=torch.channels_last)
    per_image = 6
    targets = torch.cat(
        (
            torch.arange(batch).repeat_interleave(per_image)[:, None].float(),
            torch.randint(0, model.nc, (batch * per_image, 1), generator=generator).float(),
            0.2 + 0.6 * torch.rand(batch * per_image, 2, generator=generator),
            0.05 + 0.3 * torch.rand(batch * per_image, 2, generator=generator),
        ),
        dim=1,
    )

    def step() -> None:
        for _ in range(accumulation_steps(batch)):
            with autocast(torch.device("cpu"), dtype):
                raw = model(images)
            loss, _ = criterion(raw, targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed EMA updates per method")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of interleaved medians")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--amp", default="auto", choices=[c for c in AMP_CHOICES if c != "fp16"], help="train.py's --amp"
    )
    parser.add_argument("--models", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml"])
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, median of {args.rounds} rounds "
        f"of {args.repeats} updates each; "
        f"training step: {accumulation_steps(args.batch)} x {args.batch} images at {args.imgsz} px, "
        f"in the precision train.py's --amp {args.amp} gives\n"
    )
    print(
        "| model   | floats averaged | ours (ms) | per-tensor loop (ms) | flat lerp floor (ms) | ours / floor "
        "| ours / floor, range | step precision | training step (ms) | ours / step |"
    )
    print(
        "|---------|----------------:|----------:|---------------------:|---------------------:|-------------:"
        "|--------------------:|----------------|-------------------:|------------:|"
    )
    for cfg in args.models:
        torch.manual_seed(0)
        model = build_model(cfg, nc=80).to(memory_format=torch.channels_last)
        ema = ModelEMA(model, updates=10_000)  # d near its final value: the work does not depend on it
        decay = ema.current_decay()
        floats = sum(v.numel() for v in model.state_dict().values() if v.dtype.is_floating_point)
        flat_ema, flat_model = torch.rand(floats), torch.rand(floats)
        methods = [
            functools.partial(ema.update, model),
            functools.partial(per_tensor_update, ema.module, model, decay),
            functools.partial(flat_ema.lerp_, flat_model, 1 - decay),
        ]
        rounds = [interleaved_medians(methods, args.repeats) for _ in range(args.rounds)]
        ours, loop, floor = (statistics.median(column) for column in zip(*rounds))
        ratios = [round_ours / round_floor for round_ours, _, round_floor in rounds]
        precision = step_precision(model, args.amp, args.imgsz, args.batch)
        step = training_step_seconds(model, args.imgsz, args.batch, args.step_repeats, precision.dtype)
        print(
            f"| {cfg[:-5]:7s} | {floats:15,d} | {ours * 1e3:9.2f} | {loop * 1e3:20.2f} | {floor * 1e3:20.2f} "
            f"| {statistics.median(ratios):11.2f}x | {min(ratios):8.2f}x - {max(ratios):.2f}x "
            f"| {describe(precision)} | {step * 1e3:18.0f} | {100 * ours / step:10.2f}% |"
        )


if __name__ == "__main__":
    main()
