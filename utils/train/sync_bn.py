"""--sync-bn: BatchNorm statistics over the global batch of all ranks.

On CUDA this is torch.nn.SyncBatchNorm. PyTorch's SyncBatchNorm refuses CPU tensors, so CPU
(gloo) runs get CPUSyncBatchNorm: the same statistics through torch's functional all_reduce,
which is differentiable: its backward sums the gradients of the statistics over the ranks, as
SyncBatchNorm's own backward does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batches of all ranks together
    (mean first, then the variance around it: no cancellation); in eval, or alone, plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        values = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 / fp16 inputs in float32
        channels = values.shape[1]
        count = torch.tensor([values.numel() / channels], dtype=values.dtype)
        totals = _all_sum(torch.cat((values.sum(dim=(0, 2, 3)), count)))
        n = totals[-1].detach()
        mean = totals[:channels] / n
        centred = values - mean[None, :, None, None]
        variance = _all_sum(centred.square().sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = variance.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(x.dtype)


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks, differentiable (the gradient is summed over the ranks too).
    torch.distributed.nn.functional.all_reduce, the public one, is deprecated in favour of this
    module; tests/test_distributed.py pins the gradients against one process's."""
    return funcol.all_reduce(tensor, "sum", dist.group.WORLD).wait()


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` made synchronised across ranks, keeping its parameters and
    statistics (the same tensors) and settings; state_dict() keys are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model, CPUSyncBatchNorm)


def without_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with plain BatchNorm2d in place of synchronised ones (the same tensors), for a copy
    that runs on one rank alone (AutoBatch's measurement)."""
    return _replace_batchnorm(model, nn.BatchNorm2d)


def _replace_batchnorm(module: nn.Module, kind: type[nn.BatchNorm2d]) -> nn.Module:
    """`module` with every BatchNorm (2d or synchronised) not of `kind` made one, sharing its tensors."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and type(module) is not kind:
        replaced = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            replaced.weight, replaced.bias = module.weight, module.bias
        if module.track_running_stats:
            replaced.running_mean, replaced.running_var = module.running_mean, module.running_var
            replaced.num_batches_tracked = module.num_batches_tracked
        replaced.train(module.training)
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child, kind))
    return module
