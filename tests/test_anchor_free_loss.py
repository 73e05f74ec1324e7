"""The anchor-free loss against Ultralytics 8.4's: task-aligned assignment, the three loss items,
the total and its gradients on the closed-form cases of tests/reference/fixed_values.py (reference
numbers in tests/reference/ultralytics_8_4.json, computed once with the `ultralytics` package by
tests/reference/make_ultralytics_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.yolo import build_model
from tests.reference import fixed_values
from utils.train.anchor_free_loss import AnchorFreeLoss

REFERENCE = json.loads((Path(__file__).parent / "reference" / "ultralytics_8_4.json").read_text())["loss"]
GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


@pytest.mark.parametrize("case", fixed_values.LOSS_CASES)
def test_loss_assignment_and_gradients_equal_ultralytics(case):
    """The task-aligned assignment, the three loss items, the total and its gradients within 1e-5."""
    spec, expected = fixed_values.LOSS_CASES[case], REFERENCE[case]
    model = build_model("yolov8n.yaml", nc=spec["nc"])
    criterion = AnchorFreeLoss(model.detect_head, GAINS)
    feats = [f.requires_grad_(True) for f in fixed_values.loss_case_feats(spec["batch"], spec["nc"], spec["scale"])]
    targets = torch.tensor(spec["labels"], dtype=torch.float32)

    total, items = criterion(feats, targets)
    total.backward()
    np.testing.assert_allclose(items.numpy(), list(expected["items"].values()), rtol=1e-5)
    assert total.item() == pytest.approx(expected["total"], rel=1e-5)
    for feat, grad in zip(feats, expected["grads"]):
        g = feat.grad.double()
        assert g.sum().item() == pytest.approx(grad["sum"], rel=1e-5)
        assert g.abs().sum().item() == pytest.approx(grad["abs_sum"], rel=1e-5)
        assert (g**2).sum().item() == pytest.approx(grad["sq_sum"], rel=1e-5)
        np.testing.assert_allclose(g.flatten()[:: grad["sample_step"]].numpy(), grad["samples"], rtol=1e-5, atol=1e-9)

    # The assignment itself, from the same inputs the loss gave the assigner.
    reference = expected["assigner"]
    captured = {}
    assign = criterion.assigner.__call__
    criterion.assigner = lambda *args: captured.setdefault("out", assign(*args))
    criterion(fixed_values.loss_case_feats(spec["batch"], spec["nc"], spec["scale"]), targets)
    out = captured["out"]
    assert out.foreground.nonzero().tolist() == reference["fg"]
    fg = out.foreground
    assert out.gt_index[fg].tolist() == reference["target_gt_idx"]
    np.testing.assert_allclose(out.boxes[fg].numpy(), reference["target_bboxes"], rtol=1e-6)
    np.testing.assert_allclose(out.scores.numpy(), reference["target_scores"], rtol=1e-5, atol=1e-7)
