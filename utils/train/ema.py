"""Running weight averages, updated once per optimizer step: YOLOv5's ModelEMA (decay ramped over
steps), an EMA whose horizon is counted in images, the power-function EMA of post-hoc EMA, and
SWA's uniform average. All share one update: avg = d * avg + (1 - d) * model over every
floating-point state-dict entry (parameters and BatchNorm statistics); only the rule for d differs."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import torch
from torch import nn

from utils.dist import unwrap
from utils.errors import UserError
from utils.hyp import CHOICE_KEYS

# ModelEMA's ramps (hyp ema_warmup): YOLOv5's exponential one over steps, or TensorFlow's (1 + n) / (10 + n).
EMA_WARMUPS = CHOICE_KEYS["ema_warmup"]
EXPONENTIAL_WARMUP, TENSORFLOW_WARMUP = EMA_WARMUPS
# Attributes of the trained model that the averaged copy must carry into validation and checkpoints.
COPIED_ATTRIBUTES = ("yaml", "nc", "hyp", "names", "stride")


class WeightAverage:
    """An averaged copy of a model (eval mode, no grads) and the number of updates and images folded
    in. Integer buffers (num_batches_tracked) are copied. One update is two foreach kernels over the
    state dict (benchmarks/bench_ema.py: 0.1-0.2% of a CPU training step). Subclasses give the
    decay rule (current_decay) and the names of its settings, which state_dict() carries."""

    settings: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, updates: int = 0, images: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates, self.images = updates, images

    def current_decay(self, images: int = 0) -> float:
        """d of the latest update, which folded in `images` images (counters already advanced)."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, model: nn.Module, images: int = 0) -> None:
        """Fold in the model's current weights; call once after each optimizer step, with the number
        of images that step trained on (over all processes)."""
        averaged, current = self.module.state_dict(), unwrap(model).state_dict()
        if averaged.keys() != current.keys():
            raise ValueError(f"{type(self).__name__}.update: the model's state_dict() keys differ from the average's")
        self.updates += 1
        self.images += images
        floats = [k for k, v in averaged.items() if v.dtype.is_floating_point]
        others = [k for k, v in averaged.items() if not v.dtype.is_floating_point]
        # avg += (model - avg) * (1 - d); integer buffers (num_batches_tracked) are copied
        weight = 1.0 - self.current_decay(images)
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k] for k in floats], weight)
        if others:
            torch._foreach_copy_([averaged[k] for k in others], [current[k] for k in others])

    def copy_attributes(self, model: nn.Module) -> None:
        """Give the average the model's yaml, nc, hyp, names and stride (before validating or saving)."""
        source = unwrap(model)
        for name in COPIED_ATTRIBUTES:
            if hasattr(source, name):
                setattr(self.module, name, getattr(source, name))

    def state_dict(self) -> dict:
        """The averaged weights, the update and image counts, and the rule's settings."""
        settings = {name: getattr(self, name) for name in self.settings}
        return {"module": self.module.state_dict(), "updates": self.updates, "images": self.images, **settings}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (a state saved before images were counted has none; one
        saved before a setting existed keeps the constructor's value of it)."""
        self.module.load_state_dict(state["module"])
        self.updates, self.images = int(state["updates"]), int(state.get("images", 0))
        for name in self.settings:
            if name in state:
                value = state[name]
                setattr(self, name, value if isinstance(value, str) else float(value))


class ModelEMA(WeightAverage):
    """YOLOv5's EMA: after the n-th optimizer step d = decay * (1 - exp(-n / tau)). The ramp lets
    the average follow the fast-moving early weights; it counts steps, so its horizon in images
    grows with the batch size. warmup='tensorflow' ramps as TensorFlow's
    ExponentialMovingAverage(decay, num_updates) does instead: d = min(decay, (1 + n) / (10 + n))."""

    settings = ("decay", "tau", "warmup")

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        tau: float = 2000.0,
        updates: int = 0,
        warmup: str = EXPONENTIAL_WARMUP,
    ):
        super().__init__(model, updates)
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
        self.decay, self.tau, self.warmup = decay, tau, warmup

    def current_decay(self, images: int = 0) -> float:
        """The ramp's d at this update, whatever the step's image count."""
        return self.decay_after(self.updates)

    def decay_after(self, updates: int) -> float:
        """d of the update that brings the count to `updates`."""
        if self.warmup == TENSORFLOW_WARMUP:
            return min(self.decay, (1 + updates) / (10 + updates))
        return self.decay * (1 - math.exp(-updates / self.tau))


class ImageEMA(WeightAverage):
    """An EMA whose horizon is a half-life in images (EDM2's "traditional" EMA, Karras et al. 2024):
    a step of n images decays the average by d = 0.5 ** (n / h), h = min(half_life, ramp * images
    seen so far, this step's included). The weight an image gets depends only on how many images
    came after it, not on how they were batched or split over processes."""

    settings = ("half_life", "ramp")

    def __init__(self, model: nn.Module, half_life: float, ramp: float):
        super().__init__(model)
        self.half_life, self.ramp = half_life, ramp

    def current_half_life(self) -> float:
        """The half-life in images after the images seen so far."""
        return min(self.half_life, self.ramp * self.images) if self.ramp else self.half_life

    def current_decay(self, images: int = 0) -> float:
        """0.5 ** (images / half-life)."""
        if images <= 0:
            raise ValueError("ImageEMA.update needs the number of images the optimizer step trained on")
        return 0.5 ** (images / self.current_half_life())


