"""yolov5.utils.loss.ComputeLoss: our anchor-based loss over the model's hyp (the harness has scaled its gains
as YOLOv5's train.py does; ours scales them again at 640 px, which a stand-in may)."""

from __future__ import annotations

import torch

from utils.train.criterion import build_criterion


class ComputeLoss:
    def __init__(self, model: torch.nn.Module, autobalance: bool = False):
        self.criterion = build_criterion(model, model.hyp, img_size=640)

    def __call__(self, p: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.criterion(p, targets)
