"""Every option of train.py, val.py, detect.py, export.py and average.py, and every hyp key, is checked
up front (finite, in range): a bad value is one UserError naming it, raised before any work; an
option that acts on nothing is warned about (utils/option_checks.py, utils/hyp.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

import average
import detect
import export
import train
import val
from tests.conftest import REPO_ROOT, tiny_train_args
from utils.errors import UserError
from utils.hyp import CHOICE_KEYS, LOSS_KEYS, OPTIONAL_DEFAULTS, OPTIONAL_KEYS, REQUIRED_KEYS, load_hyp


def test_every_hyp_key_has_a_range_and_the_shipped_files_are_in_it():
    from utils.hyp import RANGES

    numeric = {*REQUIRED_KEYS, *OPTIONAL_DEFAULTS, *OPTIONAL_KEYS, *(k for keys in LOSS_KEYS.values() for k in keys)}
    assert numeric - set(CHOICE_KEYS) == set(RANGES)
    for path in sorted((REPO_ROOT / "hyp").glob("*.yaml")):
        load_hyp(path, anchor_free=path.stem == "anchor-free")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr0", math.nan, "lr0 must be a finite number"),
        ("lr0", math.inf, "lr0 must be a finite number"),
        ("lr0", 0.0, "lr0 must be in (0, inf)"),
        ("lrf", 1.5, "lrf must be in [0, 1]"),
        ("momentum", 1.0, "momentum must be in [0, 1)"),
        ("weight_decay", -0.1, "weight_decay must be in [0, 1)"),
        ("warmup_epochs", math.nan, "warmup_epochs must be a finite number"),
        ("warmup_momentum", 1.2, "warmup_momentum must be in [0, 1)"),
        ("box", -1.0, "box must be in [0, inf)"),
        ("cls_pw", 0.0, "cls_pw must be in (0, inf)"),
        ("iou_t", 1.5, "iou_t must be in [0, 1]"),
        ("anchor_t", 1.0, "anchor_t must be in (1, inf) (a size ratio; at most 1 matches no anchor)"),
        ("fl_gamma", -0.5, "fl_gamma must be in [0, inf)"),
        ("hsv_h", 1.5, "hsv_h must be in [0, 1]"),
        ("degrees", 200.0, "degrees must be in [0, 180]"),
        ("translate", 1.5, "translate must be in [0, 1]"),
        ("scale", 1.0, "scale must be in [0, 1)"),
        ("shear", 90.0, "shear must be in [0, 90)"),
        ("perspective", 0.1, "perspective must be in [0, 0.001]"),
        ("mixup", 1.01, "mixup must be in [0, 1] (a probability)"),
        ("blur", math.nan, "blur must be a finite number"),
        ("ema_tau", 0.0, "ema_tau must be in (0, inf)"),
        ("ema_ramp", -1.0, "ema_ramp must be in (0, inf)"),
        ("close_mosaic", -1, "close_mosaic must be in [0, inf)"),
        ("auto_lr0", math.nan, "auto_lr0 must be a finite number"),
        ("auto_momentum", 1.0, "auto_momentum must be in [0, 1)"),
        ("graft_c", math.inf, "graft_c must be a finite number"),
        ("graft_bins", 1, "graft_bins must be in [2, inf)"),
    ],
)
def test_hyp_values_out_of_range_are_named(tmp_path, key, value, message):
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({**hyp, key: value}))
    with pytest.raises(UserError) as error:
        load_hyp(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_a_nan_in_the_hyp_file_stops_train_py_before_the_run_folder(tiny_dataset, tmp_path):
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({**hyp, "lr0": math.nan}))
    project = tmp_path / "runs"
    with pytest.raises(UserError, match="lr0 must be a finite number"):
        train.main(tiny_train_args(tiny_dataset, project, "--epochs", "1", "--hyp", str(path)))
    assert not project.exists() or not any(project.iterdir())


# val.py and detect.py refuse these before reading --weights (here a file that does not exist).
DETECTION_OPTIONS = [
    (["--conf-thres", "1.5"], "--conf-thres 1.5: must be in [0, 1] (a confidence)"),
    (["--conf-thres", "-0.1"], "--conf-thres -0.1: must be in [0, 1]"),
    (["--conf-thres", "nan"], "--conf-thres nan: must be in [0, 1]"),
    (["--iou-thres", "2"], "--iou-thres 2: must be in [0, 1] (an IoU)"),
    (["--max-det", "0"], "--max-det 0: must be in [1, inf)"),
    (["--imgsz", "0"], "--imgsz 0: must be in [1, inf)"),
]


@pytest.mark.parametrize("extra, message", DETECTION_OPTIONS)
def test_val_options_out_of_range(tmp_path, extra, message):
    with pytest.raises(UserError) as error:
        val.main(["--weights", str(tmp_path / "none.pt"), "--project", str(tmp_path / "runs"), *extra])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        *DETECTION_OPTIONS,
        (["--classes", "-1"], "--classes -1: class ids are not negative"),
        (["--line-thickness", "0"], "--line-thickness 0: must be in [1, inf)"),
    ],
)
def test_detect_options_out_of_range(tmp_path, extra, message):
    argv = ["--weights", str(tmp_path / "none.pt"), "--source", str(tmp_path), "--project", str(tmp_path / "runs")]
    with pytest.raises(UserError) as error:
        detect.main([*argv, *extra])
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def one_image(tiny_dataset, tmp_path):
    """A folder holding one image of the tiny dataset."""
    image = next((tiny_dataset.parent / "shapes" / "images" / "val").iterdir())
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    return folder


def test_detect_refuses_classes_the_model_lacks(tiny_run, one_image, tmp_path):
    argv = ["--weights", str(tiny_run / "weights" / "best.pt"), "--source", str(one_image)]
    with pytest.raises(UserError, match=r"--classes 7: the model detects classes 0 to 5 \(0 circle, 1 triangle"):
        detect.main([*argv, "--project", str(tmp_path / "runs"), "--classes", "0", "7"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"conf_thres": 1.5}, "conf_thres 1.5: must be in [0, 1] (a confidence)"),
        ({"conf_thres": math.nan}, "conf_thres nan: must be in [0, 1]"),
        ({"conf_thres": "0.5"}, "conf_thres '0.5': must be a number in [0, 1]"),
        ({"iou_thres": -0.1}, "iou_thres -0.1: must be in [0, 1] (an IoU)"),
        ({"max_det": 0}, "max_det 0: must be in [1, inf)"),
        ({"imgsz": 0}, "imgsz 0: must be in [1, inf) (pixels)"),
        ({"classes": [0, 7]}, "classes 7: the model detects classes 0 to 5 (0 circle, 1 triangle"),
        ({"classes": -1}, "classes -1: the model detects classes 0 to 5"),
        ({"classes": True}, "classes True: class ids are integers"),
        ({"classes": [0, 1.5]}, "classes [0, 1.5]: class ids are integers"),
        ({"classes": "0"}, "classes '0': give a class id or a list of them"),
    ],
)
def test_the_python_api_checks_its_options_as_detect_py_does(tiny_run, options, message):
    """Detector(...) and torch.hub's custom(...) refuse what detect.py refuses, named as the API names it."""
    import hubconf
    from utils.infer.predictor import Detector

    for make in (Detector, hubconf.custom):
        with pytest.raises(UserError) as error:
            make(str(tiny_run / "weights" / "best.pt"), **options)
        assert message in str(error.value)


