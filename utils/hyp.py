"""Hyperparameters: YOLOv5's hyp YAML keys (or, for the anchor-free head, its loss gains) plus a
few of ours with defaults, validated once."""

from __future__ import annotations

import math
from pathlib import Path

from utils.config_files import read_yaml, resolve_config_path
from utils.errors import UserError
from utils.option_checks import in_interval, interval

# Keys every hyp file has, whichever the head.
REQUIRED_KEYS = (
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "warmup_momentum",
    "warmup_bias_lr",
    "box",
    "cls",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "copy_paste",
)
# The loss keys of each head. `iou_t` is kept for YOLOv5 file compatibility; YOLOv5 does not use it either.
LOSS_KEYS = {
    "anchor-based": ("cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma"),
    "anchor-free": ("dfl",),
}
# The hyp file a run uses when --hyp is not given, per head.
DEFAULT_HYP = {"anchor-based": "scratch-low.yaml", "anchor-free": "anchor-free.yaml"}
# Ours, optional in the file: albumentations probabilities (YOLOv5 hard-codes 0.01), the EMA, and
# the number of final epochs trained without mosaic (0: mosaic to the end, as YOLOv5), and the
# AdamW learning rate that --optimizer auto takes for short runs.
OPTIONAL_DEFAULTS = {
    "blur": 0.01,
    "median_blur": 0.01,
    "to_gray": 0.01,
    "clahe": 0.01,
    "ema_decay": 0.9999,
    "ema_tau": 2000.0,
    # The default EMA's ramp: "exponential" (YOLOv5's decay * (1 - exp(-steps / ema_tau))) or
    # "tensorflow" (TensorFlow's ExponentialMovingAverage with num_updates: min(decay, (1 + n) / (10 + n))).
    "ema_warmup": "exponential",
    # train.py --ema images (and the ema-images average): a half-life in images, capped early on at
    # ema_ramp times the images seen so far (EDM2's traditional EMA). 443,000 images is the
    # half-life of YOLOv5's d = 0.9999 at the nominal 64 images per step, so long runs average as
    # YOLOv5's; short runs get the ramp's 5% of the images seen.
    "ema_half_life": 443000.0,
    "ema_ramp": 0.05,
    "close_mosaic": 0,
    # 0: a mosaic's three partners are drawn from the whole split, as YOLOv5 does. G > 0: from a
    # pool of G images of the epoch's order, which the sampler keeps inside one batch, so each
    # image is decoded once, not four times (a loader reading from disk 1.6x faster). Opt-in: its
    # accuracy against YOLOv5's draw is not established (README, Hyperparameters).
    "mosaic_pool": 0,
    "auto_lr0": 0.003,
    # train.py --graft (filter grafting, Meng et al. 2020): alpha = graft_a / pi * arctan(graft_c * (H_own -
    # H_other)) + 0.5, H the entropy of a layer's weights over graft_bins bins; the authors' constants.
    "graft_a": 0.4,
    "graft_c": 500.0,
    "graft_bins": 10,
}
# Ours, optional, with no default: AdamW's beta1 from --optimizer auto (else the hyp's momentum).
OPTIONAL_KEYS = ("auto_momentum",)
INTEGER_KEYS = ("close_mosaic", "mosaic_pool", "graft_bins")  # counts
CHOICE_KEYS = {"ema_warmup": ("exponential", "tensorflow")}  # words; every other value is a finite number
PROBABILITY_KEYS = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste", "blur", "median_blur", "to_gray", "clahe")
INF = math.inf
# Every numeric key's range: (low, high, low included, high included, what the value is).
PROBABILITY = (0.0, 1.0, True, True, "a probability")
MOMENTUM = (0.0, 1.0, True, False, "a momentum")
GAIN = (0.0, INF, True, False, "a loss gain")
RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "lr0": (0.0, INF, False, False, "the initial learning rate"),
    "lrf": (0.0, 1.0, True, True, "the final learning rate as a fraction of lr0"),
    "momentum": MOMENTUM,
    "weight_decay": (0.0, 1.0, True, False, "a weight decay"),
    "warmup_epochs": (0.0, INF, True, False, "epochs (fractions ok)"),
    "warmup_momentum": MOMENTUM,
    "warmup_bias_lr": (0.0, INF, True, False, "a learning rate"),
    "box": GAIN,
    "cls": GAIN,
    "obj": GAIN,
    "dfl": GAIN,
    "cls_pw": (0.0, INF, False, False, "a BCE positive weight"),
    "obj_pw": (0.0, INF, False, False, "a BCE positive weight"),
    "iou_t": (0.0, 1.0, True, True, "an IoU"),
    # a target matches an anchor when max(wh / anchor, anchor / wh) < anchor_t, a ratio of at least 1
    "anchor_t": (1.0, INF, False, False, "a size ratio; at most 1 matches no anchor"),
    "fl_gamma": (0.0, INF, True, False, "a focal loss exponent (0: plain BCE)"),
    "hsv_h": (0.0, 1.0, True, True, "a gain fraction"),
    "hsv_s": (0.0, 1.0, True, True, "a gain fraction"),
    "hsv_v": (0.0, 1.0, True, True, "a gain fraction"),
    "degrees": (0.0, 180.0, True, True, "a rotation in +/- degrees"),
    "translate": (0.0, 1.0, True, True, "a translation in +/- image fractions"),
    "scale": (0.0, 1.0, True, False, "a scale gain 1 +/- scale, which must stay above 0"),
    "shear": (0.0, 90.0, True, False, "a shear in +/- degrees"),
    "perspective": (0.0, 0.001, True, True, "a perspective fraction (YOLOv5's range)"),
    **dict.fromkeys(PROBABILITY_KEYS, PROBABILITY),
    "ema_decay": (0.0, 1.0, False, False, "a decay"),
    "ema_tau": (0.0, INF, False, False, "optimizer steps"),
    "ema_half_life": (0.0, INF, False, False, "a number of images"),
    "ema_ramp": (0.0, INF, False, False, "a share of the images seen"),
    "close_mosaic": (0.0, INF, True, False, "a number of epochs"),
    "mosaic_pool": (0.0, INF, True, False, "a number of images, 0 for the whole split"),
    "auto_lr0": (0.0, INF, False, False, "AdamW's learning rate"),
    "auto_momentum": (0.0, 1.0, True, False, "AdamW's beta1"),
    "graft_a": (0.0, 1.0, False, True, "the share kept stays within 0.5 +- graft_a / 2"),
    "graft_c": (0.0, INF, False, False, "an entropy gain"),
    "graft_bins": (2.0, INF, True, False, "a number of histogram bins"),
}


