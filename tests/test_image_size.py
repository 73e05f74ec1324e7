"""The input size: rounded to the stride, and an impossible one refused before anything starts."""

from __future__ import annotations

import pytest
import torch

from models.yolo import build_model
from utils import image_size
from utils.errors import UserError
from utils.image_size import check_image_size, round_image_size


def test_image_size_rounds_up_to_the_stride_and_says_so(caplog):
    assert round_image_size(320, 32) == 320 and "WARNING" not in caplog.text
    assert round_image_size(300, 32) == 320
    assert "--imgsz 300 is not a multiple of the max stride 32; using 320" in caplog.text


@pytest.fixture(scope="module")
def model():
    return build_model("yolov5n.yaml", nc=6)


def test_below_the_stride_is_refused_and_the_rest_rounded_up(model):
    cpu = torch.device("cpu")
    assert check_image_size(300, model) == 320
    with pytest.raises(UserError, match="--imgsz 16 is smaller than the model's stride 32: use at least 32"):
        check_image_size(16, model, batch_size=1, device=cpu)


def test_an_inference_batch_the_memory_cannot_hold_is_refused_saying_what_it_needs(model, monkeypatch):
    """A lower bound for inference: the input and the largest layer output (training batches: test_memory_bound.py)."""
    monkeypatch.setattr(image_size, "available_memory_bytes", lambda device: 8 * 2**30)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"--imgsz 10000 needs at least \d+ GiB for one batch of 8 \(input and largest"):
        check_image_size(10000, model, batch_size=8, device=cpu)
    with pytest.raises(UserError, match=r"available on cpu to each of its 4 processes"):
        check_image_size(10000, model, batch_size=1, device=cpu, processes=4)
    assert check_image_size(10000, model, batch_size=1, device=cpu) == 10016  # ~2.6 GiB: it fits
