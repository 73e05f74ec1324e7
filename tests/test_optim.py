"""Optimizer groups and YOLOv5's warmup / decay schedule."""

from __future__ import annotations

import pytest
import torch

from models.yolo import build_model
from utils.hyp import load_hyp
from utils.train.optim import (
    AUTO_SGD_MIN_STEPS,
    TrainSchedule,
    accumulation_steps,
    build_optimizer,
    resolve_auto_optimizer,
)


@pytest.mark.parametrize("batch, expected", [(1, 64), (16, 4), (24, 3), (48, 1), (64, 1), (128, 1)])
def test_accumulation_to_nominal_batch(batch, expected):
    assert accumulation_steps(batch) == expected


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_three_parameter_groups(name):
    model = build_model("yolov5n.yaml", nc=3)
    optimizer = build_optimizer(model, name, lr=0.01, momentum=0.937, weight_decay=5e-4)
    biases, weights, norms = (group["params"] for group in optimizer.param_groups)
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(norms) == num_bn and len(biases) == num_bn + 3  # BN biases + the 3 Detect conv biases
    assert len(weights) == len(list(model.parameters())) - len(norms) - len(biases)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4, 0.0]
    if name == "SGD":
        assert optimizer.param_groups[0]["nesterov"]


def test_schedule_warmup_then_linear_decay():
    hyp = load_hyp("scratch-low.yaml")
    model = build_model("yolov5n.yaml", nc=3)
    optimizer = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], 5e-4)
    schedule = TrainSchedule(hyp, epochs=10, batches_per_epoch=20, batch_size=16)
    assert schedule.warmup_steps == 100  # 3 epochs x 20 = 60, raised to YOLOv5's minimum of 100
    schedule.apply(optimizer, epoch=0, step=0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    assert optimizer.param_groups[1]["momentum"] == pytest.approx(0.8)
    schedule.apply(optimizer, epoch=2, step=50)
    target = 0.01 * ((1 - 2 / 10) * (1 - 0.01) + 0.01)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(target / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx((0.1 + target) / 2)
    schedule.apply(optimizer, epoch=9, step=190)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * (0.1 * 0.99 + 0.01)] * 3)
    assert optimizer.param_groups[2]["momentum"] == 0.937


def test_cosine_schedule_ends_at_lrf():
    hyp = load_hyp("scratch-low.yaml")
    schedule = TrainSchedule(hyp, epochs=10, batches_per_epoch=20, batch_size=16, cos_lr=True)
    assert schedule.factor(0) == pytest.approx(1.0) and schedule.factor(10) == pytest.approx(0.01)
    assert schedule.factor(5) == pytest.approx((1 + 0.01) / 2)


def test_accumulation_ramps_up_during_warmup():
    """YOLOv5: accumulate = round(interp(step, [0, warmup], [1, 64 / batch])) while warming up."""
    schedule = TrainSchedule(load_hyp("scratch-low.yaml"), epochs=10, batches_per_epoch=20, batch_size=16)
    assert [schedule.accumulate(s) for s in (0, 16, 17, 49, 50, 83, 84, 99, 100, 500)] == [1, 1, 2, 2, 2, 3, 4, 4, 4, 4]


def test_accumulation_ramp_targets_the_unrounded_nominal_ratio():
    """Batch 24: YOLOv5 ramps towards 64 / 24 = 2.67 (3 only from step 91; a ramp to 3 would reach it at 76),
    then uses round(2.67) = 3. numpy rounds halves to even: 1.5 -> 2 at step 30, 2.5 -> 2 at step 90."""
    schedule = TrainSchedule(load_hyp("scratch-low.yaml"), epochs=10, batches_per_epoch=20, batch_size=24)
    assert [schedule.accumulate(s) for s in (0, 29, 30, 90, 91, 100)] == [1, 1, 2, 2, 3, 3]


def test_auto_optimizer_is_adamw_for_short_runs_and_sgd_for_long_ones():
    hyp = load_hyp("scratch-low.yaml")
    name, short = resolve_auto_optimizer("auto", hyp, planned_steps=300)
    assert name == "AdamW" and short["lr0"] == 0.003 and short["warmup_bias_lr"] == 0.0
    assert hyp["lr0"] == 0.01  # the caller's hyp is not modified
    assert resolve_auto_optimizer("auto", hyp, planned_steps=AUTO_SGD_MIN_STEPS) == ("SGD", hyp)
    assert resolve_auto_optimizer("SGD", hyp, planned_steps=300) == ("SGD", hyp)  # an explicit choice stands
