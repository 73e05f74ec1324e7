"""Processes that train separately under torchrun, each with weights of its own: SWAP's second
phase (--swap-epoch; Gupta et al. 2020, "Stochastic Weight Averaging in Parallel: Large-Batch
Training that Generalizes Well") and filter grafting (--graft, utils/train/grafting.py).

Such a process forwards without DDP (no gradient all-reduce), with the loss of one process and
its own shuffle of the data. A checkpoint must hold every process's weights: at each checkpoint
ranks 1.. each write their own state (model, optimizer, scaler, RNG, hyp) to a file of their own
beside rank 0's checkpoint (ProcessFiles), which names those files, so no file and no process
holds more than one process's state whatever the number of processes; on --resume each rank
reads its own back. At the end of a SWAP run the processes' weights are averaged
(utils/train/final_averages.py then recomputes BatchNorm statistics, validates and writes
weights/swap.pt).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch
from torch import nn

from utils.checkpoint.format import save_checkpoint
from utils.dist import World, unwrap
from utils.errors import TrainingStopped, UserError

PROCESS_FORMAT = "ema-yolo-process-state"  # the marker of a file written by ProcessFiles
PROCESS_KEYS = ("model", "optimizer", "scaler", "rng")  # what a process resumes of its own (and its hyp)


def training_alone(swap_epoch: int, graft: bool, epoch: int, world: World) -> bool:
    """Whether the processes train separately in epoch `epoch`: all along with --graft, from
    --swap-epoch on with SWAP."""
    return world.distributed and (graft or 0 < swap_epoch <= epoch)


def process_seed(seed: int, graft: bool, world: World) -> int:
    """The seed of this process's model and data augmentation: --seed, plus the rank under --graft."""
    return seed + (world.rank if graft and world.distributed else 0)


def process_file_name(stem: str, rank: int, token: str) -> str:
    """The file holding rank `rank`'s own state for the checkpoint written with `token`
    ('last.rank1.<token>.pt'; 'epoch3.rank1.<token>.pt' for a save that also wrote epoch3.pt)."""
    return f"{stem}.rank{rank}.{token}.pt"


class ProcessFiles:
    """The files in which ranks 1.. keep their own states, one file per rank and save, in the run's
    weights/ folder; rank 0's checkpoint (last.pt, and best.pt / epochN.pt written with it) records
    their token, so a checkpoint's size does not grow with the number of processes.

    A save is collective, in an order that leaves a coherent set whenever a process is killed:
    write() puts every rank's new file under a new name (a token of rank 0's), then rank 0 writes
    its checkpoint naming them, then saved() removes each rank's files that no checkpoint names any
    more (last.pt's previous ones; those of an epochN.pt stay with it). A kill before last.pt is
    replaced leaves the previous last.pt and its files; a file left by such a kill is removed at
    the next save.

    Each rank writes into the run folder as its machine sees it: on several machines without a
    shared filesystem, each machine's ranks keep their files on its own disk, where a --resume on
    the same machines finds them again."""

    def __init__(self, weights_dir: Path, world: World):
        self.weights_dir, self.world = weights_dir, world
        self.written: Path | None = None  # this rank's file of the last save (ranks 1..)
        self.stem = "last"  # that save's
        if not world.is_main:
            weights_dir.mkdir(parents=True, exist_ok=True)
            for stale in weights_dir.glob(f".*.rank{world.rank}.*.pt.*.tmp"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)

    def write(self, stem: str, state: dict | None) -> dict:
        """Ranks 1.. write `state` (this process's own: process_state() and hyp; None on rank 0) to a
        new file (collective); returns what rank 0's checkpoint records of them, its
        'process_files'. `stem`: 'last', or 'epochN' when the save also writes epochN.pt. A rank
        that cannot write stops training on rank 0, before its checkpoint is written."""
        world = self.world
        token = world.from_main(secrets.token_hex(4) if world.is_main else None)
        error = None
        if not world.is_main:
            path = self.weights_dir / process_file_name(stem, world.rank, token)
            saved = {"format": PROCESS_FORMAT, "token": token, "rank": world.rank, "state": state}
            try:
                save_checkpoint(path, saved)
                self.written, self.stem = path, stem
            except OSError as failure:
                error = f"{path} ({failure.strerror or failure})"
        errors = [e for e in world.gather_to_main(error) or [] if e]
        if errors:  # the other ranks wait until torchrun ends them, as rank 0's process ends
            last = self.weights_dir / "last.pt"
            kept = (
                f"the previous {last} and the files it names are intact; free space or fix permissions, then "
                f"continue with: torchrun --nproc_per_node {world.size} train.py --resume {last}"
                if last.exists()
                else "no checkpoint of this run exists yet"
            )
            raise TrainingStopped(f"could not write {', '.join(errors)}; training stopped: {kept}")
        return {"token": token, "stem": stem, "processes": world.size}

    def saved(self) -> None:
        """After rank 0 wrote its checkpoint (collective): each rank removes its files that no
        checkpoint names any more (last.pt's previous ones, the epochN.pt's this save replaced)."""
        self.world.barrier()
        if self.written is None:
            return
        rank = self.world.rank
        stale = {
            *self.weights_dir.glob(f"last.rank{rank}.*.pt"),
            *self.weights_dir.glob(f"{self.stem}.rank{rank}.*.pt"),
        }
        for path in stale - {self.written}:
            path.unlink(missing_ok=True)


