"""ModelEMA: an exponential moving average of a model's weights, updated once per optimizer step."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from utils.dist import unwrap

# Attributes of the trained model that the averaged copy must carry into validation and checkpoints.
COPIED_ATTRIBUTES = ("yaml", "nc", "hyp", "names", "stride")


class ModelEMA:
    """EMA of every floating-point state-dict entry (parameters and BatchNorm statistics).

    After the n-th optimizer step: d = decay * (1 - exp(-n / tau)) and ema = d * ema + (1 - d) * model.
    The ramp lets the average follow the fast-moving early weights. Integer buffers
    (num_batches_tracked) are copied. The averaged module is kept in eval mode, without grads.
    One update is two foreach kernels over the state dict (benchmarks/bench_ema.py: 0.1-0.2%
    of a CPU training step).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def current_decay(self) -> float:
        """d for the current update count: decay * (1 - exp(-updates / tau))."""
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the model's current weights; call once after each optimizer step."""
        averaged, current = self.module.state_dict(), unwrap(model).state_dict()
        if averaged.keys() != current.keys():
            raise ValueError("ModelEMA.update: the model's state_dict() keys differ from the averaged copy's")
        self.updates += 1
        floats = [k for k, v in averaged.items() if v.dtype.is_floating_point]
        others = [k for k, v in averaged.items() if not v.dtype.is_floating_point]
        # ema += (model - ema) * (1 - d); integer buffers (num_batches_tracked) are copied
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k] for k in floats], 1.0 - self.current_decay())
        torch._foreach_copy_([averaged[k] for k in others], [current[k] for k in others])

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


class UniformAverage(ModelEMA):
    """Running uniform average of the weights it is given (SWA's average): after the n-th update
    each of the n snapshots weighs 1/n. The EMA's update with d = (n - 1) / n, so the first
    update copies."""

    def __init__(self, model: nn.Module, updates: int = 0):
        super().__init__(model, decay=1.0, tau=1.0, updates=updates)

    def current_decay(self) -> float:
        """d = (n - 1) / n for the n-th update: the new snapshot weighs 1/n."""
        return (self.updates - 1) / self.updates if self.updates else 0.0
