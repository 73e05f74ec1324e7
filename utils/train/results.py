"""What a training run reports per epoch: the results.csv row, written with TensorBoard scalars."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from utils.eval.evaluate import EvalResult

METRIC_NAMES = ("precision", "recall", "mAP_0.5", "mAP_0.5:0.95")


def metric_columns(prefix: str, result: EvalResult | None) -> dict:
    """P, R, mAP@0.5, mAP@0.5:0.95 under `prefix` (zeros for an epoch not validated)."""
    metrics = result.metrics if result is not None else None
    values = (metrics.precision, metrics.recall, metrics.map50, metrics.map50_95) if metrics else (0.0,) * 4
    return {f"{prefix}{name}": v for name, v in zip(METRIC_NAMES, values)}


def results_row(
    loss_names: tuple[str, ...],
    mean_loss: list[float],
    result: EvalResult | None,
    optimizer: torch.optim.Optimizer,
    ema_updates: int,
    others: dict[str, EvalResult | None] | None = None,
) -> dict:
    """One results.csv row: the epoch's train losses, the EMA's validation metrics and losses, the
    metrics of what --val names (raw/..., power-0.05/...), each group's learning rate and the EMA's
    update count."""
    row = {f"train/{n}": v for n, v in zip(loss_names, mean_loss)}
    row.update(metric_columns("metrics/", result))
    val_losses = result.loss.tolist() if result is not None else [0.0] * len(loss_names)
    row.update({f"val/{n}": v for n, v in zip(loss_names, val_losses)})
    for name, other in (others or {}).items():
        row.update(metric_columns(f"{name}/", other))
    row.update({f"x/lr{k}": group["lr"] for k, group in enumerate(optimizer.param_groups)})
    row["ema/updates"] = ema_updates
    return row


class RunLogger:
    """One row per epoch into results.csv (and TensorBoard), resumable without duplicate rows."""

    def __init__(self, run_dir: Path, start_epoch: int = 0, tensorboard: bool = True):
        self.csv_path = Path(run_dir) / "results.csv"
        self._keep_rows_before(start_epoch)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            self.writer = SummaryWriter(str(run_dir), purge_step=start_epoch)

    def _keep_rows_before(self, start_epoch: int) -> None:
        """On resume, drop rows of epochs that will run again (written before the interruption)."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < start_epoch]
        if len(kept) != len(rows):
            tmp = self.csv_path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            os.replace(tmp, self.csv_path)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["epoch", *values])
            writer.writerow([epoch, *(f"{v:.8g}" for v in values.values())])
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """The EMA's precision, recall and mAPs that results.csv holds for `epoch` (empty if none, or
        if the file was edited out of shape)."""
        try:
            with open(self.csv_path, newline="") as f:
                row = next((r for r in csv.DictReader(f) if int(r["epoch"]) == epoch), None)
            return {name: float(row[f"metrics/{name}"]) for name in METRIC_NAMES} if row else {}
        except (OSError, KeyError, ValueError, TypeError):
            return {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
