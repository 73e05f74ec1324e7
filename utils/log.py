"""Run output behind one small interface: console logging, results.csv and TensorBoard scalars."""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path

LOGGER = logging.getLogger("emayolo")


def setup_logging(rank: int = 0) -> None:
    """Plain messages on stdout, as the command-line tools print them; under torchrun, ranks
    other than 0 print only errors, prefixed with their rank (rank 0 says everything once)."""
    logging.basicConfig(format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
                        level=logging.INFO if rank == 0 else logging.ERROR, stream=sys.stdout, force=True)


def interactive() -> bool:
    """Progress bars only on a terminal: in logs and CI they would print every refresh."""
    return sys.stderr.isatty()


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
