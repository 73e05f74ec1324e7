"""Box helpers: CIoU pinned to torchvision, finite gradients on degenerate boxes, letterbox inverse."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert, complete_box_iou_loss

from utils.boxes import complete_iou, letterbox_to_original, xywhn_to_xyxy, xyxy_to_xywhn
from utils.data.augment import letterbox


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 20
    size = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 8 + 0.5
    return torch.cat((centre, size), dim=1)


def test_ciou_equals_torchvision():
    generator = torch.Generator().manual_seed(0)
    a, b = random_boxes(500, generator), random_boxes(500, generator)
    b[:100] = a[:100] + torch.rand(100, 4, generator=generator, dtype=torch.float64) * 0.3  # overlapping pairs
    reference = 1 - complete_box_iou_loss(box_convert(a, "cxcywh", "xyxy"), box_convert(b, "cxcywh", "xyxy"))
    torch.testing.assert_close(complete_iou(a, b), reference, rtol=0, atol=1e-6)


def test_ciou_gradients_stay_finite_for_degenerate_boxes():
    """A zero-height prediction: torchvision's loss gives NaN gradients here, ours must not."""
    pred = torch.tensor([[10.0, 10.0, 2.0, 0.0], [5.0, 5.0, 0.0, 0.0], [3.0, 3.0, 1e-30, 2.0]], requires_grad=True)
    target = torch.tensor([[10.0, 10.0, 2.0, 3.0], [5.0, 5.0, 1.0, 1.0], [3.0, 3.0, 1.0, 2.0]])
    (1 - complete_iou(pred, target)).sum().backward()
    assert torch.isfinite(pred.grad).all()
    pred_xyxy = box_convert(pred.detach(), "cxcywh", "xyxy").requires_grad_()
    complete_box_iou_loss(pred_xyxy, box_convert(target, "cxcywh", "xyxy")).sum().backward()
    assert not torch.isfinite(pred_xyxy.grad).all()  # why we do not call torchvision's loss here


def test_normalised_and_pixel_forms_round_trip():
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1]], np.float32)
    np.testing.assert_allclose(xyxy_to_xywhn(xywhn_to_xyxy(boxes, 640, 480), 640, 480), boxes, atol=1e-6)
    np.testing.assert_allclose(xywhn_to_xyxy(boxes, 640, 480)[0], [256, 144, 384, 336])


def test_letterbox_to_original_inverts_letterbox():
    image = np.zeros((300, 500, 3), np.uint8)
    boxed, scale_xy, pad_xy = letterbox(image, (256, 256))
    original = torch.tensor([[50.0, 30.0, 200.0, 290.0], [0.0, 0.0, 500.0, 300.0]], dtype=torch.float64)
    on_input = original.clone()
    on_input[:, [0, 2]] = on_input[:, [0, 2]] * scale_xy[0] + pad_xy[0]
    on_input[:, [1, 3]] = on_input[:, [1, 3]] * scale_xy[1] + pad_xy[1]
    assert boxed.shape[:2] == (256, 256)
    torch.testing.assert_close(letterbox_to_original(on_input, (300, 500), scale_xy, pad_xy), original)
    outside = torch.tensor([[-20.0, -5.0, 300.0, 300.0]], dtype=torch.float64)
    clipped = letterbox_to_original(outside, (300, 500), scale_xy, pad_xy)
    assert clipped.min() >= 0 and clipped[0, 3] <= 300
