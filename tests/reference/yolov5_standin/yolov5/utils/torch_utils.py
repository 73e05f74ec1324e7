"""yolov5.utils.torch_utils: our EMA, and our optimizer under YOLOv5's name for it."""

from __future__ import annotations

import torch

from utils.train.ema import ModelEMA  # noqa: F401
from utils.train.optim import build_optimizer


def smart_optimizer(
    model: torch.nn.Module, name: str = "Adam", lr: float = 0.001, momentum: float = 0.9, decay: float = 1e-5
) -> torch.optim.Optimizer:
    return build_optimizer(model, name, lr, momentum, decay)
