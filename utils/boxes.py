"""Box formats and conversions: the one place where formats are defined.

xyxy: corners (x1, y1, x2, y2) in pixels.  xywh: centre and size in pixels.
xywhn: centre and size normalised by image width/height (the YOLO label format).
Torch tensors use torchvision.ops.box_convert; the numpy versions serve the data pipeline.
"""

from __future__ import annotations

import math

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
    """(N, 4) centre/size -> (N, 4) corners."""
    return box_convert(boxes, "cxcywh", "xyxy")


def complete_iou(boxes1_xywh: torch.Tensor, boxes2_xywh: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise CIoU of two (N, 4) centre/size box sets -> (N,).

    Same value as torchvision.ops.complete_box_iou_loss (as 1 - loss), but computed from the
    centre/size form with sizes clamped to eps: a predicted box whose height rounds to zero
    (from corners it can, by cancellation) would otherwise give NaN gradients through w / h.
    """
    x1, y1, w1, h1 = boxes1_xywh.unbind(-1)
    x2, y2, w2, h2 = boxes2_xywh.unbind(-1)
    w1, h1, w2, h2 = w1.clamp(min=eps), h1.clamp(min=eps), w2.clamp(min=eps), h2.clamp(min=eps)
    left, right = torch.max(x1 - w1 / 2, x2 - w2 / 2), torch.min(x1 + w1 / 2, x2 + w2 / 2)
    top, bottom = torch.max(y1 - h1 / 2, y2 - h2 / 2), torch.min(y1 + h1 / 2, y2 + h2 / 2)
    intersection = (right - left).clamp(min=0) * (bottom - top).clamp(min=0)
    iou = intersection / (w1 * h1 + w2 * h2 - intersection + eps)
    enclosing_w = torch.max(x1 + w1 / 2, x2 + w2 / 2) - torch.min(x1 - w1 / 2, x2 - w2 / 2)
    enclosing_h = torch.max(y1 + h1 / 2, y2 + h2 / 2) - torch.min(y1 - h1 / 2, y2 - h2 / 2)
    centre_distance = ((x2 - x1) ** 2 + (y2 - y1) ** 2) / (enclosing_w**2 + enclosing_h**2 + eps)
    aspect = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = aspect / (1 - iou + aspect + eps)
    return iou - centre_distance - alpha * aspect


def complete_iou_xyxy(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """complete_iou of two (broadcastable) corner-form box sets."""
    return complete_iou(box_convert(boxes1, "xyxy", "cxcywh"), box_convert(boxes2, "xyxy", "cxcywh"))


def letterbox_to_original(
    boxes_xyxy: torch.Tensor, original_hw: tuple[int, int], scale_xy: tuple[float, float], pad_xy: tuple[float, float]
) -> torch.Tensor:
    """Map (N, 4) xyxy boxes on a letterboxed image back onto the original image, clipped.

    `scale_xy` is the resize factor original -> letterboxed per axis, `pad_xy` the left/top padding.
    """
    boxes = boxes_xyxy.clone()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_xy[0]) / scale_xy[0]
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_xy[1]) / scale_xy[1]
    clip_boxes_(boxes, *original_hw)
    return boxes
