"""The process's place in a torchrun launch (rank, world size), the few collectives training needs,
and unwrapping of parallel and compiled models. Everything distributed is torch.distributed's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# Ranks other than 0 wait while rank 0 validates and writes checkpoints: a full COCO validation
# on a slow machine takes far longer than torch's default of 10 minutes (NCCL) or 30 (gloo).
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (torchrun's RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE); one process on its own is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, logs, plots and writes checkpoints."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks, in place (itself when alone)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def from_main(self, value: object) -> object:
        """Rank 0's `value` on every rank (a picklable object; the others wait for it)."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_to_main(self, value: object) -> list[object] | None:
        """Every rank's `value` (a picklable object), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """For each tensor, its value on every rank, in rank order ([[tensor]] each when alone)."""
        if not self.distributed:
            return [[t] for t in tensors]
        gathered = []
        for tensor in tensors:
            copies = [torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device) for _ in range(self.size)]
            dist.all_gather(copies, tensor.contiguous())
            gathered.append(copies)
        return gathered

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (unchanged when alone)."""
        if self.distributed:
            for tensor in tensors:
                dist.all_reduce(tensor)
            torch._foreach_div_(tensors, float(self.size))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global --batch-size (train.py refuses one that does not split)."""
    return max(batch_size // processes, 1)


def world_from_env() -> World:
    """The World torchrun describes in the environment (rank 0 of 1 without torchrun)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    return World(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        size=size,
        local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
    )


def init_process_group(world: World, device: torch.device) -> None:
    """Join the launch's process group: NCCL between GPUs, gloo between CPU processes."""
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=PROCESS_GROUP_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Run the block on local rank 0 of each machine first (it generates data, writes label caches),
    then on the others, which then find everything in place."""
    if world.local_rank != 0:
        world.barrier()
    yield
    if world.local_rank == 0:
        world.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
