"""One optimizer step with AMP and clipping, and the guard that keeps a non-finite pass out of the weights."""

from __future__ import annotations

import torch
from torch import nn


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module, max_grad_norm: float = 10.0
) -> bool:
    """Unscale, clip to max_grad_norm, step, zero the grads. Returns False when the step was
    skipped because a gradient was inf/NaN (the GradScaler's verdict under fp16, the gradient
    norm otherwise): then the weights did not move, and the EMA must not either."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips internally on inf/NaN
        scaler.update()
        stepped = scaler.get_scale() >= scale_before  # the scale only shrinks after a skipped step
    else:
        stepped = bool(torch.isfinite(grad_norm))
        if stepped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


class BufferSnapshot:
    """The model's buffers (BatchNorm statistics) as they were before a forward pass, to put back
    when that pass turns out non-finite: a skipped step must not leave NaN running statistics."""

    def __init__(self, model: nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def take(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)
