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


def _pointers(slots: list[Slot]) -> list[int]:
    return [owner[key].data_ptr() for owner, key in slots]


def _packable(tensor: torch.Tensor) -> bool:
    """Dense in a layout a flat segment can hold (contiguous or channels_last)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _pack(slots: list[Slot]) -> torch.Tensor | None:
    """Move the slots' tensors into one flat tensor, in order, each becoming a view of its own
    segment with its own strides (Parameters keep their identity, so optimizers are unaffected).
    Returns the flat tensor, or None when there are none, or they differ in dtype or device, or
    one is not dense."""
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


def pack_state(module: nn.Module) -> None:
    """Put the module's floating-point state_dict() entries into one flat tensor, and the others
    (integer buffers such as num_batches_tracked) into another. The EMA then updates a packed
    model with one lerp_ and one copy_: the memory-bandwidth floor, where hundreds of small
    tensors cost a kernel launch each. Entries that cannot be packed are left as they are."""
    slots = state_slots(module)
    for floating in (True, False):
        _pack([slot for slot in slots if _lookup(slot).dtype.is_floating_point == floating])


def packed_pointers(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[int]:
    """The data pointers `tensors` have while they are consecutive segments of `flat`."""
    pointers, pointer = [], flat.data_ptr()
    for t in tensors:
        pointers.append(pointer)
        pointer += t.numel() * flat.element_size()
    return pointers


def find_packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor that pack_state() made of `tensors`, if they still are its consecutive
    segments; else None."""
    if not tensors or len({t.dtype for t in tensors}) > 1:
        return None
    first, total = tensors[0], sum(t.numel() for t in tensors)
    if (first.storage_offset() + total) * first.element_size() > first.untyped_storage().nbytes():
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
        self._average_slots = state_slots(self.module)
        self._is_float = [_lookup(slot).dtype.is_floating_point for slot in self._average_slots]
        self._pack_average()
        self._model_ref: weakref.ref | None = None
        self._model_slots: list[Slot] = []
        self._model_pointers: list[int] = []
        self._model_flats: tuple[torch.Tensor | None, ...] = (None, None)

    def _by_kind(self, slots: list[Slot]) -> tuple[list[Slot], list[Slot]]:
        """The floating-point entries (averaged) and the others (copied)."""
        return [s for s, f in zip(slots, self._is_float) if f], [s for s, f in zip(slots, self._is_float) if not f]

    def _pack_average(self) -> None:
        self._average_flats = tuple(_pack(part) for part in self._by_kind(self._average_slots))
        self._average_pointers = _pointers(self._average_slots)

    def _follow(self, model: nn.Module) -> None:
        """Find the model's tensors (once per model) and whether they are packed (once per change).

        Per update this costs O(1): a conversion of a whole module (.to(), .half(), .float())
        replaces its first tensor, which is checked here on both sides; a tensor replaced on its
        own is found by _check_pairing() at the next state_dict(). Checking every data pointer
        on every update would cost ~0.3 ms of cache misses on a CPU (~half the flat lerp_ of
        yolov5s) and several times the update itself on a GPU."""
        if self._model_ref is None or self._model_ref() is not model:
            self._model_slots, self._model_ref = matching_slots(model, self.module), weakref.ref(model)
            self._model_pointers = []
        if self._average_slots and _lookup(self._average_slots[0]).data_ptr() != self._average_pointers[0]:
            self._pack_average()
        if self._model_slots and (not self._model_pointers or
                                  _lookup(self._model_slots[0]).data_ptr() != self._model_pointers[0]):
            self._model_flats = tuple(find_packed([_lookup(slot) for slot in part])
                                      for part in self._by_kind(self._model_slots))
            self._model_pointers = _pointers(self._model_slots)

    def _check_pairing(self) -> None:
        """Refuse to go on when a packed tensor was replaced on its own since the EMA paired with
        it: the average has missed what happened to it since (a silent wrong result otherwise)."""
        sides = [(self._average_slots, self._average_pointers, self._average_flats, "the average (ema.module)")]
        if self._model_ref is not None and self._model_ref() is not None:
            sides.append((self._model_slots, self._model_pointers, self._model_flats, "the model"))
        for slots, pointers, flats, side in sides:
            if any(flat is not None for flat in flats) and _pointers(slots) != pointers:
                changed = next(i for i, (slot, pointer) in enumerate(zip(slots, pointers))
                               if _lookup(slot).data_ptr() != pointer)
                name = list(self.module.state_dict())[changed]
                raise RuntimeError(
                    f"ModelEMA: the tensor '{name}' of {side} was replaced after the EMA paired with it, so its "
                    f"average is stale. Replace tensors before the first update, convert whole modules (.to()), "
                    f"or change values in place (copy_, load_state_dict)")

    def _paired(self, kind: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The average's tensors of one kind (0: floats, 1: the rest) and the model's: one flat
        tensor each when both sides are packed alike."""
        average_flat, model_flat = self._average_flats[kind], self._model_flats[kind]
        if average_flat is not None and model_flat is not None and average_flat.dtype == model_flat.dtype:
            return [average_flat], [model_flat]
        average_slots, model_slots = self._by_kind(self._average_slots)[kind], self._by_kind(self._model_slots)[kind]
        return [_lookup(slot) for slot in average_slots], [_lookup(slot) for slot in model_slots]

    def current_decay(self) -> float:
        """d for the current update count: decay * (1 - exp(-updates / tau))."""
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the model's current weights; call once after each optimizer step."""
        self._follow(unwrap(model))
        self.updates += 1
        averaged, current = self._paired(0)
        if averaged:  # ema += (model - ema) * (1 - d)
            torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())
        copies, sources = self._paired(1)
        if copies:  # integer buffers (num_batches_tracked) are copied
            torch._foreach_copy_(copies, sources)

    def copy_attributes(self, model: nn.Module) -> None:
        """Give the average the model's yaml, nc, hyp, names and stride (before validating or saving)."""
        source = unwrap(model)
        for name in COPIED_ATTRIBUTES:
            if hasattr(source, name):
                setattr(self.module, name, getattr(source, name))

    def state_dict(self) -> dict:
        """The averaged weights, the update count and the decay settings."""
        self._check_pairing()
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.module.load_state_dict(state["module"])
        self.updates, self.decay, self.tau = int(state["updates"]), float(state["decay"]), float(state["tau"])


class UniformAverage(ModelEMA):
    """Running uniform average of the weights it is given (SWA's average): after the n-th update
    each of the n snapshots weighs 1/n. The same machinery as the EMA (one lerp_ over packed
    state, integer buffers copied) with d = (n - 1) / n, so the first update copies."""

    def __init__(self, model: nn.Module, updates: int = 0):
        super().__init__(model, decay=1.0, tau=1.0, updates=updates)

    def current_decay(self) -> float:
        """d = (n - 1) / n for the n-th update: the new snapshot weighs 1/n."""
        return (self.updates - 1) / self.updates if self.updates else 0.0
