"""A lower bound on the memory of a training step, checked before a run starts.

At the end of a forward pass every tensor autograd saved for the backward pass is alive at once,
beside the weights, the EMA and the optimizer's state; the step needs at least all of them. The
saved tensors are counted in one small forward pass (saved_tensors_hooks, each storage once,
parameters left out) at batch 1 and 2, which separates the per-image part from the fixed one;
the per-image part scales with the image area. Under autocast every floating-point tensor is
counted at 2 bytes (fp16 or bf16), so the bound holds whichever ops autocast leaves in fp32.
Gradients, DDP's buckets, the loss's own tensors and the backward pass's temporaries come on top:
the measured peak is higher, never lower (tests/test_memory_bound.py measures the ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.device import available_memory_bytes
from utils.errors import UserError
from utils.train.step import BufferSnapshot

# Tensors of this size per parameter live through a whole run: the optimizer's state
# (SGD's momentum; Adam's two moments) besides the weights and rank 0's averages.
OPTIMIZER_STATE_COPIES = {"SGD": 1, "Adam": 2, "AdamW": 2}


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step holds at least: `persistent` (weights, averages, optimizer state),
    `fixed` (saved tensors that do not grow with the batch) and `per_pixel` (per image pixel)."""

    persistent: int
    fixed: float
    per_pixel: float

    def needed(self, batch_size: int, img_size: int) -> int:
        return int(self.persistent + self.fixed + self.per_pixel * img_size**2 * batch_size)

    def largest_batch(self, budget: int, img_size: int) -> int:
        """The largest batch whose bound fits in `budget` bytes (0 when none does)."""
        per_image = self.per_pixel * img_size**2
        return max(int((budget - self.persistent - self.fixed) // per_image), 0) if per_image > 0 else 0


def step_memory_lower_bound(
    model: nn.Module,
    *,
    amp_dtype: torch.dtype | None,
    optimizer: str,
    averages: int,
    weights_resident: bool,
    weights_dtype: torch.dtype = torch.float32,
) -> StepMemory:
    """The lower bound for training `model` under autocast to `amp_dtype` (None: its own dtype)
    with `optimizer`'s state and `averages` averaged copies of the weights (rank 0's EMA and
    tracked averages); `weights_resident`: the weights already take the memory being checked
    (a CPU run's model), so they are not counted again; `weights_dtype`: the run's (float64 with
    train.py --float64), whatever the model's is now."""
    element_size = weights_dtype.itemsize
    weight_bytes = sum(p.numel() for p in model.parameters()) * element_size
    copies = weight_copies(averages, weights_resident) + OPTIMIZER_STATE_COPIES.get(optimizer, 2)
    float_bytes = 2 if amp_dtype is not None else element_size
    probe = 2 * int(model.stride.max())
    (floats1, others1), (floats2, others2) = (_saved_elements(model, batch, probe) for batch in (1, 2))
    per_image = (floats2 - floats1) * float_bytes + (others2 - others1)
    fixed = max((floats1 * float_bytes + others1) - per_image, 0)
    return StepMemory(persistent=copies * weight_bytes, fixed=fixed, per_pixel=per_image / probe**2)


def weight_copies(averages: int, weights_resident: bool) -> int:
    """Copies of the weights a run holds on the device checked: its own (unless already resident,
    as a CPU run's model is) and `averages` averaged ones."""
    return (0 if weights_resident else 1) + averages


def _saved_elements(model: nn.Module, batch: int, size: int) -> tuple[int, int]:
    """Floating-point elements, and bytes of other dtypes, of the storages autograd saves in a
    training-mode forward of a (batch, 3, size, size) input (BatchNorm statistics restored after)."""
    parameter = next(model.parameters())
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    floats: dict[int, int] = {}
    others: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in weights:
            if tensor.dtype.is_floating_point:
                floats[key] = storage.nbytes() // tensor.element_size()
            else:
                others[key] = storage.nbytes()
        return tensor

    buffers, was_training = BufferSnapshot(model), model.training
    buffers.take()
    try:
        model.train()
        image = torch.zeros(batch, 3, size, size, device=parameter.device, dtype=parameter.dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = model(image)
        del outputs  # the graph and its saved tensors go with it
    finally:
        buffers.restore()
        model.train(was_training)
    return sum(floats.values()), sum(others.values())


def check_training_memory(
    bound: StepMemory, img_size: int, batch_size: int, device: torch.device, processes: int = 1
) -> None:
    """Refuse a batch whose lower bound exceeds the memory available on `device` (shared by
    `processes` alike), naming the largest batch the bound allows. Never refuses a batch that fits:
    the bound is below every step's real peak."""
    available = available_memory_bytes(device)
    if available is None:
        return
    available //= processes
    needed = bound.needed(batch_size, img_size)
    if needed <= available:
        return
    share = f" to each of its {processes} processes" if processes > 1 else ""
    largest = bound.largest_batch(available, img_size)
    advice = (
        f"a batch of at most {largest} per process may fit (--batch-size -1 measures and picks one), or use a "
        "smaller --imgsz"
        if largest
        else "not even a batch of 1 fits: use a smaller --imgsz or model"
    )
    raise UserError(
        f"training at --imgsz {img_size} with a batch of {batch_size} needs at least {needed / 2**30:,.1f} GiB "
        f"(weights, averages, optimizer state and the tensors kept for the backward pass), but "
        f"{available / 2**30:,.1f} GiB are available on {device}{share}: {advice}"
    )
