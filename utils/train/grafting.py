"""Filter grafting (Meng et al. 2020, "Filter Grafting for Deep Neural Networks") under torchrun:
every process trains a network of its own (its own seed, optionally its own hyp file) and at
the end of each epoch grafts the next process's network into its own (cyclically), layer by
layer: w = alpha * w_own + (1 - alpha) * w_next with alpha = (A / pi) * arctan(c * (H_own -
H_next)) + 0.5, where H is the entropy of the layer's weights (their values binned into `bins`
equal bins over their range, H = -sum p log p, natural log). A layer holding more information
keeps more of itself; alpha stays within 0.5 +- A / 2. A, c and bins are the hyp's graft_a,
graft_c and graft_bins, the authors' 0.4, 500 and 10. A normalisation layer takes the alpha of
the layer before it (a convolution and its BatchNorm move together), as in the authors' code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.dist import World, unwrap

NORMALISATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def weight_entropy(weight: torch.Tensor, bins: int) -> float:
    """Entropy of a layer's weight values: their histogram over [min, max] in `bins` equal bins (0
    for constant weights, e.g. a BatchNorm scale not trained yet). Computed on the CPU, where
    the histogram is deterministic."""
    values = weight.detach().double().cpu().flatten()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return 0.0
    p = torch.histc(values, bins=bins, min=low, max=high) / values.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def graft_coefficient(own_entropy: float, other_entropy: float, a: float, c: float) -> float:
    """The share of its own weights a layer keeps: (A / pi) * arctan(c * (H_own - H_other)) + 0.5."""
    return a / math.pi * math.atan(c * (own_entropy - other_entropy)) + 0.5


def grafted_layers(model: nn.Module) -> list[nn.Module]:
    """The layers grafted, in module order: modules with a floating-point `weight` parameter
    (convolutions, linear layers, normalisation layers). All of a layer's own floating-point
    state (weight, bias, BatchNorm running statistics) moves with one alpha."""
    return [
        m
        for m in unwrap(model).modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dtype.is_floating_point
    ]


@torch.no_grad()
def graft(model: nn.Module, other: dict[str, torch.Tensor], a: float, c: float, bins: int) -> list[float]:
    """Graft `other` (a state dict of the same architecture, at least its floating-point entries)
    into `model` in place; returns the alphas of its weight layers (normalisation layers reuse
    the alpha of the layer before them)."""
    bare = unwrap(model)
    names = {id(m): name for name, m in bare.named_modules()}
    alphas: list[float] = []
    for layer in grafted_layers(bare):
        prefix = f"{names[id(layer)]}." if names[id(layer)] else ""
        if not alphas or not isinstance(layer, NORMALISATION):
            own, theirs = weight_entropy(layer.weight, bins), weight_entropy(other[f"{prefix}weight"], bins)
            alphas.append(graft_coefficient(own, theirs, a, c))
        alpha = alphas[-1]
        for name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            if tensor.dtype.is_floating_point:
                tensor.mul_(alpha).add_(other[prefix + name].to(tensor.device), alpha=1.0 - alpha)
    return alphas


def graft_from_next_process(model: nn.Module, world: World, hyp: dict) -> list[float]:
    """Every process grafts the next one's network into its own (rank r takes rank r + 1's, the
    last takes rank 0's), with the hyp's graft_a, graft_c and graft_bins: collective, each
    network passed to its neighbour in a ring (one extra copy of a network per process, whatever
    their number). Returns this rank's alphas, layer by layer."""
    state = unwrap(model).state_dict()
    floating = [k for k, v in state.items() if v.dtype.is_floating_point]
    other = dict(zip(floating, world.from_next([state[k] for k in floating])))
    return graft(model, other, float(hyp["graft_a"]), float(hyp["graft_c"]), int(hyp["graft_bins"]))