def test_the_python_api_takes_one_class_as_an_int(tiny_run, one_image):
    from utils.infer.predictor import Detector

    detector = Detector(tiny_run / "weights" / "best.pt", classes=np.int64(2), conf_thres=0.0)
    (result,) = detector(next(one_image.iterdir()))
    assert detector.classes == [2] and len(result.classes) and set(result.classes.tolist()) == {2}


def test_detect_warns_about_options_without_effect(tiny_run, one_image, tmp_path, capsys):
    argv = ["--weights", str(tiny_run / "weights" / "best.pt"), "--source", str(one_image)]
    detect.main([*argv, "--project", str(tmp_path / "runs"), "--save-conf", "--nosave", "--hide-conf"])
    out = capsys.readouterr().out
    assert (
        "WARNING: --save-conf has no effect: it adds confidences to --save-txt's labels, and --save-txt is off" in out
    )
    assert "WARNING: --hide-conf has no effect: --nosave draws no images" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--include", "onnx", "--opset", "99"], "--opset 99: must be in [7, 23]"),
        (["--include", "onnx", "--opset", "0"], "--opset 0: must be in [7, 23]"),
    ],
)
def test_export_options_out_of_range(tmp_path, extra, message):
    with pytest.raises(UserError) as error:
        export.main(["--weights", str(tmp_path / "none.pt"), *extra])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sigma-rel", "nan"], "--sigma-rel nan: a power EMA's relative width must be in (0, 0.2887), got nan"),
        (["--sigma-rel", "0.1", "--at-epoch", "-1"], "--at-epoch -1: must be in [0, inf)"),
        (["--sigma-rel", "0.1", "--imgsz", "0"], "--imgsz 0: must be in [1, inf)"),
    ],
)
def test_average_options_out_of_range(tmp_path, extra, message):
    with pytest.raises(UserError) as error:
        average.main(["--posthoc", str(tmp_path / "no_run"), "--out", str(tmp_path / "out.pt"), *extra])
    assert message in str(error.value)


def test_train_warns_about_options_without_effect_and_a_partial_transfer(tiny_run, tiny_dataset, tmp_path, capsys):
    """--cfg yolov5s.yaml from yolov5n weights transfers almost nothing: a warning, not an info line;
    --autobatch-fraction without --batch-size -1 and --trust-pickle without --weights act on nothing."""
    weights = tiny_run / "weights" / "last.pt"
    with pytest.raises(UserError, match="would freeze the Detect head"):  # stopped after the checks, before any work
        train.main(
            tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--autobatch-fraction", "0.5", "--trust-pickle")
            + ["--freeze", "25"]
        )
    out = capsys.readouterr().out
    assert "WARNING: --trust-pickle only acts on a --weights file; ignored" in out
    assert "WARNING: --autobatch-fraction 0.5 only acts with --batch-size -1 (AutoBatch); ignored" in out
    with pytest.raises(UserError, match="would freeze the Detect head"):  # after the transfer, before any work
        train.main(
            tiny_train_args(tiny_dataset, tmp_path, "--epochs", "1", "--weights", str(weights), "--cfg", "yolov5s.yaml")
            + ["--freeze", "25"]
        )
    out = capsys.readouterr().out
    assert "WARNING: only " in out and "of --cfg yolov5s.yaml differ in name or shape and start from scratch" in out
