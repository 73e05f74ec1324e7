"""Box formats and conversions: the one place where formats are defined.

xyxy: corners (x1, y1, x2, y2) in pixels.  xywh: centre and size in pixels.
xywhn: centre and size normalised by image width/height (the YOLO label format).
Torch tensors use torchvision.ops.box_convert; the numpy versions serve the data pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert


def xywhn_to_xyxy(boxes: np.ndarray, width: float, height: float, pad_x: float = 0.0, pad_y: float = 0.0) -> np.ndarray:
    """(N, 4) normalised centre/size -> (N, 4) pixel corners, shifted by a padding offset."""
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = width * (boxes[:, 0] - boxes[:, 2] / 2) + pad_x
    out[:, 1] = height * (boxes[:, 1] - boxes[:, 3] / 2) + pad_y
    out[:, 2] = width * (boxes[:, 0] + boxes[:, 2] / 2) + pad_x
    out[:, 3] = height * (boxes[:, 1] + boxes[:, 3] / 2) + pad_y
    return out


def xyxy_to_xywhn(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(N, 4) pixel corners -> (N, 4) normalised centre/size."""
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) / 2 / width
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / height
    out[:, 2] = (boxes[:, 2] - boxes[:, 0]) / width
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / height
    return out


def clip_boxes_(boxes: np.ndarray | torch.Tensor, height: float, width: float) -> None:
    """Clip (N, 4) xyxy boxes to the image, in place."""
    if isinstance(boxes, torch.Tensor):
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    else:
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def letterbox_to_original(boxes_xyxy: torch.Tensor, original_hw: tuple[int, int],
                          scale_xy: tuple[float, float], pad_xy: tuple[float, float]) -> torch.Tensor:
    """Map (N, 4) xyxy boxes on a letterboxed image back onto the original image, clipped.

    `scale_xy` is the resize factor original -> letterboxed per axis, `pad_xy` the left/top padding.
    """
    boxes = boxes_xyxy.clone()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_xy[0]) / scale_xy[0]
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_xy[1]) / scale_xy[1]
    clip_boxes_(boxes, *original_hw)
    return boxes
