"""Deterministic inputs shared by our tests and the script that computed Ultralytics' reference values.

Everything here is a closed-form function of an index (sines), so both sides build the same
tensors without a random generator and without storing them.
"""

from __future__ import annotations

import math

import torch

IMAGE_SIZE = 64
STRIDES = (8, 16, 32)
REG_MAX = 16


def sine(numel: int, phase: float, step: float = 0.37) -> torch.Tensor:
    """sin(step * k + phase) for k = 0..numel-1, in float64."""
    return torch.sin(torch.arange(numel, dtype=torch.float64) * step + phase)


def fill_state_dict(model: torch.nn.Module) -> None:
    """Overwrite every floating-point state-dict entry with a fixed, well-scaled pattern.

    Entry j (in state-dict order) gets a sine with phase j; convolution weights are scaled by
    2 / sqrt(fan_in), BatchNorm weights are 1 + 0.2 sin, variances 1 + 0.5 |sin|, the rest 0.1 sin.
    The DFL projection (`dfl.conv.weight`, the fixed 0..reg_max-1 bins) is left alone.
    """
    with torch.no_grad():
        for j, (name, t) in enumerate(model.state_dict().items()):
            if not t.is_floating_point() or name.endswith("dfl.conv.weight"):
                continue
            s = sine(t.numel(), phase=float(j)).view(t.shape)
            if name.endswith("running_var"):
                v = 1 + 0.5 * s.abs()
            elif t.dim() == 4:
                v = s * 2 / math.sqrt(t[0].numel())
            elif name.endswith("bn.weight"):
                v = 1 + 0.2 * s
            else:
                v = 0.1 * s
            t.copy_(v.to(t.dtype))


def fixed_image(size: int = IMAGE_SIZE) -> torch.Tensor:
    """A (1, 3, size, size) image in [0, 1]."""
    return (0.5 + 0.5 * sine(3 * size * size, phase=0.0, step=0.001)).view(1, 3, size, size).float()


def loss_case_feats(batch: int, nc: int, scale: float) -> list[torch.Tensor]:
    """Raw head outputs per level, (batch, 4 * REG_MAX + nc, H, W), for a 64x64 input."""
    feats = []
    for level, stride in enumerate(STRIDES):
        side = IMAGE_SIZE // stride
        shape = (batch, 4 * REG_MAX + nc, side, side)
        numel = math.prod(shape)
        feats.append((scale * sine(numel, phase=1.3 * level)).view(shape).float())
    return feats


# Each case: batch size, class count, scale of the raw outputs, and labels as
# (image index, class, x_centre, y_centre, width, height), coordinates normalised to the image.
LOSS_CASES = {
    "mixed": {
        "batch": 3,
        "nc": 3,
        "scale": 2.0,
        "labels": [
            (0, 0, 0.30, 0.35, 0.40, 0.50),
            (0, 2, 0.70, 0.60, 0.25, 0.30),
            (0, 1, 0.52, 0.48, 0.90, 0.85),
            (1, 1, 0.20, 0.75, 0.15, 0.20),
            (1, 0, 0.60, 0.30, 0.50, 0.40),
        ],  # image 2 has no labels
    },
    "border": {
        "batch": 2,
        "nc": 5,
        "scale": 5.0,
        "labels": [
            (0, 4, 0.10, 0.10, 0.20, 0.20),
            (0, 3, 0.90, 0.85, 0.20, 0.30),
            (0, 0, 0.50, 0.50, 1.00, 1.00),
            (1, 2, 0.45, 0.55, 0.08, 0.10),
        ],
    },
}
