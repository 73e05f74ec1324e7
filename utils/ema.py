"""ModelEMA: an exponential moving average of a model's weights, updated once per optimizer step."""

from __future__ import annotations

import copy
import math
import weakref

import torch
from torch import nn

from utils.dist import unwrap

# Attributes of the trained model that the averaged copy must carry into validation and checkpoints.
COPIED_ATTRIBUTES = ("yaml", "nc", "hyp", "names", "stride")


Slot = tuple[dict, str]  # a module's _parameters or _buffers dict, and the key of one state tensor in it


def state_slots(module: nn.Module) -> list[Slot]:
    """Where each state_dict() tensor of `module` lives, in state_dict() order (no tensor is copied)."""
    slots = []
    for m in module.modules():
        slots += [(m._parameters, k) for k, v in m._parameters.items() if v is not None]
        slots += [(m._buffers, k) for k, v in m._buffers.items() if v is not None and k not in m._non_persistent_buffers_set]
    return slots


def matching_slots(model: nn.Module, averaged: nn.Module) -> list[Slot]:
    """The model's slots, checked to pair one to one with the averaged copy's state_dict() entries."""
    slots = state_slots(model)
    if list(model.state_dict()) != list(averaged.state_dict()) or len(slots) != len(model.state_dict()):
        raise ValueError("ModelEMA.update: the model's state_dict() keys differ from the averaged copy's")
    return slots


def _lookup(slot: Slot) -> torch.Tensor:
    return slot[0][slot[1]]


def _packable(tensor: torch.Tensor) -> bool:
    """Floating point and dense in a layout a flat segment can hold (contiguous or channels_last)."""
    return tensor.dtype.is_floating_point and (
        tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)))


def pack_float_state(module: nn.Module) -> torch.Tensor | None:
    """Move the module's float state_dict() entries into one flat tensor, in state_dict() order,
    each entry becoming a view of its own segment with its own strides (Parameters keep their
    identity, so optimizers are unaffected). Returns the flat tensor, or None when the entries
    differ in dtype or device or one is not dense. The EMA then averages a packed model with
    one lerp_ over one tensor: the memory-bandwidth floor (hundreds of small tensors otherwise
    cost a kernel launch each)."""
    slots = [slot for slot in state_slots(module) if _lookup(slot).dtype.is_floating_point]
    parts = [_lookup(slot) for slot in slots]
    if not parts or not all(_packable(t) for t in parts) or len({(t.dtype, t.device) for t in parts}) > 1:
        return None
    flat = torch.empty(sum(t.numel() for t in parts), dtype=parts[0].dtype, device=parts[0].device)
    offset = 0
    with torch.no_grad():
        for (owner, key), part in zip(slots, parts):
            view = flat.as_strided(part.shape, part.stride(), offset)
            view.copy_(part)
            if isinstance(owner[key], nn.Parameter):
                owner[key].data = view
            else:
                owner[key] = view
            offset += part.numel()
    return flat


def packed_pointers(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[int]:
    """The data pointers `tensors` have while they are consecutive segments of `flat`."""
    pointers, pointer = [], flat.data_ptr()
    for t in tensors:
        pointers.append(pointer)
        pointer += t.numel() * flat.element_size()
    return pointers


def find_packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor that pack_float_state() made of `tensors`, if they still are its
    consecutive segments; else None."""
    first, total = tensors[0], sum(t.numel() for t in tensors)
    if (first.storage_offset() + total) * first.element_size() > first.untyped_storage().nbytes() or \
            len({t.dtype for t in tensors}) > 1:
        return None
    flat = first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,))
    return flat if [t.data_ptr() for t in tensors] == packed_pointers(flat, tensors) else None


class ModelEMA:
    """EMA of every floating-point state-dict entry (parameters and BatchNorm statistics).

    After the n-th optimizer step: d = decay * (1 - exp(-n / tau)) and ema = d * ema + (1 - d) * model.
    The ramp lets the average follow the fast-moving early weights. Integer buffers
    (num_batches_tracked) are copied. The averaged module is kept in eval mode, without grads.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates
        slots = state_slots(self.module)
        tensors = [_lookup(slot) for slot in slots]
        self._floats = [i for i, t in enumerate(tensors) if t.dtype.is_floating_point]
        self._others = [i for i, t in enumerate(tensors) if not t.dtype.is_floating_point]
        self._ema_float_slots = [slots[i] for i in self._floats]
        self._ema_other_slots = [slots[i] for i in self._others]
        self._pack_average()
        self._model_ref: weakref.ref | None = None
        self._model_float_slots: list[Slot] = []
        self._model_other_slots: list[Slot] = []
        self._model_flat, self._model_pointers = None, []

    def _pack_average(self) -> None:
        self._flat = pack_float_state(self.module)
        floats = [owner[key] for owner, key in self._ema_float_slots]
        self._pointers = packed_pointers(self._flat, floats) if self._flat is not None else []

    def current_decay(self) -> float:
        """d for the current update count: decay * (1 - exp(-updates / tau))."""
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the model's current weights; call once after each optimizer step."""
        source = unwrap(model)
        if self._model_ref is None or self._model_ref() is not source:  # a model's slots are found once
            slots, self._model_ref = matching_slots(source, self.module), weakref.ref(source)
            self._model_float_slots = [slots[i] for i in self._floats]
            self._model_other_slots = [slots[i] for i in self._others]
            self._model_flat, self._model_pointers = None, []
        self.updates += 1
        weight = 1.0 - self.current_decay()
        # Tensors are read through their owners' dicts each time (microseconds, where state_dict()
        # costs ~0.5 ms) and packing is re-checked by data pointer, so a tensor replaced by .to(),
        # SyncBatchNorm or an assignment is what gets averaged, never a stale one.
        if self._flat is not None and [o[k].data_ptr() for o, k in self._ema_float_slots] != self._pointers:
            self._pack_average()
        pointers = [o[k].data_ptr() for o, k in self._model_float_slots]
        if pointers != self._model_pointers:  # first update, or a tensor was replaced: is the model packed?
            self._model_flat, self._model_pointers = find_packed([o[k] for o, k in self._model_float_slots]), pointers
        # ema += (model - ema) * (1 - d): one kernel when both sides are packed alike (train.py packs the model)
        if self._flat is not None and self._model_flat is not None and self._model_flat.dtype == self._flat.dtype:
            self._flat.lerp_(self._model_flat, weight)
        else:
            torch._foreach_lerp_([o[k] for o, k in self._ema_float_slots], [o[k] for o, k in self._model_float_slots],
                                 weight)
        if self._others:  # integer buffers (num_batches_tracked) are copied
            torch._foreach_copy_([owner[key] for owner, key in self._ema_other_slots],
                                 [owner[key] for owner, key in self._model_other_slots])

    def copy_attributes(self, model: nn.Module) -> None:
        """Give the average the model's yaml, nc, hyp, names and stride (before validating or saving)."""
        source = unwrap(model)
        for name in COPIED_ATTRIBUTES:
            if hasattr(source, name):
                setattr(self.module, name, getattr(source, name))

    def state_dict(self) -> dict:
        """The averaged weights, the update count and the decay settings."""
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.module.load_state_dict(state["module"])
        self.updates, self.decay, self.tau = int(state["updates"]), float(state["decay"]), float(state["tau"])
