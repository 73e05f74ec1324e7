"""The anchor-free models (YOLOv5u, YOLOv8, YOLO11) against Ultralytics 8.4: parameter counts,
state-dict names and shapes, the forward pass; and fine-tuning them to other classes.

The reference numbers in tests/reference/ultralytics_8_4.json were computed once with the
`ultralytics` package (tests/reference/make_ultralytics_reference.py) on the closed-form inputs
of tests/reference/fixed_values.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.yolo import build_model
from tests.reference import fixed_values
from utils.checkpoint.format import foreign_checkpoint, transfer_matching_weights

REFERENCE = json.loads((Path(__file__).parent / "reference" / "ultralytics_8_4.json").read_text())
# Parameter counts at nc=80 as Ultralytics reports them (fused: BatchNorm folded into the convolutions).
PARAMETERS = {
    "yolov5nu": (2_654_816, 2_649_200),
    "yolov5su": (9_153_152, None),
    "yolov8n": (3_157_200, 3_151_904),
    "yolov8s": (11_166_560, None),
    "yolo11n": (2_624_080, 2_616_248),
    "yolo11s": (9_458_752, None),
    "yolo11m": (20_114_688, None),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PARAMETERS)
def test_parameter_counts_equal_ultralytics(name):
    params, fused = PARAMETERS[name]
    model = build_model(f"{name}.yaml", nc=80)
    assert count(model) == params == REFERENCE["models"][name]["params"]
    if fused is not None:
        assert count(copy.deepcopy(model).fuse()) == fused


@pytest.mark.parametrize("name", REFERENCE["models"])
def test_state_dict_names_and_shapes_equal_ultralytics(name):
    """Every scale of the three families: the same tensors under the same names, so weights map one to one."""
    expected = REFERENCE["models"][name]
    state = build_model(f"{name}.yaml", nc=80).state_dict()
    if "state_dict" in expected:
        assert [[k, list(v.shape)] for k, v in state.items()] == expected["state_dict"]
    lines = "\n".join(f"{k} {list(v.shape)}" for k, v in state.items())
    assert len(state) == expected["num_keys"]
    assert hashlib.sha256(lines.encode()).hexdigest() == expected["digest"]


@pytest.mark.parametrize("name", REFERENCE["forward"])
@pytest.mark.parametrize("fused", [False, True])
def test_forward_pass_equals_ultralytics(name, fused):
    """Same weights, same image: the decoded boxes and class probabilities equal Ultralytics'."""
    expected = REFERENCE["forward"][name]
    model = build_model(f"{name}.yaml", nc=80)
    fixed_values.fill_state_dict(model)
    model.eval()
    if fused:
        model.fuse()
    with torch.no_grad():
        decoded, _ = model(fixed_values.fixed_image())
    output = decoded.transpose(1, 2).double()  # ours (B, A, 4 + nc), Ultralytics' (B, 4 + nc, A)
    assert list(output.shape) == expected["shape"]
    tolerance = 1e-4 if fused else 1e-5
    assert output.sum().item() == pytest.approx(expected["sum"], rel=tolerance)
    assert output.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=tolerance)
    samples = output.flatten()[:: expected["sample_step"]].numpy()
    np.testing.assert_allclose(samples, expected["samples"], rtol=tolerance, atol=tolerance * 10)


def test_fine_tuning_to_other_classes_keeps_the_box_branch_and_restarts_the_class_outputs():
    """80-class weights into a 3-class YOLO11n: everything but the class branch's class-sized layers moves."""
    torch.manual_seed(0)
    trained = build_model("yolo11n.yaml", nc=80)
    checkpoint = foreign_checkpoint(trained.yaml, [str(i) for i in range(80)], trained.state_dict(), "test")
    model = build_model("yolo11n.yaml", nc=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    moved, total = transfer_matching_weights(model, checkpoint)
    state, head = model.state_dict(), len(model.model) - 1
    kept = [
        k for k in state if torch.equal(state[k], trained.state_dict()[k] if k in trained.state_dict() else fresh[k])
    ]
    restarted = sorted(set(state) - set(kept))
    assert moved == len(kept) and total == len(state)
    # YOLO11's class branch is max(64, min(nc, 100)) wide: 80 channels for 80 classes, 64 for 3, so
    # its layers after each level's depth-wise convolution start afresh; the box branch and DFL keep theirs.
    depthwise = re.compile(rf"model\.{head}\.cv3\.\d\.0\.0\.")  # each level's first (depth-wise) convolution
    assert restarted and all(k.startswith(f"model.{head}.cv3.") and not depthwise.match(k) for k in restarted)
    assert all(k in kept for k in state if k.startswith((f"model.{head}.cv2.", f"model.{head}.dfl.")))
    assert all(k in kept for k in state if not k.startswith(f"model.{head}."))
