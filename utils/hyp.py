"""Hyperparameters: YOLOv5's hyp YAML keys (or, for the anchor-free head, its loss gains) plus a
few of ours with defaults, validated once."""

from __future__ import annotations

from pathlib import Path

from utils.config_files import read_yaml, resolve_config_path
from utils.errors import UserError

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
    "auto_lr0": 0.003,
    # train.py --graft (filter grafting, Meng et al. 2020): alpha = graft_a / pi * arctan(graft_c * (H_own -
    # H_other)) + 0.5, H the entropy of a layer's weights over graft_bins bins; the authors' constants.
    "graft_a": 0.4,
    "graft_c": 500.0,
    "graft_bins": 10,
}
# Ours, optional, with no default: AdamW's beta1 from --optimizer auto (else the hyp's momentum).
OPTIONAL_KEYS = ("auto_momentum",)
INTEGER_KEYS = ("close_mosaic", "graft_bins")  # counts
CHOICE_KEYS = {"ema_warmup": ("exponential", "tensorflow")}  # words; every other value is a float
PROBABILITY_KEYS = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste", "blur", "median_blur", "to_gray", "clahe")


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
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"hyperparameter file {source}: {key} must be a non-negative number, got {value!r}")
        if key in PROBABILITY_KEYS and value > 1:
            raise UserError(f"hyperparameter file {source}: {key} is a probability, got {value}")
    if hyp["close_mosaic"] != int(hyp["close_mosaic"]):
        raise UserError(f"hyperparameter file {source}: close_mosaic is a number of epochs, got {hyp['close_mosaic']}")
    if not 0 < hyp["ema_decay"] < 1 or hyp["ema_tau"] <= 0:
        raise UserError(f"hyperparameter file {source}: ema_decay must be in (0, 1) and ema_tau > 0")
    if not 0 < hyp["graft_a"] <= 1 or hyp["graft_c"] <= 0:
        raise UserError(
            f"hyperparameter file {source}: graft_a must be in (0, 1] (the share kept stays within 0.5 +- graft_a / 2) "
            "and graft_c above 0"
        )
    if hyp["graft_bins"] < 2 or hyp["graft_bins"] != int(hyp["graft_bins"]):
        raise UserError(f"hyperparameter file {source}: graft_bins is a number of histogram bins, at least 2")
    if hyp["ema_half_life"] <= 0:
        raise UserError(f"hyperparameter file {source}: ema_half_life is a number of images, above 0")
    return {k: v if k in CHOICE_KEYS else int(v) if k in INTEGER_KEYS else float(v) for k, v in hyp.items()}
