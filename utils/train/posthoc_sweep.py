"""Post-hoc EMA after training: a run's snapshots turned into checkpoints of any relative width,
BatchNorm statistics recomputed or combined, and a sweep of widths validated as train.py validated
(average.py --posthoc and benchmarks/averaging_study.py)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.checkpoint.format import averaged_checkpoint, load_checkpoint, model_from_checkpoint
from utils.errors import UserError
from utils.eval.metrics import DetectionMetrics
from utils.log import LOGGER
from utils.train.as_trained import evaluate_as_trained
from utils.train.averaging import TrainingBatches, first_non_finite
from utils.train.ema import power_exponent
from utils.train.posthoc import Snapshot, find_snapshots, reconstruct

# The relative widths a sweep tries: those the stored 0.05 and 0.10 reproduce to a profile residual
# under 5% over a 30-epoch run (0.28: 23%, and its mAP@0.5:0.95 fell to 0.003 with BatchNorm combined).
SWEEP_WIDTHS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.17, 0.22)
POOR_FIT = 0.05  # a profile residual above which a reconstruction is only approximate: said in the log
BN_MODES = ("average", "recalibrate")


@dataclass(frozen=True)
class PosthocRun:
    """A finished (or stopped) run with snapshots: its last.pt, its snapshots, and the optimizer
    step and epoch to reconstruct at."""

    run_dir: Path
    last: dict
    snapshots: list[Snapshot]
    updates: int
    epoch: int

    @classmethod
    def open(cls, path: str | Path, at_epoch: int | None = None) -> PosthocRun:
        """The run of folder `path` (or of its weights/last.pt), at its last snapshot or at the end
        of `at_epoch` (from a snapshot of that epoch, else the run's results.csv 'ema/updates')."""
        run_dir = posthoc_run_dir(path)
        last_path = run_dir / "weights" / "last.pt"
        if not last_path.is_file():
            raise UserError(f"{path} is not a run folder: it has no weights/last.pt")
        snapshots = find_snapshots(run_dir)
        if at_epoch is None:
            latest = max(snapshots, key=lambda s: s.updates)
            return cls(run_dir, load_checkpoint(last_path, mmap=True), snapshots, latest.updates, latest.epoch)
        updates = next((s.updates for s in snapshots if s.epoch == at_epoch), None)
        if updates is None:
            updates = updates_at_epoch(run_dir / "results.csv", at_epoch, {s.epoch for s in snapshots})
        return cls(run_dir, load_checkpoint(last_path, mmap=True), snapshots, updates, at_epoch)


def posthoc_run_dir(path: str | Path) -> Path:
    """The run folder --posthoc names: the folder given, or the run of the weights/last.pt given."""
    path = Path(path)
    return path.parent.parent if path.is_file() else path


def updates_at_epoch(csv_path: Path, epoch: int, snapshot_epochs: set[int] = frozenset()) -> int:
    """The EMA's update count (the optimizer steps taken) at the end of `epoch`, from results.csv;
    UserError listing the epochs there are (those of results.csv and of the snapshots)."""
    rows = []
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    updates = next((int(float(r["ema/updates"])) for r in rows if int(r["epoch"]) == epoch), None)
    if updates is None:
        epochs = sorted({int(r["epoch"]) for r in rows} | set(snapshot_epochs))
        raise UserError(
            f"--at-epoch {epoch}: no snapshot of that epoch, and {csv_path} has no row for it; the run has "
            f"epochs {epoch_ranges(epochs)}"
        )
    return updates


def epoch_ranges(epochs: list[int]) -> str:
    """Sorted epochs as '0-4, 7, 9-12' ('none' when empty)."""
    spans: list[list[int]] = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans) or "none"