def power_exponent(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA whose profile has relative standard deviation
    `sigma_rel` (Karras et al. 2024, eq. 3: sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))), the largest
    real root of g^3 + 7g^2 + (16 - s^-2) g + 12 - s^-2 = 0."""
    if not 0 < sigma_rel < 12**-0.5:  # gamma > 0 needs sigma_rel below 1/sqrt(12), the uniform average's
        raise UserError(f"a power EMA's relative width must be in (0, {12**-0.5:.4f}), got {sigma_rel:g}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


class PowerEMA(WeightAverage):
    """Power-function EMA (Karras et al. 2024): after the t-th step d = (1 - 1/t) ** (gamma + 1),
    which weighs the model after step k by (k^(g+1) - (k-1)^(g+1)) / t^(g+1): a profile whose width
    is the fixed fraction sigma_rel of the steps so far. Post-hoc EMA keeps two of these."""

    settings = ("sigma_rel",)

    def __init__(self, model: nn.Module, sigma_rel: float):
        super().__init__(model)
        self.sigma_rel, self.gamma = sigma_rel, power_exponent(sigma_rel)

    def current_decay(self, images: int = 0) -> float:
        """(1 - 1/t) ** (gamma + 1): 0 at the first step, which copies the model."""
        return (1.0 - 1.0 / self.updates) ** (self.gamma + 1.0)

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned, and the exponent of its width."""
        super().load_state_dict(state)
        self.gamma = power_exponent(self.sigma_rel)


class UniformAverage(WeightAverage):
    """Running uniform average of the weights it is given (SWA's average): after the n-th update
    each of the n snapshots weighs 1/n, so the first update copies."""

    def current_decay(self, images: int = 0) -> float:
        """d = (n - 1) / n for the n-th update: the new snapshot weighs 1/n."""
        return (self.updates - 1) / self.updates if self.updates else 0.0


# Averages by name: what --average, --val and --posthoc-ema track.
RAW, EMA_STEPS, EMA_IMAGES, POWER_PREFIX = "raw", "ema-steps", "ema-images", "power-"
POSTHOC_WIDTHS = (0.05, 0.10)  # the two power EMAs post-hoc EMA keeps (Karras et al. 2024, section 3)


def power_name(sigma_rel: float) -> str:
    """'power-0.05' for the power EMA of relative width 0.05."""
    return f"{POWER_PREFIX}{sigma_rel:g}"


def posthoc_names() -> list[str]:
    """The averages --posthoc-ema tracks: power EMAs of relative widths 0.05 and 0.10."""
    return [power_name(width) for width in POSTHOC_WIDTHS]


def check_average_name(name: str) -> str:
    """A valid name of an average that a run can track (ema-steps, ema-images, power-S), else UserError."""
    if name in (EMA_STEPS, EMA_IMAGES):
        return name
    match = re.fullmatch(rf"{POWER_PREFIX}([0-9.]+(?:e-?[0-9]+)?)", name)
    try:
        width = float(match.group(1)) if match else None
    except ValueError:
        width = None
    if width is not None:
        try:
            power_exponent(width)
        except UserError as error:  # a power EMA, of a width none has
            raise UserError(f"average '{name}': {error}") from None
        return power_name(width)
    raise UserError(
        f"unknown average '{name}': the averages a run can track are {EMA_STEPS} (YOLOv5's step ramp), "
        f"{EMA_IMAGES} (half-life in images) and power-S (a power-function EMA of relative width S, e.g. power-0.05)"
    )


def check_validated_name(name: str) -> str:
    """A valid name for --val: raw (the model itself) or an average a run can track."""
    return RAW if name == RAW else check_average_name(name)


def tracked_names(average: tuple[str, ...], validated: tuple[str, ...], posthoc: bool) -> tuple[str, ...]:
    """The averages a run tracks besides its EMA: those of --average, the averages of --val, and
    the two power EMAs of post-hoc EMA; each once, in that order."""
    names = [*average, *(n for n in validated if n != RAW), *(posthoc_names() if posthoc else ())]
    return tuple(dict.fromkeys(names))


def build_average(name: str, model: nn.Module, hyp: dict) -> WeightAverage:
    """The running average called `name` (see check_average_name), with the hyp's EMA settings."""
    if name == EMA_STEPS:
        # A checkpoint's hyp from before ema_warmup existed ramps as then: exponentially.
        warmup = hyp.get("ema_warmup", EXPONENTIAL_WARMUP)
        return ModelEMA(model, decay=hyp["ema_decay"], tau=hyp["ema_tau"], warmup=warmup)
    if name == EMA_IMAGES:
        return ImageEMA(model, half_life=hyp["ema_half_life"], ramp=hyp["ema_ramp"])
    return PowerEMA(model, sigma_rel=float(check_average_name(name)[len(POWER_PREFIX) :]))
