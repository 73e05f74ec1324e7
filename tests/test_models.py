"""Model building from YAML: YOLOv5's parameter counts and state-dict names, strides, fusing, bad YAMLs."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import yaml

from models.parse import read_model_yaml
from models.yolo import DetectionModel, build_model
from utils.config_files import REPO_ROOT
from utils.errors import UserError
from utils.log import LOGGER

# Parameter counts of YOLOv5 v7.0's model YAMLs at nc=80 (yolov5 repository README and model summaries).
YOLOV5_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}
YOLOV5_FUSED_PARAMS = {"n": 1_867_405, "s": 7_225_885}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", "nsmlx")
def test_parameter_counts_equal_yolov5(size):
    model = build_model(f"yolov5{size}.yaml")
    assert count(model) == YOLOV5_PARAMS[size]
    if size in YOLOV5_FUSED_PARAMS:
        assert count(model.eval().fuse()) == YOLOV5_FUSED_PARAMS[size]


# sha256 of "name shape" lines of yolov5 7.0.14's Model(yolov5{n,s}.yaml, nc=80).state_dict(), computed
# with the PyPI package: a YOLOv5 state dict maps onto ours one to one.
YOLOV5_STATE_DICT_SHA256 = {
    "n": "55db261712d5d4f847b5cf8ae1045ed4d94076aed0795e76aa5190cde6479e6f",
    "s": "cd7c2e5655f8ddb6553c2832d289b9009e7b7e82640ace7229a8ecb2f2741349",
}


@pytest.mark.parametrize("size", "ns")
def test_state_dict_names_and_shapes_equal_yolov5(size):
    state = build_model(f"yolov5{size}.yaml", nc=80).state_dict()
    text = "\n".join(f"{name} {tuple(tensor.shape)}" for name, tensor in state.items())
    assert hashlib.sha256(text.encode()).hexdigest() == YOLOV5_STATE_DICT_SHA256[size]


def test_state_dict_names_follow_yolov5():
    keys = list(build_model("yolov5n.yaml").state_dict())
    assert keys[:3] == ["model.0.conv.weight", "model.0.bn.weight", "model.0.bn.bias"]
    for key in (
        "model.2.m.0.cv1.conv.weight",
        "model.2.cv3.bn.running_var",
        "model.9.cv2.conv.weight",
        "model.24.anchors",
        "model.24.m.0.weight",
        "model.24.m.2.bias",
    ):
        assert key in keys
    assert keys[-1] == "model.24.m.2.bias"


def test_strides_anchors_and_output_shapes():
    model = build_model("yolov5n.yaml", nc=3)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    # Anchors are stored in grid cells of their level: P3's first anchor is 10x13 px at stride 8.
    assert model.detect_head.anchors[0, 0].tolist() == [10 / 8, 13 / 8]
    raw = model(torch.zeros(2, 3, 64, 96))
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]
    decoded, _ = model.eval()(torch.zeros(2, 3, 64, 96))
    assert decoded.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 8)


def pixel_anchors(model: DetectionModel) -> torch.Tensor:
    head = model.detect_head
    return head.anchors * head.stride.view(-1, 1, 1)


def test_anchors_listed_largest_first_are_reversed_in_pixels():
    """A YAML listing P5's anchors first gets YOLOv5's order back, each anchor keeping its pixel size;
    levels of equal area are left as listed."""
    cfg = read_model_yaml(REPO_ROOT / "models" / "yolov5n.yaml")
    ordered = pixel_anchors(DetectionModel(cfg))
    assert torch.allclose(pixel_anchors(DetectionModel({**cfg, "anchors": cfg["anchors"][::-1]})), ordered)
    equal = [[2, 2, 2, 2, 2, 2]] * 3
    assert torch.equal(pixel_anchors(DetectionModel({**cfg, "anchors": equal})), torch.full((3, 3, 2), 2.0))


def test_detect_bias_priors():
    """YOLOv5's priors: objectness for 8 objects per 640 image, class prior 0.6 / (nc - 0.99999)."""
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=80)
    head = model.detect_head
    plain = torch.nn.Conv2d(head.m[0].in_channels, head.m[0].out_channels, 1)  # default-initialised bias range
    bound = 1 / math.sqrt(plain.in_channels)
    for conv, stride in zip(head.m, (8, 16, 32)):
        bias = conv.bias.detach().view(3, -1)
        obj_prior = math.log(8 / (640 / stride) ** 2)
        cls_prior = math.log(0.6 / (80 - 0.99999))
        assert ((bias[:, 4] - obj_prior).abs() <= bound + 1e-6).all()
        assert ((bias[:, 5:] - cls_prior).abs() <= bound + 1e-6).all()


