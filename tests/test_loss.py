"""Detection loss: pinned to YOLOv5's ComputeLoss, target assignment, and learning on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

from models.yolo import build_model
from utils.hyp import load_hyp
from utils.train.loss import DetectionLoss


def deterministic_case(nc: int = 6, img_size: int = 128, batch: int = 2):
    """Raw predictions from a fixed formula (no RNG, so any torch version builds the same case)."""
    preds = []
    for level, stride in enumerate((8, 16, 32)):
        shape = (batch, 3, img_size // stride, img_size // stride, 5 + nc)
        values = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.37 + level) * 2
        preds.append(values.float().view(shape))
    targets = torch.tensor(
        [
            [0, 0, 0.50, 0.50, 0.20, 0.30],
            [0, 3, 0.11, 0.87, 0.05, 0.04],
            [0, 5, 0.76, 0.24, 0.60, 0.45],
            [1, 1, 0.33, 0.66, 0.12, 0.40],
            [1, 2, 0.97, 0.03, 0.06, 0.06],
            [1, 4, 0.52, 0.49, 0.90, 0.85],
            [1, 4, 0.26, 0.71, 0.02, 0.03],
        ]
    )
    return preds, targets


# yolov5 7.0.14 (PyPI): ComputeLoss on this case with yolov5n.yaml at nc=6, hyp.scratch-low.yaml and
# train.py's gain scaling for imgsz 128 -> (total, [box, obj, cls]).
YOLOV5_REFERENCE = {
    0.0: (0.8770480155944824, [0.13650600612163544, 0.19760900735855103, 0.10440899431705475]),
    0.1: (0.8768547773361206, [0.13650600612163544, 0.19760900735855103, 0.10431234538555145]),
}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_equals_yolov5(label_smoothing):
    model = build_model("yolov5n.yaml", nc=6)
    criterion = DetectionLoss(model.detect_head, load_hyp("scratch-low.yaml"), 128, label_smoothing=label_smoothing)
    total, items = criterion(*deterministic_case())
    expected_total, expected_items = YOLOV5_REFERENCE[label_smoothing]
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    assert items.tolist() == pytest.approx(expected_items, rel=1e-6)


def test_target_assignment_uses_own_and_two_neighbour_cells():
    model = build_model("yolov5n.yaml", nc=6)
    criterion = DetectionLoss(model.detect_head, load_hyp("scratch-low.yaml"), 128)
    preds, _ = deterministic_case()
    # One 16x24 px box centred at (43.2, 60.8) px in a 128 px image.
    target = torch.tensor([[1, 2, 43.2 / 128, 60.8 / 128, 16 / 128, 24 / 128]])
    image, anchor, gy, gx, box, cls, anchor_wh = criterion.assign_targets(preds, target)[0]  # stride 8
    # Centre at cell (5.4, 7.6): own cell (5, 7), left neighbour (x frac 0.4 < 0.5), lower neighbour (y frac 0.6).
    cells = sorted(set(zip(gx.tolist(), gy.tolist())))
    assert cells == [(4, 7), (5, 7), (5, 8)]
    # P3 anchors 10x13, 16x30, 33x23 px: ratios to 16x24 are all within anchor_t=4, so all three match.
    assert sorted(set(anchor.tolist())) == [0, 1, 2]
    assert set(image.tolist()) == {1} and set(cls.tolist()) == {2}
    # Box centres are relative to the assigned cell: within (-0.5, 1.5).
    assert ((box[:, :2] > -0.5) & (box[:, :2] < 1.5)).all()
    torch.testing.assert_close(box[:, 2:], torch.tensor([[2.0, 3.0]]).expand(len(box), 2))


def test_no_targets_gives_only_objectness_loss():
    model = build_model("yolov5n.yaml", nc=6)
    criterion = DetectionLoss(model.detect_head, load_hyp("scratch-low.yaml"), 128)
    preds, _ = deterministic_case()
    total, (box, obj, cls) = criterion(preds, torch.zeros((0, 6)))
    assert box == 0 and cls == 0 and obj > 0 and torch.isfinite(total)


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=3)
    criterion = DetectionLoss(model.detect_head, load_hyp("scratch-low.yaml"), 64)
    images = torch.rand(4, 3, 64, 64)
    targets = torch.tensor(
        [[0, 0, 0.5, 0.5, 0.4, 0.3], [1, 1, 0.3, 0.6, 0.2, 0.5], [2, 2, 0.7, 0.2, 0.3, 0.3], [3, 0, 0.4, 0.4, 0.6, 0.6]]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss, items = criterion(model(images), targets)
        assert torch.isfinite(loss) and torch.isfinite(items).all()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
