"""The process's place in a torchrun launch (rank, world size), the few collectives training needs,
and unwrapping of parallel and compiled models. Everything distributed is torch.distributed's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import UserError

T = TypeVar("T")

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

    def decided_by_main(self, decide: Callable[[], T]) -> T:
        """decide() run on rank 0 alone, its result on every rank (a picklable object). A UserError
        it raises is raised on every rank, so none waits for a result that never comes."""
        if not self.distributed:
            return decide()
        outcome = None
        if self.is_main:
            try:
                outcome = (decide(), None)
            except UserError as error:
                outcome = (None, error)
        value, error = self.from_main(outcome)
        if error is not None:
            raise error
        return value

    def copy_from_main_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` copied into them on every rank, in place (unchanged when
        alone): one broadcast per dtype of the tensors flattened together, in any memory format."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            if not self.is_main:
                parts = flat.split([t.numel() for t in group])
                torch._foreach_copy_(group, [part.view(t.shape) for part, t in zip(parts, group)])

    def gather_to_main(self, value: object) -> list[object] | None:
        """Every rank's `value` (a picklable object), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def from_next(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The next rank's values of `tensors` (rank r + 1's on rank r, rank 0's on the last; the
        same shapes, dtypes and layouts on every rank), each rank sending its own to the one before
        it: point-to-point, so each rank holds one copy of them whatever the world size (`tensors`
        themselves when alone)."""
        if not self.distributed:
            return list(tensors)
        layouts = [torch.channels_last if _channels_last(t) else torch.contiguous_format for t in tensors]
        received = [torch.empty_like(t, memory_format=layout) for t, layout in zip(tensors, layouts)]
        previous, following = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        sends = [dist.P2POp(dist.isend, _dense(t).contiguous(), previous, tag=i) for i, t in enumerate(tensors)]
        receives = [dist.P2POp(dist.irecv, _dense(t), following, tag=i) for i, t in enumerate(received)]
        for request in dist.batch_isend_irecv(sends + receives):
            request.wait()
        return received

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (unchanged when alone)."""
        if self.distributed:
            for tensor in tensors:
                dist.all_reduce(tensor)
            torch._foreach_div_(tensors, float(self.size))

    def gathered(self, value: object) -> list[object]:
        """Every rank's `value` (a picklable object) in rank order, on every rank (collective)."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def largest_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced by its elementwise maximum over all ranks, in place (itself when alone)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value` (collective; `value` itself when alone)."""
        return min(self.gathered(value))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the contiguous tensor its memory holds, for point-to-point ops, which send
    contiguous tensors only: a channels_last (N, C, H, W) tensor as its (N, H, W, C) view."""
    return tensor.permute(0, 2, 3, 1) if _channels_last(tensor) else tensor


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
    """Run the block on local rank 0 of each machine first (it generates the embedded dataset),
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
