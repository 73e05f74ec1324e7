"""Comparing state dicts in the benchmarks."""

from __future__ import annotations

import torch


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all floating-point tensors of state dict `b` (the norm of all of them as one vector)."""
    keys = [k for k, v in b.items() if v.is_floating_point()]
    difference = sum((a[k].double() - b[k].double()).square().sum() for k in keys).sqrt()
    return float(difference / sum(b[k].double().square().sum() for k in keys).sqrt())