def reconstructed_checkpoint(run: PosthocRun, sigma_rel: float) -> dict:
    """The post-hoc EMA of relative width `sigma_rel` as an average-kind checkpoint of the run's
    epoch (BatchNorm statistics combined like the weights), recording how it was made under 'posthoc'."""
    power_exponent(sigma_rel)  # a width no power EMA has is refused here
    result = reconstruct(run.snapshots, sigma_rel, run.updates)
    description = (
        f"post-hoc EMA of relative width {sigma_rel:g} after {run.updates} optimizer steps (epoch {run.epoch}): "
        f"the least-squares combination of {len(result.sources)} power-EMA snapshots "
        f"(profile residual {result.residual:.2%})"
    )
    if result.residual > POOR_FIT:
        LOGGER.warning(
            f"WARNING: the stored power EMAs reproduce width {sigma_rel:g} only approximately (profile residual "
            f"{result.residual:.1%}); widths of about 0.02 to 0.22 are well covered"
        )
    not_finite = first_non_finite(result.weights)
    if not_finite is not None:
        raise UserError(f"the reconstruction of width {sigma_rel:g} holds NaN or inf in '{not_finite}'")
    posthoc = {
        "sigma_rel": sigma_rel,
        "updates": run.updates,
        "epoch": run.epoch,
        "residual": result.residual,
        "coefficients": result.coefficients,
        "snapshots": [f"{s.path.name}:{s.name}" for s in result.sources],
    }
    checkpoint = averaged_checkpoint(run.last, result.weights, description, posthoc=posthoc)
    checkpoint["epoch"] = run.epoch  # the weights' epoch (--at-epoch), which a recalibration augments as
    return checkpoint


def prepared_model(checkpoint: dict, bn: str, batches: TrainingBatches | None, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model on `device`, ready to validate. bn 'recalibrate': its BatchNorm
    statistics recomputed on `batches` (made for the run's epoch), written back into the
    checkpoint (whose 'source' says so); 'average': kept as combined."""
    model = model_from_checkpoint(checkpoint, "ema", source=checkpoint["source"])
    model = model.to(device, memory_format=torch.channels_last)
    if bn == "recalibrate":
        images = batches.recalibrate(model, device)
        checkpoint["ema"] = checkpoint["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        checkpoint["source"] += f"; BatchNorm statistics recomputed on {images} augmented training images"
        not_finite = first_non_finite(checkpoint["ema"])
        if not_finite is not None:
            raise UserError(
                f"BatchNorm recalibration gave NaN or inf in '{not_finite}' (the average's activations "
                "overflow on the training images); nothing was written"
            )
    else:
        checkpoint["source"] += "; BatchNorm statistics combined as the weights"
    return model.eval()


@dataclass(frozen=True)
class SweepRow:
    """One width of a sweep: the fit's profile residual and the validation metrics."""

    sigma_rel: float
    residual: float
    metrics: DetectionMetrics


def sweep(
    run: PosthocRun,
    widths: list[float],
    *,
    bn: str,
    batches: TrainingBatches | None,
    loader: DataLoader,
    device: torch.device,
) -> tuple[list[SweepRow], dict]:
    """Reconstruct and validate each width; the rows and the best checkpoint (by fitness, as best.pt)."""
    rows, best, best_fitness = [], None, -1.0
    for width in widths:
        checkpoint = reconstructed_checkpoint(run, width)
        model = prepared_model(checkpoint, bn, batches, device)
        metrics = evaluate_as_trained(model, checkpoint, loader, device).metrics
        rows.append(SweepRow(width, checkpoint["posthoc"]["residual"], metrics))
        if metrics.fitness > best_fitness:
            best, best_fitness = checkpoint, metrics.fitness
    return rows, best


def sweep_table(rows: list[SweepRow], best_width: float) -> str:
    """The sweep as a markdown table, the best width marked."""
    lines = ["| sigma_rel | profile residual | P | R | mAP@0.5 | mAP@0.5:0.95 |", "|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        m = row.metrics
        mark = " (best)" if row.sigma_rel == best_width else ""
        lines.append(
            f"| {row.sigma_rel:g}{mark} | {row.residual:.2%} | {m.precision:.4f} | {m.recall:.4f} | "
            f"{m.map50:.4f} | {m.map50_95:.4f} |"
        )
    return "\n".join(lines)
