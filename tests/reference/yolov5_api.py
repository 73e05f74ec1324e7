"""What benchmarks/harness_yolov5.py takes from the `yolov5` package (7.0.14), in one place, and its check.

USED names each module the harness imports, each name it takes from it, and how the harness calls
it: the parameters it passes by position (their names, in order) and by keyword. FILES are the
package's data files it reads. tests/test_benchmarks.py holds the harness to this table (its imports
and calls, read from its source), the stand-in package of yolov5_standin/ to it, and, given a
reference venv, the real package to it. Run by the interpreter that holds the package to check:

    EMA_YOLO_REF_VENV/bin/python tests/reference/yolov5_api.py    # prints a JSON list of what is missing

Standard library only: the reference venv runs this file without our requirements.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

# module -> name -> (positional parameters, keyword parameters) the harness passes; None: not called
USED: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None]] = {
    "yolov5.train": {"__version__": None},
    "yolov5.models.yolo": {"Model": (("cfg",), ("ch", "nc"))},
    "yolov5.utils.dataloaders": {
        "create_dataloader": (
            ("path", "imgsz", "batch_size", "stride"),
            ("hyp", "augment", "workers", "prefix", "shuffle", "seed"),
        )
    },
    "yolov5.utils.torch_utils": {
        "ModelEMA": (("model",), ()),
        "smart_optimizer": (("model", "name", "lr", "momentum", "decay"), ()),
    },
    "yolov5.utils.loss": {"ComputeLoss": (("model",), ())},
    "yolov5.val": {
        "run": ((), ("data", "weights", "batch_size", "imgsz", "workers", "device", "half", "plots", "project"))
    },
}
FILES = ("data/hyps/hyp.scratch-low.yaml", "models/yolov5n.yaml")  # under the package's folder

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def call_problems(where: str, target: object, positional: tuple[str, ...], keywords: tuple[str, ...]) -> list[str]:
    """What keeps `target` from taking these arguments by these names (a **kwargs catch-all does not count)."""
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError) as error:
        return [f"{where}: no signature ({error})"]
    leading = [p.name for p in parameters[: len(positional)] if p.kind in POSITIONAL]
    problems = [] if leading == list(positional) else [f"{where}: positional {leading}, expected {list(positional)}"]
    named = {p.name for p in parameters if p.kind in BY_KEYWORD}
    problems += [f"{where}: no parameter {name!r}" for name in keywords if name not in named]
    return problems


def missing() -> list[str]:
    """Everything in USED and FILES that the importable `yolov5` package lacks."""
    problems = []
    for module_name, names in USED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            problems.append(f"{module_name}: {error}")
            continue
        for name, call in names.items():
            where = f"{module_name}.{name}"
            if not hasattr(module, name):
                problems.append(f"{where}: missing")
            elif call is not None:
                problems += call_problems(where, getattr(module, name), *call)
    package = Path(importlib.import_module("yolov5").__file__).parent
    problems += [f"yolov5/{file}: missing" for file in FILES if not (package / file).is_file()]
    return problems


if __name__ == "__main__":
    print(json.dumps(missing()))
