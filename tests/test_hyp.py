"""Hyperparameter files: YOLOv5's three recipes load unchanged; mistakes are named."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO_ROOT
from utils.errors import UserError
from utils.hyp import LOSS_KEYS, OPTIONAL_DEFAULTS, OPTIONAL_KEYS, REQUIRED_KEYS, load_hyp


@pytest.mark.parametrize("name", ["scratch-low.yaml", "scratch-med.yaml", "scratch-high.yaml", "hyp.scratch-low.yaml"])
def test_shipped_recipes_load(name):
    hyp = load_hyp(name)
    assert set(hyp) == set(REQUIRED_KEYS) | set(OPTIONAL_DEFAULTS) | set(LOSS_KEYS["anchor-based"])
    assert hyp["ema_decay"] == 0.9999 and hyp["ema_tau"] == 2000


def test_anchor_free_recipe_has_ultralytics_gains_and_is_the_default_for_anchor_free_models():
    hyp = load_hyp(None, anchor_free=True)
    assert set(hyp) == set(REQUIRED_KEYS) | set(OPTIONAL_DEFAULTS) | set(OPTIONAL_KEYS) | set(LOSS_KEYS["anchor-free"])
    assert (hyp["box"], hyp["cls"], hyp["dfl"], hyp["close_mosaic"]) == (7.5, 0.5, 1.5, 10)
    assert load_hyp(None) == load_hyp("scratch-low.yaml")


def test_a_recipe_for_the_other_head_is_refused_with_the_right_one_named():
    with pytest.raises(UserError, match=r"missing dfl, which the anchor-free head's loss needs \(hyp/anchor-free.yaml"):
        load_hyp("scratch-low.yaml", anchor_free=True)
    with pytest.raises(UserError, match=r"missing cls_pw, obj, .*hyp/scratch-low.yaml is the anchor-based recipe"):
        load_hyp("anchor-free.yaml")


def test_scratch_low_has_yolov5_values():
    hyp = load_hyp("scratch-low.yaml")
    assert (hyp["lr0"], hyp["lrf"], hyp["momentum"], hyp["weight_decay"]) == (0.01, 0.01, 0.937, 0.0005)
    assert (hyp["box"], hyp["cls"], hyp["obj"], hyp["anchor_t"], hyp["mosaic"], hyp["fliplr"]) == (
        0.05,
        0.5,
        1.0,
        4.0,
        1.0,
        0.5,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr0": None}, "lr0 must be a finite number"),
        ({"mosaic": 1.5}, "mosaic must be in [0, 1] (a probability)"),
        ({"lr_zero": 0.01}, "unknown key(s) lr_zero"),
        ({"anchors": 3}, "automatic anchor fitting"),
        ({"ema_decay": 1.0}, "ema_decay must be in (0, 1)"),
        ({"close_mosaic": 2.5}, "close_mosaic is a whole number (a number of epochs)"),
        ({"mosaic_pool": 1}, "mosaic_pool 1 leaves a mosaic no other image to take"),
        ({"mosaic_pool": -16}, "mosaic_pool must be in [0, inf)"),
        ({"ema_warmup": "linear"}, "ema_warmup must be one of exponential, tensorflow, got 'linear'"),
        ({"ema_warmup": 1}, "ema_warmup must be one of exponential, tensorflow, got 1"),
    ],
)
def test_bad_values_are_named(tmp_path, change, message):
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({**hyp, **change}))
    with pytest.raises(UserError) as error:
        load_hyp(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_keys_are_listed(tmp_path):
    path = tmp_path / "hyp.yaml"
    path.write_text("lr0: 0.01\n")
    with pytest.raises(UserError, match="missing lrf, momentum"):
        load_hyp(path)


def test_values_keep_their_types(tmp_path):
    """Counts stay integers (hyp.yaml and checkpoints show close_mosaic: 10), choices words, the rest
    floats even where a file writes them as integers (torch.tensor([obj_pw]) must be a float tensor)."""
    hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({**hyp, "close_mosaic": 10.0, "obj_pw": 1, "mosaic": 1}))
    loaded = load_hyp(path)
    assert loaded["close_mosaic"] == 10 and type(loaded["close_mosaic"]) is int
    assert loaded["ema_warmup"] == "exponential"
    assert type(loaded["graft_bins"]) is int and type(loaded["mosaic_pool"]) is int
    counts = ("close_mosaic", "mosaic_pool", "graft_bins")
    assert all(type(v) is float for k, v in loaded.items() if k not in (*counts, "ema_warmup"))
