"""YOLOv5 and Ultralytics (YOLOv5u/YOLOv8/YOLO11) checkpoints, pickled model objects, read on the
user's explicit word: --trust-pickle.

Our own checkpoints never need this. Their .pt files store the model as pickled Python objects,
hence the opt-in. Even then the file goes through torch's restricted (weights_only) unpickler:
the other framework's code is never imported and no function outside a short allowlist is
called, because every other global it names is mapped to an inert placeholder that keeps its
pickled state. The tensors, the model YAML and the class names are taken from those. Their
state-dict names equal ours, so the weights load one to one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from models.parse import validate_model_config
from utils.errors import UserError

# The only globals that unpickle as themselves: what tensors and torch modules are rebuilt from.
# Everything else - the other framework's classes, but also open, eval, os.system, torch.save -
# becomes an inert placeholder, so even a hostile "trusted" file cannot run code through them.
SAFE_BUILTINS = {
    "set",
    "frozenset",
    "slice",
    "range",
    "complex",
    "bytearray",
    "dict",
    "list",
    "tuple",
    "int",
    "float",
    "str",
    "bool",
    "object",
}


# Where numpy's array and scalar builders live across numpy 1 and 2 (numpy.core became numpy._core).
NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")


def _allowed(module: str, name: str) -> bool:
    if module in ("builtins", "__builtin__"):
        return name in SAFE_BUILTINS
    if module in ("collections", "_codecs"):
        return name in ("OrderedDict", "encode")
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module.startswith("torch.nn.modules."):  # module classes only: their functions (hooks) act process-wide
        return _is_module_class(module, name)
    if module == "torch":
        return name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)
    if module in NUMPY_MODULES:
        return name in ("_reconstruct", "scalar", "dtype", "ndarray")
    return False


def _is_module_class(module: str, name: str) -> bool:
    """True for an nn.Module subclass of torch (Conv2d, BatchNorm2d, ...): unpickling one only
    builds an object, where a function such as register_module_forward_hook would be called."""
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


class ForeignObject:
    """Stands in for an object of another framework; keeps what it was pickled with."""

    def __init__(self, *args, **kwargs):
        self.pickled_args = args

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state

    def __call__(self, *args, **kwargs):  # a pickled function of the other framework: never run it
        return ForeignObject(*args, **kwargs)


def _stand_ins(path: Path) -> list[tuple[object, str]]:
    """For each global the pickle names: the real object when allowlisted, else a placeholder class."""
    stand_ins = []
    for full_name in get_unsafe_globals_in_checkpoint(path):
        module, _, name = full_name.rpartition(".")
        if _allowed(module, name):
            stand_ins.append((getattr(importlib.import_module(module), name), full_name))
        else:
            stand_ins.append((type(name, (ForeignObject,), {"__module__": module}), full_name))
    return stand_ins


def _module_state(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled nn.Module tree, by dotted name (as state_dict() names them).
    The tree mixes placeholders (the other framework's blocks) and real torch modules (Conv2d, ...)."""
    state = obj.__dict__ if isinstance(obj, torch.nn.Module) else getattr(obj, "pickled_state", None)
    if not isinstance(state, dict):
        return {}
    tensors = {}
    for key in ("_parameters", "_buffers"):
        for name, tensor in (state.get(key) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in state.get("_non_persistent_buffers_set", set()):
                tensors[prefix + name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        tensors.update(_module_state(child, f"{prefix}{name}."))
    return tensors


@dataclass(frozen=True)
class ForeignWeights:
    """What a YOLOv5 or Ultralytics checkpoint says about its model."""

    framework: str  # "YOLOv5" or "Ultralytics"
    model_yaml: dict
    names: list[str]
    state: dict[str, torch.Tensor]  # fp32 state dict (they keep one model: the EMA when they trained with one)
    image_size: int | None  # its training --imgsz, when recorded


def read_pickled_checkpoint(path: Path) -> ForeignWeights:
    """The model of a YOLOv5 or Ultralytics checkpoint: its YAML, class names, weights and training image size."""
    try:
        with safe_globals(_stand_ins(path)):  # torch's restricted unpickler, told what each name stands for
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # anything a foreign pickle can raise means: not readable as YOLOv5's
        raise UserError(
            f"{path} could not be read as a YOLOv5 or Ultralytics checkpoint: {type(error).__name__}: {error}"
        ) from None
    model = raw.get("ema") or raw.get("model") if isinstance(raw, dict) else None
    state = getattr(model, "pickled_state", None)
    if not isinstance(state, dict) or not isinstance(state.get("yaml"), dict):
        raise UserError(f"{path} is not a YOLOv5 or Ultralytics checkpoint (no pickled model with a model YAML inside)")
    framework = "Ultralytics" if type(model).__module__.startswith("ultralytics.") else "YOLOv5"
    model_yaml = dict(state["yaml"])
    if isinstance(model_yaml.get("scales"), dict) and model_yaml.get("scale") not in model_yaml["scales"]:
        model_yaml["scale"] = next(iter(model_yaml["scales"]), None)  # what Ultralytics builds without one
    validate_model_config(model_yaml, source=f"of {framework} checkpoint {path}")  # e.g. a Segment or Pose model
    names = state.get("names") or [str(i) for i in range(model_yaml.get("nc", 0))]
    try:
        weights = _module_state(model)
    except Exception as error:  # a structure we do not know: say so rather than guess
        raise UserError(
            f"{path}: its pickled model could not be read as {framework}'s ({type(error).__name__}: {error})"
        ) from None
    # The training options: YOLOv5 keeps them under 'opt', Ultralytics under 'train_args'.
    train_opt = next((raw[k] for k in ("opt", "train_args") if isinstance(raw.get(k), dict)), {})
    image_size = train_opt.get("imgsz") if isinstance(train_opt.get("imgsz"), int) else None
    return ForeignWeights(
        framework=framework,
        model_yaml=model_yaml,
        names=list(names.values()) if isinstance(names, dict) else list(names),
        state=weights,
        image_size=image_size,
    )
