"""Hyperparameters: YOLOv5's hyp YAML keys plus a few of ours with defaults, validated once."""

from __future__ import annotations

from pathlib import Path

from utils.config_files import read_yaml, resolve_config_path
from utils.errors import UserError

# Keys every YOLOv5 hyp file has. `iou_t` is kept for file compatibility; YOLOv5 does not use it either.
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
    "cls_pw",
    "obj",
    "obj_pw",
    "iou_t",
    "anchor_t",
    "fl_gamma",
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
# Ours, optional in the file: albumentations probabilities (YOLOv5 hard-codes 0.01), the EMA, and
# the number of final epochs trained without mosaic (0: mosaic to the end, as YOLOv5).
OPTIONAL_DEFAULTS = {
    "blur": 0.01,
    "median_blur": 0.01,
    "to_gray": 0.01,
    "clahe": 0.01,
    "ema_decay": 0.9999,
    "ema_tau": 2000.0,
    "close_mosaic": 0,
}
INTEGER_KEYS = ("close_mosaic",)  # counts; every other value is a float
PROBABILITY_KEYS = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste", "blur", "median_blur", "to_gray", "clahe")


def load_hyp(name_or_path: str | Path) -> dict:
    """Read a hyp YAML, fill our optional keys, validate; UserError names the file and the key."""
    path = resolve_config_path(name_or_path, "hyp", strip_prefix="hyp.")
    return validate_hyp(read_yaml(path, "hyperparameter file"), source=str(path))


def validate_hyp(raw: object, source: str) -> dict:
    """Check a hyp mapping and return it with the optional keys filled in."""
    if not isinstance(raw, dict):
        raise UserError(f"hyperparameter file {source}: expected a mapping of names to numbers")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserError(f"hyperparameter file {source}: missing {', '.join(missing)}")
    if "anchors" in raw:
        raise UserError(
            f"hyperparameter file {source}: 'anchors' asks for automatic anchor fitting, "
            "which is not supported; set anchors in the model YAML instead"
        )
    unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_DEFAULTS))
    if unknown:
        raise UserError(f"hyperparameter file {source}: unknown key(s) {', '.join(unknown)}")
    hyp = {**OPTIONAL_DEFAULTS, **raw}
    for key, value in hyp.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"hyperparameter file {source}: {key} must be a non-negative number, got {value!r}")
        if key in PROBABILITY_KEYS and value > 1:
            raise UserError(f"hyperparameter file {source}: {key} is a probability, got {value}")
    if hyp["close_mosaic"] != int(hyp["close_mosaic"]):
        raise UserError(f"hyperparameter file {source}: close_mosaic is a number of epochs, got {hyp['close_mosaic']}")
    if not 0 < hyp["ema_decay"] < 1 or hyp["ema_tau"] <= 0:
        raise UserError(f"hyperparameter file {source}: ema_decay must be in (0, 1) and ema_tau > 0")
    return {k: int(v) if k in INTEGER_KEYS else float(v) for k, v in hyp.items()}
