"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): snapshots of two power-function EMAs saved during training, from which the
EMA of any relative width is reconstructed afterwards as a least-squares combination.

The power EMA of exponent g after t steps weighs the model after step k by
(k^(g+1) - (k-1)^(g+1)) / t^(g+1) (utils/train/ema.py's PowerEMA). A snapshot is such a profile
over the steps; the combination of snapshots whose profiles best match the wanted one (in the
least-squares sense, over the discrete steps) gives weights whose profile is that combination,
because every average is linear in the models it averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint.format import SNAPSHOT, load_checkpoint, posthoc_snapshot, save_checkpoint
from utils.errors import UserError
from utils.log import LOGGER
from utils.train.ema import PowerEMA, power_exponent

SNAPSHOT_FOLDER = "posthoc"  # under the run's weights/


def snapshot_epochs(epochs: int, count: int) -> list[int]:
    """The epochs (0-based) at whose end the `count` snapshots are saved: evenly spaced, the last at
    the final epoch; at most one per epoch."""
    count = min(count, epochs)
    return sorted({-(-(i + 1) * epochs // count) - 1 for i in range(count)})


def power_profile(gamma: float, updates: int, length: int) -> np.ndarray:
    """Weights of the models after steps 1..length in a power EMA of exponent `gamma` taken after
    `updates` steps: (k^(g+1) - (k-1)^(g+1)) / t^(g+1) for k <= t, 0 after; they sum to 1."""
    k = np.arange(length + 1, dtype=np.float64)
    cumulative = np.minimum(k / updates, 1.0) ** (gamma + 1.0)
    return np.diff(cumulative)


def least_squares_coefficients(
    sources: list[tuple[float, int]], gamma: float, updates: int
) -> tuple[np.ndarray, float]:
    """Coefficients c minimising || sum_i c_i profile(sources_i) - profile(gamma, updates) || over
    the steps, for sources given as (gamma, updates) pairs; and the relative residual of the fit."""
    length = max(updates, *(t for _, t in sources))
    basis = np.stack([power_profile(g, t, length) for g, t in sources], axis=1)  # (steps, sources)
    target = power_profile(gamma, updates, length)
    coefficients = np.linalg.lstsq(basis, target, rcond=None)[0]
    residual = float(np.linalg.norm(basis @ coefficients - target) / np.linalg.norm(target))
    return coefficients, residual


class SnapshotWriter:
    """During training (rank 0): saves the post-hoc power EMAs into weights/posthoc/ at the end of
    the scheduled epochs (and at an early stop), each file written atomically. A new run first
    removes the snapshots an earlier run left in its folder (--exist-ok), so that they are never
    combined with its own; a resumed run keeps its own."""

    def __init__(self, folder: Path, epochs: int, count: int, new_run: bool):
        self.folder, self.due = folder, set(snapshot_epochs(epochs, count))
        stale = sorted(folder.glob("epoch*.pt")) if new_run and folder.is_dir() else []
        for path in stale:
            path.unlink()
        if stale:
            LOGGER.info(f"Removed {len(stale)} post-hoc snapshot(s) of an earlier run from {folder}")

    def write(self, epoch: int, averages: dict[str, PowerEMA], force: bool = False) -> Path | None:
        """Save the snapshot of `epoch` if it is due (or `force`: the run stops here); returns its path."""
        if epoch not in self.due and not force:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch{epoch:04d}.pt"
        save_checkpoint(path, posthoc_snapshot(epoch, {name: a.state_dict() for name, a in averages.items()}))
        return path


@dataclass(frozen=True)
class Snapshot:
    """One stored power EMA: file, exponent, steps folded in (the file is read again to combine)."""

    path: Path
    name: str
    gamma: float
    updates: int
    epoch: int


def find_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every power EMA stored in the run's weights/posthoc/ snapshots; a clear error when there are none."""
    folder = run_dir / "weights" / SNAPSHOT_FOLDER
    paths = sorted(folder.glob("epoch*.pt")) if folder.is_dir() else []
    if not paths:
        raise UserError(f"{run_dir} has no post-hoc EMA snapshots in {folder}: train with --posthoc-ema N to save them")
    snapshots = []
    for path in paths:
        checkpoint = load_checkpoint(path, mmap=True)  # only the counters are read here
        if checkpoint.get("kind") != SNAPSHOT:
            raise UserError(f"{path} is not a post-hoc EMA snapshot")
        for name, state in checkpoint["averages"].items():
            updates = int(state["updates"])
            if updates > 0:
                snapshot = Snapshot(path, name, power_exponent(float(state["sigma_rel"])), updates, checkpoint["epoch"])
                snapshots.append(snapshot)
    return snapshots


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed power EMA: its weights, the snapshots combined, their coefficients and the
    relative residual of the profile fit."""

    weights: dict[str, torch.Tensor]
    sources: list[Snapshot]
    coefficients: list[float]
    residual: float


def reconstruct(
    snapshots: list[Snapshot], sigma_rel: float, updates: int, stored_as: torch.dtype | None = None
) -> Reconstruction:
    """The power EMA of relative width `sigma_rel` after `updates` steps, as the least-squares
    combination of the snapshots taken at or before that step (sums in float64, then the snapshots'
    dtype; `stored_as`: each snapshot rounded to that dtype first, to measure what storing them so
    would cost). Integer buffers (num_batches_tracked) are the latest snapshot's."""
    sources = sorted((s for s in snapshots if s.updates <= updates), key=lambda s: s.updates)
    if not sources:
        raise UserError(f"no post-hoc snapshot was taken at or before optimizer step {updates}")
    coefficients, residual = least_squares_coefficients(
        [(s.gamma, s.updates) for s in sources], power_exponent(sigma_rel), updates
    )
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in sorted({s.path for s in sources}):  # in epoch order, each file read once
        averages = load_checkpoint(path, mmap=True)["averages"]
        for snapshot, coefficient in zip(sources, coefficients):
            if snapshot.path != path:
                continue
            for key, tensor in averages[snapshot.name]["module"].items():
                dtypes.setdefault(key, tensor.dtype)
                if not tensor.dtype.is_floating_point:
                    total[key] = tensor.clone()  # not averaged: the latest file's
                    continue
                term = coefficient * (tensor.to(stored_as) if stored_as else tensor).double()
                total[key] = total[key] + term if key in total else term
    weights = {key: tensor.to(dtypes[key]) for key, tensor in total.items()}
    return Reconstruction(weights, sources, [float(c) for c in coefficients], residual)