def head_family(anchor_free: bool) -> str:
    """The key of LOSS_KEYS and DEFAULT_HYP for a model's head."""
    return "anchor-free" if anchor_free else "anchor-based"


def default_hyp_path(anchor_free: bool) -> str:
    """The hyp file a model trains with when --hyp is not given."""
    return f"hyp/{DEFAULT_HYP[head_family(anchor_free)]}"


def load_hyp(name_or_path: str | Path | None, anchor_free: bool = False) -> dict:
    """Read a hyp YAML (None: the head's default), fill our optional keys, validate it for the
    model's head; UserError names the file and the key."""
    path = resolve_config_path(name_or_path or default_hyp_path(anchor_free), "hyp", strip_prefix="hyp.")
    return validate_hyp(read_yaml(path, "hyperparameter file"), source=str(path), anchor_free=anchor_free)


def validate_hyp(raw: object, source: str, anchor_free: bool = False) -> dict:
    """Check a hyp mapping for a model with the given head and return it with the optional keys filled in."""
    if not isinstance(raw, dict):
        raise UserError(f"hyperparameter file {source}: expected a mapping of names to numbers")
    family = head_family(anchor_free)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserError(f"hyperparameter file {source}: missing {', '.join(missing)}")
    missing = [k for k in LOSS_KEYS[family] if k not in raw]
    if missing:
        raise UserError(
            f"hyperparameter file {source}: missing {', '.join(missing)}, which the {family} head's loss "
            f"needs (hyp/{DEFAULT_HYP[family]} is the {family} recipe)"
        )
    if "anchors" in raw:
        raise UserError(
            f"hyperparameter file {source}: 'anchors' asks for automatic anchor fitting, "
            "whose anchor count comes from the model YAML here: give `anchors: N` there instead"
        )
    known = {*REQUIRED_KEYS, *OPTIONAL_DEFAULTS, *OPTIONAL_KEYS, *(k for keys in LOSS_KEYS.values() for k in keys)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"hyperparameter file {source}: unknown key(s) {', '.join(unknown)}")
    hyp = {**OPTIONAL_DEFAULTS, **raw}
    for key, value in hyp.items():
        if key in CHOICE_KEYS:
            if value not in CHOICE_KEYS[key]:
                raise UserError(
                    f"hyperparameter file {source}: {key} must be one of {', '.join(CHOICE_KEYS[key])}, got {value!r}"
                )
            continue
        check_hyp_value(key, value, source)
    if hyp["mosaic_pool"] == 1:
        raise UserError(
            f"hyperparameter file {source}: mosaic_pool 1 leaves a mosaic no other image to take: give 0 "
            "(partners from the whole split) or a pool of at least 2 images"
        )
    return {k: v if k in CHOICE_KEYS else int(v) if k in INTEGER_KEYS else float(v) for k, v in hyp.items()}


def check_hyp_value(key: str, value: object, source: str) -> None:
    """UserError unless `value` is a finite number in RANGES[key] (a whole one for INTEGER_KEYS): a NaN
    would pass any comparison and end the run an epoch later."""
    low, high, low_in, high_in, meaning = RANGES[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"hyperparameter file {source}: {key} must be a finite number ({meaning}), got {value!r}")
    if key in INTEGER_KEYS and value != int(value):
        raise UserError(f"hyperparameter file {source}: {key} is a whole number ({meaning}), got {value}")
    if not in_interval(value, low, high, low_in, high_in):
        raise UserError(
            f"hyperparameter file {source}: {key} must be in {interval(low, high, low_in, high_in)} ({meaning}), "
            f"got {value:g}"
        )
