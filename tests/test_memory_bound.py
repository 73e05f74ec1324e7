"""The training pre-check's lower bound: below the measured peak of a real training step, within 2x
of it, and never refusing a job users run on the GPUs they have."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from models.yolo import build_model
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.peak_memory import cpu_peak_measurable
from utils.train import memory_bound
from utils.train.autobatch import measure_step_memory
from utils.train.memory_bound import StepMemory, check_training_memory, step_memory_lower_bound

SIZES, BATCH = (64, 96, 128), 2
CPU = torch.device("cpu")


def bound_and_measured_peaks(
    cfg: str, sizes: tuple[int, ...], amp_dtype: torch.dtype | None
) -> tuple[StepMemory, list[int]]:
    """The bound for SGD and an EMA, and per size the memory a real training step of BATCH images
    holds at its peak: AutoBatch's measurement of the step (the resident set's high-water mark
    above what was in use before it) plus the weights, the EMA and SGD's state."""
    model = build_model(cfg, nc=80)
    hyp = load_hyp(None, anchor_free=model.anchor_free)
    bound = step_memory_lower_bound(model, amp_dtype=amp_dtype, optimizer="SGD", averages=1, weights_resident=False)
    peaks = []
    for size in sizes:
        fit = measure_step_memory(
            model, hyp, img_size=size, device=CPU, amp_dtype=amp_dtype, weights_dtype=torch.float32,
            optimizer="SGD", batches=(BATCH,),
        )  # fmt: skip
        peaks.append(fit.measured[0][1] + 2 * fit.weight_bytes + fit.optimizer_state_bytes)
    return bound, peaks


@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux's resident-set peak (/proc/self/clear_refs)")
@pytest.mark.parametrize(
    "cfg",
    [
        "yolov5n.yaml",
        "yolov5s.yaml",
        "yolo11n.yaml",
        "yolo11s.yaml",
        pytest.param("yolov5x.yaml", marks=pytest.mark.slow),
        pytest.param("yolo11x.yaml", marks=pytest.mark.slow),
    ],
)
def test_the_bound_is_below_a_real_training_step_and_within_2x_of_it(cfg):
    bound, peaks = bound_and_measured_peaks(cfg, SIZES, amp_dtype=None)
    for size, peak in zip(SIZES, peaks):
        estimate = bound.needed(BATCH, size)
        assert peak / 2 <= estimate <= peak, (cfg, size, estimate / 2**20, peak / 2**20)


@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux's resident-set peak (/proc/self/clear_refs)")
def test_under_bf16_autocast_the_bound_counts_two_bytes_and_stays_below_the_step():
    bound, peaks = bound_and_measured_peaks("yolov5n.yaml", (64, 128), amp_dtype=torch.bfloat16)
    fp32 = step_memory_lower_bound(
        build_model("yolov5n.yaml", nc=80), amp_dtype=None, optimizer="SGD", averages=1, weights_resident=False
    )
    assert bound.per_pixel == pytest.approx(fp32.per_pixel / 2, rel=0.01)
    for size, peak in zip((64, 128), peaks):
        assert peak / 2 <= bound.needed(BATCH, size) <= peak, (size, bound.needed(BATCH, size) / 2**20, peak / 2**20)


@cache
def model_80_classes(cfg: str) -> torch.nn.Module:
    return build_model(cfg, nc=80)


@pytest.mark.parametrize(
    ("cfg", "batch", "gpu_gib"),
    [
        ("yolov5s.yaml", 64, 16),  # YOLOv5's documented batch on a 16 GB V100
        ("yolov5x.yaml", 16, 16),
        ("yolov5x.yaml", 64, 80),  # an 80 GB H100
        ("yolo11x.yaml", 32, 40),  # a 40 GB A100
    ],
)
def test_fp16_jobs_that_run_on_their_gpus_are_not_refused(cfg, batch, gpu_gib, monkeypatch):
    """Batches users train at 640 px under fp16 autocast, with the GPU's memory less a CUDA context (0.5 GiB)."""
    monkeypatch.setattr(memory_bound, "available_memory_bytes", lambda device: int((gpu_gib - 0.5) * 2**30))
    bound = step_memory_lower_bound(
        model_80_classes(cfg), amp_dtype=torch.float16, optimizer="SGD", averages=1, weights_resident=False
    )
    check_training_memory(bound, 640, batch, torch.device("cuda", 0))


def test_a_batch_beyond_the_bound_is_refused_naming_the_largest_the_bound_allows(monkeypatch):
    bound = step_memory_lower_bound(
        build_model("yolov5n.yaml", nc=6), amp_dtype=None, optimizer="AdamW", averages=1, weights_resident=True
    )
    needed = bound.needed(8, 320)
    monkeypatch.setattr(memory_bound, "available_memory_bytes", lambda device: needed)
    check_training_memory(bound, 320, 8, CPU)  # exactly enough: not refused
    monkeypatch.setattr(memory_bound, "available_memory_bytes", lambda device: needed - 1)
    with pytest.raises(UserError, match=r"with a batch of 8 needs at least .* a batch of at most 7 per process"):
        check_training_memory(bound, 320, 8, CPU)
    monkeypatch.setattr(memory_bound, "available_memory_bytes", lambda device: 2 * needed)
    with pytest.raises(UserError, match=r"to each of its 4 processes"):
        check_training_memory(bound, 320, 8, CPU, processes=4)