def test_fuse_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", nc=4)
    model.train()(torch.rand(4, 3, 64, 64))  # move BN statistics away from their initial values
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before, _ = model(x)
        after, _ = model.fuse()(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)


def test_batchnorm_settings_follow_yolov5():
    model = build_model("yolov5n.yaml")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in bns)


def write_yaml(tmp_path, cfg) -> str:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg) if not isinstance(cfg, str) else cfg)
    return str(path)


def base_cfg() -> dict:
    return yaml.safe_load((REPO_ROOT / "models" / "yolov5n.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["backbone"].__setitem__(2, [-1, 1, "C2x", [128]]), "unknown block 'C2x'"),
        (lambda c: c.pop("anchors"), "Detect [nc, anchors] needs the anchors key"),
        (lambda c: c.__setitem__("nc", "eighty"), "nc must be a positive integer"),
        (lambda c: c.__setitem__("anchors", 0), "anchors given as a count (anchors per level, fitted to the data)"),
        (lambda c: c["head"].__setitem__(0, [30, 1, "Conv", [512, 1, 1]]), "does not name an earlier layer"),
        (lambda c: c["head"].__setitem__(0, "__import__('os').system('true')"), "must be [from, number, module, args]"),
    ],
)
def test_bad_model_yaml_is_a_clear_error(tmp_path, mutate, message):
    cfg = base_cfg()
    mutate(cfg)
    path = write_yaml(tmp_path, cfg)
    with pytest.raises(UserError) as error:
        read_model_yaml(path)
    assert message in str(error.value) and path in str(error.value)


def test_unparseable_and_missing_yaml(tmp_path):
    path = write_yaml(tmp_path, "nc: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_model_yaml(path)
    with pytest.raises(UserError, match="no model YAML .*absent.yaml: give a path, or one of the shipped models"):
        read_model_yaml(tmp_path / "absent.yaml")


def test_nc_override_keeps_the_yaml_consistent(caplog):
    caplog.set_level("INFO")
    model = DetectionModel(base_cfg(), nc=6)
    assert model.nc == 6 and model.yaml["nc"] == 6 and model.detect_head.no == 11
    # through the project's one logger, which is quiet on torchrun ranks other than 0 (utils/log.py)
    assert [r.name for r in caplog.records if "Overriding model nc" in r.message] == [LOGGER.name]


def test_ultralytics_scale_comes_from_the_file_name(tmp_path, caplog):
    """yolo11s.yaml reads yolo11.yaml at scale s (recorded in the config); the bare name warns and takes n."""
    assert read_model_yaml("yolo11s.yaml")["scale"] == "s"
    assert read_model_yaml("yolov5mu.yaml")["scale"] == "m"
    caplog.set_level("WARNING")
    assert read_model_yaml("yolov8.yaml")["scale"] == "n"
    assert "names no scale: using scale 'n'" in caplog.text
    cfg = read_model_yaml("yolov8.yaml")
    (tmp_path / "mine8s.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "scale"}))
    assert read_model_yaml(tmp_path / "mine8s.yaml")["scale"] == "s"
    model = DetectionModel(read_model_yaml("yolo11s.yaml"))
    assert DetectionModel(model.yaml).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["scales"].__setitem__("n", [0.5, 0.25]), "scale 'n' must be [depth, width, max_channels]"),
        (lambda c: c.__setitem__("scale", "q"), "scale 'q' is not one of"),
        (lambda c: c["backbone"].__setitem__(10, [-1, 2, "C2PSA", [1024, 0.5, 7, 9]]), "layer 10 (C2PSA"),
    ],
)
def test_bad_ultralytics_yaml_is_a_clear_error(tmp_path, mutate, message):
    cfg = yaml.safe_load((REPO_ROOT / "models" / "yolo11.yaml").read_text())
    cfg["scale"] = "n"
    mutate(cfg)
    path = write_yaml(tmp_path, cfg)
    with pytest.raises(UserError) as error:
        DetectionModel(read_model_yaml(path))
    assert message in str(error.value)
