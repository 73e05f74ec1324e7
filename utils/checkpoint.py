"""Checkpoints: a plain versioned dict that torch.load(..., weights_only=True) reads, written atomically.

Keys: format, format_version, epoch (last completed, 0-based), best_fitness, best_epoch,
finished, loop (where training goes on: next epoch and batch, the epoch's loss sums and step
counters), model (fp32 state dict of the raw model, float64 with train.py --float64: training
resumes from it), ema (state dict, same dtype), updates, ema_decay, ema_tau, optimizer, scaler,
model_yaml, names, hyp, opt (the run's options), world_size (its processes: opt's batch_size is
split over them), rng (python, numpy, torch, cuda), swa (the --swa-epochs running average so
far, or None), date, versions. swa.pt has the same keys and average.py's output those that
val.py and detect.py read, each with the averaged weights as both ema and model and a 'source'
line saying what they average.
"""

from __future__ import annotations

import io
import pickle
import random
import time
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.yolo import DetectionModel
from utils.atomic_write import atomic_write
from utils.dist import unwrap
from utils.ema import ModelEMA
from utils.errors import TrainingStopped, UserError
from utils.foreign_weights import read_yolov5_checkpoint

FORMAT = "ema-yolo-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically: a crash at any moment leaves either the old file or the new one."""
    atomic_write(path, serialise(checkpoint))


def serialise(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """Read one of our checkpoints with weights_only=True; any other file is a UserError naming it.

    With trust_pickle (the user's --trust-pickle), a file that needs full unpickling is read as a
    YOLOv5 checkpoint instead, giving the model entries only (model_yaml, names, ema, model)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle is reported below as one clear error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if trust_pickle:
            return read_yolov5_checkpoint(path)
        raise UserError(f"{path} is not a checkpoint of this framework: loading it would need full unpickling, "
                        "which can run arbitrary code, so it is refused. If it is a YOLOv5 checkpoint you trust, "
                        "add --trust-pickle to read its weights") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise UserError(f"checkpoint {path} is unreadable (truncated or not a PyTorch file): {str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this framework (no '{FORMAT}' format marker)")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {checkpoint.get('format_version')}; "
                        f"this version reads {FORMAT_VERSION}")
    return checkpoint


def rng_state() -> dict:
    """Python, numpy and torch RNG states in weights_only-loadable form."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": numpy_state[1].tolist(), "pos": numpy_state[2], "has_gauss": numpy_state[3],
                  "cached_gaussian": numpy_state[4]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the RNG states that rng_state() recorded."""
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", np.array(numpy_state["key"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate needs the nested tuples that a save/load round trip may turn into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_from_checkpoint(checkpoint: dict, weights: str = "ema", source: str = "checkpoint") -> DetectionModel:
    """Rebuild the detector from a checkpoint's model YAML and load the `ema` or `model` weights."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = checkpoint.get(weights)
    if state is None:
        raise UserError(f"{source} holds no '{weights}' weights")
    model = DetectionModel(checkpoint["model_yaml"])
    if any(t.dtype == torch.float64 for t in state.values()):
        model.double()  # a train.py --float64 run's weights stay in double precision
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{source}: its '{weights}' weights do not fit its model YAML: {str(error).splitlines()[0]}") from None
    model.names = list(checkpoint["names"])
    model.hyp = dict(checkpoint.get("hyp") or {})
    return model


def make_checkpoint(*, loop: dict, finished: bool, model: torch.nn.Module, ema: ModelEMA,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    names: list[str], hyp: dict, opt: dict, world_size: int = 1, swa: ModelEMA | None = None) -> dict:
    """Everything needed to resume exactly, as plain types and tensors (see the module docstring).

    `loop` is the loop position: the next epoch and batch to run and the running totals of that
    epoch; `epoch` is the last completed epoch (-1 inside the first)."""
    bare = unwrap(model)
    ema_state = ema.state_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": loop["epoch"] - 1,
        "best_fitness": float(loop["best_fitness"]),
        "best_epoch": loop["best_epoch"],
        "finished": finished,
        "loop": loop,
        "model": bare.state_dict(),  # saved at once, so the live tensors need no copy
        "ema": ema_state["module"],
        "updates": ema_state["updates"],
        "ema_decay": ema_state["decay"],
        "ema_tau": ema_state["tau"],
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "model_yaml": bare.yaml,
        "names": list(names),
        "hyp": dict(hyp),
        "opt": dict(opt),
        "world_size": world_size,
        "rng": rng_state(),
        "swa": swa.state_dict() if swa is not None else None,  # --swa-epochs: the running average so far
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},  # plain str: weights_only
    }


def ema_state(checkpoint: dict) -> dict:
    """The checkpoint's EMA entries in the form ModelEMA.load_state_dict takes."""
    return {"module": checkpoint["ema"], "updates": checkpoint["updates"], "decay": checkpoint["ema_decay"],
            "tau": checkpoint["ema_tau"]}


def load_for_inference(path: str | Path, weights: str, device: torch.device,
                       trust_pickle: bool = False) -> tuple[dict, DetectionModel]:
    """A checkpoint and its `ema` (or `model`) weights as an eval-mode, channels_last model on `device`."""
    checkpoint = load_checkpoint(path, trust_pickle)
    model = model_from_checkpoint(checkpoint, weights, source=str(path)).eval()
    return checkpoint, model.to(device, memory_format=torch.channels_last)


def transfer_matching_weights(model: torch.nn.Module, checkpoint: dict, exclude: tuple[str, ...] = (),
                              weights: str = "ema") -> tuple[int, int]:
    """Load the checkpoint's EMA weights (else its model weights; `weights`='model': the model
    weights) wherever name and shape match. Returns (tensors transferred, tensors in the model)."""
    source = (checkpoint.get("model") if weights == "model" else checkpoint.get("ema") or checkpoint.get("model")) or {}
    own = model.state_dict()
    matched = {k: v for k, v in source.items()
               if k in own and own[k].shape == v.shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


class CheckpointWriter:
    """Writes a run's checkpoints: best.pt / epochN.pt first and last.pt last, each atomically,
    and says when a mid-epoch last.pt is due. A write that fails (disk full, permissions) stops
    training with TrainingStopped; the previous last.pt is still whole."""

    def __init__(self, weights_dir: Path, interval_minutes: float):
        self.weights_dir = weights_dir
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
        data = serialise(checkpoint)  # once, however many files get it
        targets = ([self.best_path] if best else []) + ([self.weights_dir / copy_name] if copy_name else [])
        for path in targets + [self.last_path]:
            try:
                atomic_write(path, data)
            except OSError as error:
                kept = (f"the previous {self.last_path} is intact; free space or fix permissions, then continue "
                        f"with: python train.py --resume {self.last_path}" if self.last_path.exists()
                        else "no checkpoint of this run exists yet")
                raise TrainingStopped(f"could not write {path} ({error.strerror or error}); training stopped: {kept}") from None
        self.last_write = time.monotonic()


def _check_finite(checkpoint: dict) -> None:
    """No NaN or inf ever reaches a checkpoint: refuse rather than write one."""
    for key in ("model", "ema"):
        floats = {name: t for name, t in checkpoint[key].items() if t.dtype.is_floating_point}
        if torch.stack([t.isfinite().all() for t in floats.values()]).all():  # one check, one device sync
            continue
        for name, tensor in floats.items():
            if not tensor.isfinite().all():
                raise TrainingStopped(f"the {key} weights hold a non-finite value in {name}; the checkpoint was not "
                                      "written (this should not happen: please report it)")
