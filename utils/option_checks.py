"""Range checks shared by the scripts' options and the hyp file: a value must be finite and inside
its interval, else one UserError that names the option, the value and the interval."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from utils.errors import UserError
from utils.log import LOGGER


def interval(low: float, high: float = math.inf, low_in: bool = True, high_in: bool = True) -> str:
    """[low, high], (low, high), ... as written in the messages; an infinite end is open."""
    left = "[" if low_in and math.isfinite(low) else "("
    right = "]" if high_in and math.isfinite(high) else ")"
    return f"{left}{low:g}, {high:g}{right}"


def in_interval(value: float, low: float, high: float = math.inf, low_in: bool = True, high_in: bool = True) -> bool:
    """Whether `value` is finite and inside the interval (a NaN is inside none)."""
    if not math.isfinite(value):
        return False
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def check_range(
    option: str,
    value: float | None,
    low: float,
    high: float = math.inf,
    low_in: bool = True,
    high_in: bool = True,
    meaning: str = "",
) -> None:
    """UserError '--option VALUE: must be in [low, high] (meaning)' unless `value` (None: not given,
    nothing to check) is finite and inside the interval; one that is no number (from the Python API) too."""
    why = f" ({meaning})" if meaning else ""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise UserError(f"{option} {value!r}: must be a number in {interval(low, high, low_in, high_in)}{why}")
    if value is None or in_interval(value, low, high, low_in, high_in):
        return
    raise UserError(f"{option} {value:g}: must be in {interval(low, high, low_in, high_in)}{why}")


def warn_no_effect(given: dict[str, bool], reason: str) -> None:
    """One warning naming the options given (those whose value is True) that `reason` makes act on nothing."""
    names = [name for name, was_given in given.items() if was_given]
    if names:
        LOGGER.warning(f"WARNING: {' '.join(names)} {'has' if len(names) == 1 else 'have'} no effect: {reason}")


def option_name(option: str, api: bool) -> str:
    """'--conf-thres' as the command line spells it, or 'conf_thres' as the Python API does."""
    return option.removeprefix("--").replace("-", "_") if api else option


def check_detection_options(
    conf_thres: float, iou_thres: float | None, max_det: int, imgsz: int | None, api: bool = False
) -> None:
    """val.py's, detect.py's and the Detector's shared options (named as the API names them when `api`):
    thresholds in [0, 1], at least one detection, a positive size."""
    check_range(option_name("--conf-thres", api), conf_thres, 0, 1, meaning="a confidence")
    check_range(option_name("--iou-thres", api), iou_thres, 0, 1, meaning="an IoU")
    check_range(option_name("--max-det", api), max_det, 1, meaning="detections kept per image; 0 would keep none")
    check_range(option_name("--imgsz", api), imgsz, 1, meaning="pixels")


def class_id_list(classes) -> list[int] | None:
    """The Python API's `classes`: None, one class id or a sequence of them, as a list; anything else
    (a bool, a float, a string) is a UserError rather than a filter that silently keeps nothing."""
    if classes is None:
        return None
    items = [classes] if isinstance(classes, numbers.Integral) else classes
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise UserError(f"classes {classes!r}: give a class id or a list of them")
    items = list(items)
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in items) or isinstance(classes, bool):
        raise UserError(f"classes {classes!r}: class ids are integers")
    return [int(c) for c in items]


def check_class_ids(classes: list[int] | None, names: list[str], api: bool = False) -> None:
    """--classes: ids the model detects (0 .. nc - 1), else UserError listing them."""
    unknown = [c for c in classes or () if not 0 <= c < len(names)]
    if unknown:
        listed = ", ".join(f"{i} {name}" for i, name in enumerate(names[:20])) + (", ..." if len(names) > 20 else "")
        raise UserError(
            f"{option_name('--classes', api)} {' '.join(map(str, unknown))}: "
            f"the model detects classes 0 to {len(names) - 1} ({listed})"
        )
