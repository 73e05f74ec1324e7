"""NMS against torchvision's per-class NMS, multi-label scoring, and the reported candidate cap."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from utils.eval import nms as nms_module
from utils.eval.nms import non_max_suppression


def random_predictions(num_boxes: int, nc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_boxes, 2, generator=g) * 200
    wh = torch.rand(num_boxes, 2, generator=g) * 40 + 4
    obj = torch.rand(num_boxes, 1, generator=g)
    cls = torch.rand(num_boxes, nc, generator=g)
    return torch.cat((xy, wh, obj, cls), dim=1)[None]


def test_single_label_equals_per_class_torchvision_nms():
    pred = random_predictions(400, nc=3, seed=0)
    (ours,), truncated = non_max_suppression(pred, conf_thres=0.2, iou_thres=0.5, max_det=1000)
    assert truncated == 0
    x = pred[0]
    scores_all = x[:, 5:] * x[:, 4:5]
    conf, cls = scores_all.max(1)
    boxes = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), dim=1)
    expected = []
    for c in range(3):
        keep = (cls == c) & (conf > 0.2)
        idx = keep.nonzero().squeeze(1)
        kept = idx[nms(boxes[idx], conf[idx], 0.5)]
        expected += [(round(conf[i].item(), 6), c) for i in kept]
    assert sorted((round(s, 6), int(c)) for s, c in ours[:, 4:6].tolist()) == sorted(expected)


def test_multi_label_keeps_a_box_once_per_confident_class():
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.9, 0.8, 0.7, 0.01]]])
    (single,), _ = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5)
    (multi,), _ = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5, multi_label=True)
    assert single[:, 5].tolist() == [0.0]
    assert sorted(multi[:, 5].tolist()) == [0.0, 1.0]
    torch.testing.assert_close(multi[:, :4], torch.tensor([[40.0, 40.0, 60.0, 60.0]] * 2))
    torch.testing.assert_close(sorted(multi[:, 4].tolist()), [0.9 * 0.7, 0.9 * 0.8])


def test_candidate_cap_is_reported_not_silent(monkeypatch):
    monkeypatch.setattr(nms_module, "MAX_BOXES_INTO_NMS", 50)
    pred = torch.cat(
        (
            random_predictions(400, nc=2, seed=1),
            torch.cat((random_predictions(30, nc=2, seed=2), torch.zeros(1, 370, 7)), dim=1),
        )
    )
    output, truncated = non_max_suppression(pred, conf_thres=0.01, iou_thres=0.5, max_det=300)
    assert truncated == 1 and len(output) == 2  # every image comes back, the capped one is counted
    assert len(output[1]) > 0


def test_without_objectness_the_class_probabilities_are_the_scores():
    """The anchor-free head's (B, N, 4 + nc) predictions: a box's score is its class probability."""
    pred = torch.tensor(
        [
            [
                [50.0, 50.0, 20.0, 20.0, 0.9, 0.3],  # kept for class 0 (and for class 1 with multi_label)
                [51.0, 50.0, 20.0, 20.0, 0.8, 0.1],  # same place, same class, lower: suppressed
                [150.0, 50.0, 20.0, 20.0, 0.2, 0.1],  # below conf_thres for every class: dropped
            ]
        ]
    )
    (single,), _ = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5, objectness=False)
    assert single[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]
    (multi,), _ = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5, multi_label=True, objectness=False)
    assert sorted(multi[:, 4:].tolist()) == [[pytest.approx(0.3), 1.0], [pytest.approx(0.9), 0.0]]
