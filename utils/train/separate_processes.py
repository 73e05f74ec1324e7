"""Processes that train separately under torchrun, each with weights of its own: SWAP's second
phase (--swap-epoch; Gupta et al. 2020, "Stochastic Weight Averaging in Parallel: Large-Batch
Training that Generalizes Well") and filter grafting (--graft, utils/train/grafting.py).

Such a process forwards without DDP (no gradient all-reduce), with the loss of one process and
its own shuffle of the data. A checkpoint must hold every process's weights: rank 0 gathers the
other ranks' own states (model, optimizer, scaler, RNG, hyp) into its checkpoint, and on
--resume each rank takes its own back. At the end of a SWAP run the processes' weights are
averaged (utils/train/final_averages.py then recomputes BatchNorm statistics, validates and
writes weights/swap.pt).
"""

from __future__ import annotations

import io

import torch
from torch import nn

from utils.dist import World, unwrap
from utils.errors import UserError


def training_alone(swap_epoch: int, graft: bool, epoch: int, world: World) -> bool:
    """Whether the processes train separately in epoch `epoch`: all along with --graft, from
    --swap-epoch on with SWAP."""
    return world.distributed and (graft or 0 < swap_epoch <= epoch)


def own_hyp(checkpoint: dict, world: World) -> dict:
    """The hyp this rank resumes with: its own when the checkpoint holds process states, else the run's."""
    states = checkpoint.get("process_states")
    if world.rank == 0 or not states or len(states) < world.rank:
        return checkpoint["hyp"]
    return states[world.rank - 1].get("hyp", checkpoint["hyp"])


def process_seed(seed: int, graft: bool, world: World) -> int:
    """The seed of this process's model and data augmentation: --seed, plus the rank under --graft."""
    return seed + (world.rank if graft and world.distributed else 0)


def gather_own_states(world: World, state: dict) -> list[dict] | None:
    """Ranks 1.. `state` (on the CPU) in rank order on rank 0, None on the others: collective.
    Each state travels serialised, so tensors arrive on rank 0's CPU whatever device they left."""
    buffer = io.BytesIO()
    torch.save(state if not world.is_main else None, buffer)
    gathered = world.gather_to_main(buffer.getvalue())
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(data), map_location="cpu", weights_only=True) for data in gathered[1:]]


def own_process_state(states: list[dict] | None, world: World) -> dict | None:
    """This rank's own state in a checkpoint's process_states (ranks 1..); None on rank 0, whose
    state is the checkpoint's own. The checkpoint must come from as many processes."""
    if not states:
        raise UserError("the checkpoint holds no states of its separate processes: it cannot resume them")
    if len(states) + 1 != world.size:
        raise UserError(
            f"this checkpoint was written by {len(states) + 1} processes training separately, each with weights "
            f"of its own: resume it under torchrun with --nproc_per_node {len(states) + 1} (not {world.size})"
        )
    return None if world.is_main else states[world.rank - 1]


@torch.no_grad()
def averaged_over_processes(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The mean of every process's floating-point weights and buffers (integer buffers are this
    rank's): collective. BatchNorm statistics averaged here are recomputed afterwards."""
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    world.mean_([v for v in state.values() if v.dtype.is_floating_point])
    return state
