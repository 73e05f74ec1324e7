"""Writing a run's checkpoints: best.pt / epochN.pt first and last.pt last, each atomically; at the
end of training, best.pt stripped for inference."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from utils.atomic_write import atomic_write, copy_of
from utils.checkpoint.format import strip_for_inference, writer_of
from utils.errors import TrainingStopped, UserError
from utils.log import LOGGER


class CheckpointWriter:
    """Writes a run's checkpoints: best.pt / epochN.pt first and last.pt last, each atomically,
    and says when a mid-epoch last.pt is due. A write that fails (disk full, permissions) stops
    training with TrainingStopped; the previous last.pt is still whole."""

    def __init__(self, weights_dir: Path, interval_minutes: float):
        self.weights_dir = weights_dir
        weights_dir.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path = weights_dir / "last.pt", weights_dir / "best.pt"
        self.interval_s = interval_minutes * 60
        self.last_write = time.monotonic()
        for stale in weights_dir.glob(".*.pt.*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)

    def due(self) -> bool:
        """True when --save-interval minutes have passed since the last write (never when 0)."""
        return self.interval_s > 0 and time.monotonic() - self.last_write >= self.interval_s

    def write(self, checkpoint: dict, best: bool = False, copy_name: str | None = None) -> None:
        _check_finite(checkpoint)
        targets = ([self.best_path] if best else []) + ([self.weights_dir / copy_name] if copy_name else [])
        written: list[Path] = []
        for path in targets + [self.last_path]:
            try:  # serialised once, streamed to the first file (never whole in memory), copied to the others
                atomic_write(path, copy_of(written[0]) if written else writer_of(checkpoint))
                written.append(path)
            except OSError as error:
                if self.last_path.exists():
                    kept = (
                        f"the previous {self.last_path} is intact; free space or fix permissions, then continue "
                        f"with: python train.py --resume {self.last_path}"
                    )
                elif written:  # best.pt / epochN.pt of this epoch are whole training checkpoints
                    kept = (
                        f"{' and '.join(map(str, written))} of this epoch {'were' if len(written) > 1 else 'was'} "
                        f"written whole; free space or fix permissions, then continue with: python train.py "
                        f"--resume {written[0]}"
                    )
                else:
                    kept = "no checkpoint of this run exists yet"
                raise TrainingStopped(
                    f"could not write {path} ({error.strerror or error}); training stopped: {kept}"
                ) from None
        self.last_write = time.monotonic()

    def strip_best(self, metrics: dict[str, float]) -> None:
        """At the end of training: best.pt stripped to what inference needs, its EMA (see
        stripped_checkpoint), with the `metrics` of its epoch; a failed write leaves it whole."""
        try:
            before, after = strip_for_inference(self.best_path, metrics)
        except (OSError, UserError) as error:  # a full disk; a best.pt damaged or changed since it was written
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            LOGGER.warning(f"WARNING: could not strip {self.best_path} ({reason}): it stays a whole checkpoint")
            return
        LOGGER.info(
            f"Stripped {self.best_path} to its EMA weights for inference: {before / 1e6:.1f} MB -> "
            f"{after / 1e6:.1f} MB (last.pt keeps the training state; --keep-optimizer keeps best.pt whole)"
        )


def _check_finite(checkpoint: dict) -> None:
    """No NaN or inf ever reaches a checkpoint: refuse rather than write one."""
    for key in ("model", "ema"):
        floats = {name: t for name, t in checkpoint[key].items() if t.dtype.is_floating_point}
        if torch.stack([t.isfinite().all() for t in floats.values()]).all():  # one check, one device sync
            continue
        for name, tensor in floats.items():
            if not tensor.isfinite().all():
                raise TrainingStopped(
                    f"the {key} weights hold a non-finite value in {name}; the checkpoint was not "
                    "written (this should not happen: please report it)"
                )