def own_process_state(checkpoint: dict, path: Path, world: World) -> dict | None:
    """This rank's own state (process_state() and hyp) in a checkpoint written by processes
    training separately; None on rank 0, whose state is the checkpoint's own. Read from the file
    the checkpoint names beside it (mapped, not copied, until used), or from its process_states
    (the layout before ProcessFiles, which held every process's state). The checkpoint must come
    from as many processes."""
    record, states = checkpoint.get("process_files"), checkpoint.get("process_states")
    if not record and not states:
        raise UserError(f"{path} holds no states of its separate processes: it cannot resume them")
    processes = record["processes"] if record else len(states) + 1
    if processes != world.size:
        raise UserError(
            f"this checkpoint was written by {processes} processes training separately, each with weights "
            f"of its own: resume it under torchrun with --nproc_per_node {processes} (not {world.size})"
        )
    if world.is_main:
        return None
    if not record:
        return states[world.rank - 1]
    own = Path(path).parent / process_file_name(record["stem"], world.rank, record["token"])
    if not own.is_file():
        raise UserError(
            f"{path} was written by {processes} processes training separately, and rank {world.rank}'s own state, "
            f"{own}, is missing. A last.pt or epochN.pt keeps the files it names beside it (copy them with it; "
            "best.pt's go at the next checkpoint; on several machines without a shared filesystem, each machine "
            "keeps its ranks' files on its own disk)"
        )
    try:
        saved = torch.load(own, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a damaged file; all mean "unreadable"
        raise UserError(f"{own} is unreadable (truncated or damaged): {str(error).strip()[:200]}") from None
    if not isinstance(saved, dict) or saved.get("format") != PROCESS_FORMAT:
        raise UserError(f"{own} is not the state of a process training separately")
    if (saved.get("token"), saved.get("rank")) != (record["token"], world.rank):
        raise UserError(f"{own} is not rank {world.rank}'s state of {path} (it was written by another save)")
    return saved["state"]


def resumed_state(state: dict, checkpoint: dict, path: Path, world: World, alone: bool) -> tuple[dict, dict]:
    """The run state and hyp this rank resumes from `checkpoint` (read from `path`; `state`: its
    training_state()): the checkpoint's, rank 0's; when the processes train separately (`alone`),
    ranks 1.. take their own model, optimizer, scaler, RNG states and hyp (own_process_state)."""
    own = own_process_state(checkpoint, path, world) if alone else None
    if own is None:
        return state, checkpoint["hyp"]
    return {**state, **{key: own[key] for key in PROCESS_KEYS}}, own.get("hyp", checkpoint["hyp"])


@torch.no_grad()
def averaged_over_processes(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The mean of every process's floating-point weights and buffers (integer buffers are this
    rank's): collective. BatchNorm statistics averaged here are recomputed afterwards."""
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    world.mean_([v for v in state.values() if v.dtype.is_floating_point])
    return state
