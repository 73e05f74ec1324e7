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
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates
        state = self.module.state_dict()
        self._float_keys = [k for k, v in state.items() if v.dtype.is_floating_point]
        self._other_keys = [k for k, v in state.items() if not v.dtype.is_floating_point]

    def current_decay(self) -> float:
        """d for the current update count: decay * (1 - exp(-updates / tau))."""
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the model's current weights; call once after each optimizer step."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        # Both state dicts are read afresh: they are views of the live tensors, whatever moved them.
        ema_state, model_state = self.module.state_dict(), unwrap(model).state_dict()
        torch._foreach_lerp_([ema_state[k] for k in self._float_keys], [model_state[k] for k in self._float_keys],
                             weight)  # ema += (model - ema) * (1 - d)
        for key in self._other_keys:
            ema_state[key].copy_(model_state[key])

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
