"""What an export computes: images -> the detection head's decoded tensor, as in PyTorch's eval mode."""

from __future__ import annotations

import torch
from torch import nn

from models.yolo import DetectionModel

INPUT_NAME, OUTPUT_NAME = "images", "output0"


class DecodedOutput(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> `model(images)[0]`: (B, N, 5 + nc) for YOLOv5's head (xywh in
    input pixels, objectness, class probabilities), (B, N, 4 + nc) for the anchor-free head. The raw
    per-level outputs, which only the loss uses, are left out."""

    def __init__(self, model: DetectionModel):
        super().__init__()
        self.model = model
        # Exporters restore the training mode of the module they are given, recursively: an
        # eval-mode wrapper keeps the model in eval mode afterwards too.
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]


def example_images(batch_size: int, img_size: tuple[int, int], device: torch.device, half: bool) -> torch.Tensor:
    """A (batch, 3, h, w) input in [0, 1] to trace with, in the precision the export takes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, *img_size, generator=generator)
    return images.to(device, torch.float16 if half else torch.float32)
