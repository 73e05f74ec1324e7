"""YOLOv5 and Ultralytics checkpoints (pickled models): refused by default, read exactly with
--trust-pickle, and even then a hostile pickle cannot run code."""

from __future__ import annotations

import sys
import types
from unittest import mock

import pytest
import torch

from models.yolo import DetectionModel, build_model
from tests.test_hostile_inputs import Payload
from utils.checkpoint.format import load_checkpoint, model_from_checkpoint, transfer_matching_weights
from utils.errors import UserError


@pytest.fixture
def yolov5_style_checkpoint(tmp_path):
    """A checkpoint laid out as YOLOv5 writes one: the whole model object pickled, in fp16."""
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=3)
    model.train()(torch.rand(2, 3, 64, 64))  # non-trivial BatchNorm statistics
    model.names = {0: "cat", 1: "dog", 2: "bird"}
    path = tmp_path / "yolov5n_custom.pt"
    torch.save(
        {
            "epoch": 9,
            "best_fitness": 0.4,
            "model": None,
            "ema": model.half(),
            "updates": 123,
            "optimizer": None,
            "opt": {"imgsz": 320, "epochs": 10},
        },
        path,
    )
    return path, model.float()


# Where Ultralytics 8.4 defines the classes of a YOLO11 model (our class name -> its module, its name).
ULTRALYTICS_CLASSES = {
    "DetectionModel": ("ultralytics.nn.tasks", "DetectionModel"),
    "Conv": ("ultralytics.nn.modules.conv", "Conv"),
    "DWConv": ("ultralytics.nn.modules.conv", "DWConv"),
    "Concat": ("ultralytics.nn.modules.conv", "Concat"),
    **{
        name: ("ultralytics.nn.modules.block", name)
        for name in ("Bottleneck", "C3k", "C3k2", "C2PSA", "PSABlock", "Attention", "SPPF", "DFL")
    },
    "AnchorFreeDetect": ("ultralytics.nn.modules.head", "Detect"),
}


@pytest.fixture
def ultralytics_style_checkpoint(tmp_path):
    """A checkpoint laid out as Ultralytics 8.4 writes one: its classes (here stand-ins registered
    under its module names while saving, gone before reading), fp16, options under train_args."""
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", nc=3)
    model.train()(torch.rand(2, 3, 64, 64))  # non-trivial BatchNorm statistics
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.names = {0: "cat", 1: "dog", 2: "bird"}
    path = tmp_path / "yolo11n_custom.pt"
    with mock.patch.dict(sys.modules):
        for module_name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.modules"):
            sys.modules[module_name] = types.ModuleType(module_name)
        for module in model.modules():
            if type(module).__name__ in ULTRALYTICS_CLASSES:
                module_name, name = ULTRALYTICS_CLASSES[type(module).__name__]
                home = sys.modules.setdefault(module_name, types.ModuleType(module_name))
                if not hasattr(home, name):
                    setattr(home, name, type(name, (type(module),), {"__module__": module_name, "__qualname__": name}))
                module.__class__ = getattr(home, name)
        torch.save({"model": model.half(), "ema": None, "train_args": {"imgsz": 320}, "version": "8.4.0"}, path)
    assert "ultralytics" not in sys.modules
    return path, expected


def test_ultralytics_checkpoint_read_exactly_with_the_flag(ultralytics_style_checkpoint):
    path, expected = ultralytics_style_checkpoint
    with pytest.raises(UserError, match="If it is a YOLOv5 or Ultralytics checkpoint you trust, add --trust-pickle"):
        load_checkpoint(path, offers_trust_pickle=True)
    checkpoint = load_checkpoint(path, trust_pickle=True)
    assert "ultralytics" not in sys.modules  # read through placeholders, never imported
    assert checkpoint["source"] == f"Ultralytics checkpoint {path}"
    assert checkpoint["names"] == ["cat", "dog", "bird"] and checkpoint["opt"] == {"imgsz": 320}
    assert checkpoint["model_yaml"]["scale"] == "n" and checkpoint["ema"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(checkpoint["ema"][name], tensor.half().float() if tensor.is_floating_point() else tensor), (
            name
        )
    rebuilt = model_from_checkpoint(checkpoint, "ema")
    assert rebuilt.anchor_free and rebuilt.nc == 3
    moved, total = transfer_matching_weights(build_model("yolo11n.yaml", nc=3), checkpoint)
    assert moved == total


def test_refused_without_the_flag(yolov5_style_checkpoint):
    """Refused; the message suggests --trust-pickle only to a command that has the option."""
    path, _ = yolov5_style_checkpoint
    with pytest.raises(UserError, match="add --trust-pickle to read its weights"):
        load_checkpoint(path, offers_trust_pickle=True)
    with pytest.raises(UserError, match="full unpickling") as refused:
        load_checkpoint(path)  # as average.py and train.py --resume read checkpoints: they have no --trust-pickle
    assert "add --trust-pickle" not in str(refused.value)
    assert "train.py --weights, val.py and detect.py with --trust-pickle" in str(refused.value)


def test_read_exactly_with_the_flag(yolov5_style_checkpoint):
    path, original = yolov5_style_checkpoint
    checkpoint = load_checkpoint(path, trust_pickle=True)
    assert checkpoint["names"] == ["cat", "dog", "bird"] and checkpoint["opt"] == {"imgsz": 320}
    expected = original.state_dict()
    assert checkpoint["ema"].keys() == expected.keys()
    for name, tensor in expected.items():  # the fp16 values, widened back to fp32
        assert torch.equal(checkpoint["ema"][name], tensor.half().float() if tensor.is_floating_point() else tensor), (
            name
        )
    rebuilt = model_from_checkpoint(checkpoint, "ema").eval()
    assert isinstance(rebuilt, DetectionModel) and rebuilt.nc == 3
    moved, total = transfer_matching_weights(build_model("yolov5n.yaml", nc=3), checkpoint)
    assert moved == total


def test_a_hostile_pickle_runs_nothing_even_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "ema": Payload(marker)}, evil)
    with pytest.raises(UserError, match="not a YOLOv5 or Ultralytics checkpoint"):
        load_checkpoint(evil, trust_pickle=True)
    assert not marker.exists()


class RegistersAHook:
    """Unpickles as a call of torch's register_module_forward_hook: a function of torch.nn.modules
    that acts on every module of the process."""

    def __reduce__(self):
        return torch.nn.modules.module.register_module_forward_hook, (torch.nn.Identity,)


def test_a_trusted_pickle_cannot_call_torch_functions(tmp_path):
    """--trust-pickle rebuilds torch's module classes only: a function of torch.nn.modules named in
    the pickle becomes a placeholder and is never called."""
    evil = tmp_path / "hook.pt"
    torch.save({"model": RegistersAHook()}, evil)
    hooks = torch.nn.modules.module._global_forward_hooks
    before = dict(hooks)
    try:
        with pytest.raises(UserError, match="not a YOLOv5 or Ultralytics checkpoint"):
            load_checkpoint(evil, trust_pickle=True)
        assert dict(hooks) == before, "the pickle registered a process-wide forward hook"
    finally:
        for key in set(hooks) - set(before):
            del hooks[key]
