"""One optimizer step with AMP and clipping, and the guard that keeps a non-finite pass out of the weights."""

from __future__ import annotations

import torch
from torch import nn


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    model: nn.Module,
    max_grad_norm: float = 10.0,
    finite_loss: torch.Tensor | None = None,
) -> bool:
    """Unscale, clip to max_grad_norm, step, zero the grads. Returns False when the step was
    skipped because a gradient was inf/NaN (the GradScaler's verdict under fp16, the gradient
    norm otherwise) or `finite_loss` (a bool tensor, on the device) is False: then the weights
    did not move, and the EMA must not either. Without a GradScaler, `finite_loss` is read with
    the gradient norm's verdict: one wait for the device per step."""
    if scaler.is_enabled() and finite_loss is not None and not bool(finite_loss):
        optimizer.zero_grad(set_to_none=True)  # the scaler must not back off for a non-finite loss
        return False
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips internally on inf/NaN
        scaler.update()
        stepped = scaler.get_scale() >= scale_before  # the scale only shrinks after a skipped step
    else:
        finite = torch.isfinite(grad_norm)
        stepped = bool(finite if finite_loss is None else finite & finite_loss)
        if stepped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


class BufferSnapshot:
    """The model's buffers (BatchNorm statistics) as they were before an accumulation window's
    forward passes, to put back when one of them turns out non-finite: the window's step is
    skipped, and must not leave NaN running statistics."""

    def __init__(self, model: nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def take(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)
