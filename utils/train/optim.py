"""Optimizer with YOLOv5's three parameter groups, and the learning-rate / momentum schedule."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH_SIZE = 64  # gradients are accumulated to about this many images per step
OPTIMIZERS = ("auto", "SGD", "Adam", "AdamW")
# --optimizer auto: YOLOv5's SGD recipe for long runs; for short ones AdamW with the hyp's auto_lr0
# (and auto_momentum), which for YOLOv5n on the shapes dataset (30 epochs, ~265 steps, lr0 0.003)
# ends at mAP@0.5:0.95 0.17 where SGD ends at 0.11 (benchmarks/bench_train.py). SGD's lr0 0.01
# and bias warmup from 0.1 are far too large for Adam.
AUTO_SGD_MIN_STEPS = 10_000
BIAS_GROUP, DECAY_GROUP = 0, 1  # the bias group (warmup from warmup_bias_lr); the decayed weights


def accumulation_steps(batch_size: int) -> int:
    """Micro-batches per optimizer step: max(round(64 / batch), 1)."""
    return max(round(NOMINAL_BATCH_SIZE / batch_size), 1)


def optimizer_steps(epochs: int, batches_per_epoch: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` after warmup: each epoch's windows of accumulation_steps()
    micro-batches, the last one short (warmup's shorter windows add a few)."""
    return epochs * math.ceil(batches_per_epoch / accumulation_steps(batch_size))


def resolve_auto_optimizer(name: str, hyp: dict, planned_steps: int) -> tuple[str, dict]:
    """The optimizer and hyp a run uses: `name` and `hyp` unchanged unless name is 'auto', which
    picks SGD with the hyp's values for runs of AUTO_SGD_MIN_STEPS optimizer steps or more, and
    otherwise AdamW with the hyp's auto_lr0, auto_momentum as beta1 (when the hyp has one, else
    its momentum) and no bias warmup."""
    if name != "auto":
        return name, hyp
    if planned_steps >= AUTO_SGD_MIN_STEPS:
        return "SGD", hyp
    momentum = hyp.get("auto_momentum", hyp["momentum"])
    return "AdamW", {**hyp, "lr0": hyp["auto_lr0"], "momentum": momentum, "warmup_bias_lr": 0.0}


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Groups: 0 biases (no decay), 1 conv/linear weights (decay), 2 normalisation weights (no decay)."""
    biases, decayed, norm_weights = [], [], []
    for module in model.modules():
        for name_, param in module.named_parameters(recurse=False):
            if name_ == "bias":
                biases.append(param)
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
                norm_weights.append(param)
            else:
                decayed.append(param)
    if name == "SGD":
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        optimizer = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    optimizer.add_param_group({"params": decayed, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    return optimizer


class TrainSchedule:
    """YOLOv5's schedule as a pure function of the position: no state to save.

    After warmup, epoch e trains at lr0 * f(e), f linear from 1 to lrf (or a cosine with
    cos_lr), accumulating `accumulate` micro-batches per step. During the first `warmup_steps`
    micro-batches every group's lr rises linearly from 0 (the bias group falls from
    warmup_bias_lr) to its epoch value, momentum rises from warmup_momentum to momentum, and
    the accumulation window grows from 1 to `accumulate`.
    """

    def __init__(self, hyp: dict, epochs: int, batches_per_epoch: int, batch_size: int, cos_lr: bool = False):
        self.lr0, self.lrf, self.epochs, self.cos_lr = hyp["lr0"], hyp["lrf"], epochs, cos_lr
        self.batch_size = batch_size
        self.full_accumulate = accumulation_steps(batch_size)  # after warmup
        self.momentum, self.warmup_momentum, self.warmup_bias_lr = (
            hyp["momentum"],
            hyp["warmup_momentum"],
            hyp["warmup_bias_lr"],
        )
        # At least 100 micro-batches of warmup, as YOLOv5 (0 turns warmup off).
        self.warmup_steps = max(round(hyp["warmup_epochs"] * batches_per_epoch), 100) if hyp["warmup_epochs"] > 0 else 0

    @property
    def weight_decay_scale(self) -> float:
        """The hyp's weight_decay is for 64 images a step: scaled by batch * accumulate / 64."""
        return self.batch_size * self.full_accumulate / NOMINAL_BATCH_SIZE

    def accumulate(self, step: int) -> int:
        """Micro-batches per optimizer step at micro-batch `step` (YOLOv5's warmup ramp, numpy rounding)."""
        if step >= self.warmup_steps:
            return self.full_accumulate
        ramp = np.interp(step, [0, self.warmup_steps], [1, NOMINAL_BATCH_SIZE / self.batch_size])
        return max(1, int(ramp.round()))

    def factor(self, epoch: int) -> float:
        """Learning-rate multiplier of an epoch after warmup: 1 at the start, lrf at the end."""
        if self.cos_lr:
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (self.lrf - 1) + 1
        return (1 - epoch / self.epochs) * (1.0 - self.lrf) + self.lrf

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        """Set lr (and momentum during warmup) for micro-batch `step` counted from the start of training."""
        target = self.lr0 * self.factor(epoch)
        warming = step < self.warmup_steps
        momentum = (
            float(np.interp(step, [0, self.warmup_steps], [self.warmup_momentum, self.momentum]))
            if warming
            else self.momentum
        )
        for index, group in enumerate(optimizer.param_groups):
            if warming:
                start = self.warmup_bias_lr if index == BIAS_GROUP else 0.0
                group["lr"] = float(np.interp(step, [0, self.warmup_steps], [start, target]))
            else:
                group["lr"] = target
            if "momentum" in group:  # SGD only: Adam's betas stay fixed, as in YOLOv5
                group["momentum"] = momentum
