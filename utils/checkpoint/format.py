"""The checkpoint format: the one place that builds a checkpoint of each kind, reads one (older
versions included) and answers questions about it. A checkpoint is a plain versioned dict that
torch.load(..., weights_only=True) reads, written atomically.

Kinds (the 'kind' key):
- training: last.pt, best.pt, epochN.pt. Everything needed to resume exactly: epoch (last
  completed, 0-based), best_fitness, best_epoch, finished, loop (where training goes on: next
  epoch and batch, the epoch's loss sums and step counters), model (fp32 state dict of the raw
  model, float64 with train.py --float64: training resumes from it), ema (same dtype), updates,
  ema_state (the EMA's rule, its settings and its update and image counts; files before it have
  ema_decay and ema_tau, still written for the step rule), averages (the running averages that
  --average, --val and --posthoc-ema track, by name), optimizer, scaler, model_yaml, names, hyp,
  opt (the run's options; amp: the autocast it chose), precision (why: utils/precision.py's
  Precision, the timings behind --amp auto's choice included), world_size (its processes: opt's
  batch_size is split over them, except with --graft), rng (python, numpy, torch, cuda), swa
  (the --swa-epochs running average so far, or None), process_files (in --swap-epoch's second
  phase and with --graft, where each process has weights of its own: token, stem and processes,
  naming the files beside it that hold the model, optimizer, scaler, rng and hyp of ranks 1..,
  rank 0's being the file's own (see utils/train/separate_processes.py; files before them held
  those states in process_states); else None), date, versions.
- average: swa.pt and average.py's output. The keys val.py and detect.py read, the averaged
  weights as both ema and model, a 'source' line saying what they average; not resumable.
- weights: a finished run's best.pt, stripped by train.py at the end (unless --keep-optimizer) to what
  inference needs: ema (in the run's dtype, fp32 but with --float64), updates, ema_state, model_yaml,
  names, hyp, opt, precision, world_size, epoch (the weights'), loop, best_fitness, best_epoch, finished,
  metrics (results.csv's precision, recall and mAPs of that epoch), date, versions. No raw model,
  optimizer, scaler, RNG or other averages: not resumable (last.pt is); --weights starts from its EMA.
- posthoc-snapshot: weights/posthoc/epochNNNN.pt, the power EMAs of --posthoc-ema at the end of
  an epoch (epoch, averages by name: module, updates, images, sigma_rel); utils/train/posthoc.py
  combines them.
- foreign: a YOLOv5 or Ultralytics checkpoint read with --trust-pickle (in memory only, never written): model_yaml,
  names, ema and model, and its training image size when it recorded one.

Version 1 files (before 'kind') are read as version 2.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from models.yolo import DetectionModel
from utils.atomic_write import atomic_write
from utils.checkpoint.foreign import read_pickled_checkpoint
from utils.dist import per_process_batch
from utils.errors import UserError

FORMAT = "ema-yolo-checkpoint"
FORMAT_VERSION = 2
TRAINING, AVERAGE, FOREIGN, SNAPSHOT = "training", "average", "foreign", "posthoc-snapshot"
WEIGHTS = "weights"  # a finished run's best.pt, stripped to what inference needs
ZIP_MAGIC = b"PK\x03\x04"
DEFAULT_IMAGE_SIZE, DEFAULT_BATCH_SIZE = 640, 16  # YOLOv5's, for a foreign checkpoint that does not say
# What an averaged checkpoint keeps of the checkpoint it is built on: the model and how it was trained.
DESCRIPTION_KEYS = ("model_yaml", "names", "hyp", "opt", "precision", "world_size", "epoch", "loop", "ema_state")


# Building


def training_checkpoint(
    state: dict,
    *,
    finished: bool,
    model_yaml: dict,
    names: list[str],
    hyp: dict,
    opt: dict,
    world_size: int,
    precision: dict | None = None,
) -> dict:
    """A training checkpoint from a run's state_dict() (model, ema, averages, swa, optimizer, scaler,
    loop, rng: see utils/train/run.py) and the run's description; training_state() is its inverse."""
    ema, loop = state["ema"], state["loop"]
    ema_state = {k: v for k, v in ema.items() if k != "module"}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": TRAINING,
        "epoch": loop["epoch"] - 1,
        "best_fitness": float(loop["best_fitness"]),
        "best_epoch": loop["best_epoch"],
        "finished": finished,
        "loop": loop,
        "model": state["model"],
        "ema": ema["module"],
        "updates": ema["updates"],
        "ema_state": ema_state,
        "ema_decay": ema.get("decay"),  # the layout before ema_state, for readers of older files
        "ema_tau": ema.get("tau"),
        "averages": state["averages"],
        "optimizer": state["optimizer"],
        "scaler": state["scaler"],
        "model_yaml": model_yaml,
        "names": list(names),
        "hyp": dict(hyp),
        "opt": dict(opt),
        "precision": dict(precision) if precision else None,
        "world_size": world_size,
        "rng": state["rng"],
        "swa": state["swa"],  # --swa-epochs: the running average so far
        "process_files": state.get("process_files"),  # processes training alone: ranks 1..'s files
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},  # plain str: weights_only
    }


def training_state(checkpoint: dict) -> dict:
    """The run state a training checkpoint holds, laid out as the run's state_dict() gives it."""
    if checkpoint.get("kind") != TRAINING:
        raise UserError(
            f"this is {describe_kind(checkpoint)}, which holds no training state to resume; "
            "start a new run from it with --weights"
        )
    return {
        "model": checkpoint["model"],
        "optimizer": checkpoint["optimizer"],
        "scaler": checkpoint["scaler"],
        "loop": checkpoint["loop"],
        "rng": checkpoint["rng"],
        "swa": checkpoint.get("swa"),
        "averages": checkpoint.get("averages") or {},
        "ema": {"module": checkpoint["ema"], **ema_state(checkpoint)},
    }


def ema_state(checkpoint: dict) -> dict:
    """The EMA's counters and settings (ModelEMA.state_dict() without the weights), also from files
    written before ema_state (YOLOv5's step rule, images not counted)."""
    if checkpoint.get("ema_state") is not None:
        return dict(checkpoint["ema_state"])
    return {"updates": checkpoint["updates"], "decay": checkpoint["ema_decay"], "tau": checkpoint["ema_tau"]}


def posthoc_snapshot(epoch: int, averages: dict[str, dict]) -> dict:
    """A post-hoc EMA snapshot: the state_dict() of each power EMA at the end of `epoch`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": SNAPSHOT,
        "epoch": epoch,
        "averages": averages,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def averaged_checkpoint(base: dict, weights: dict[str, torch.Tensor], source: str, **extra) -> dict:
    """An average-kind checkpoint: `base`'s model description with `weights` as both ema and model
    (so val.py and detect.py read it either way), and `source` saying what was averaged."""
    checkpoint = _described(base, AVERAGE)
    checkpoint.update(
        {
            "finished": True,
            "best_fitness": 0.0,
            "best_epoch": -1,
            "ema": weights,
            "model": weights,
            "updates": 0,
            "optimizer": None,
            "scaler": None,
            "rng": None,
            "swa": None,
            "source": source,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    checkpoint.update(extra)
    return checkpoint


def _described(base: dict, kind: str) -> dict:
    """A new checkpoint of `kind` with `base`'s model description (DESCRIPTION_KEYS)."""
    return {
        **{key: base.get(key) for key in DESCRIPTION_KEYS},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
    }


def stripped_checkpoint(checkpoint: dict, metrics: dict[str, float] | None = None) -> dict:
    """A training checkpoint as a weights-kind one, as a finished run ships best.pt: its EMA, the
    model's description and how it was trained, the epoch and fitness of those weights and their
    `metrics`; the raw model, optimizer, scaler, RNG states, SWA and tracked averages are left out."""
    if checkpoint.get("kind") != TRAINING:
        raise ValueError(f"only a training checkpoint is stripped, not {describe_kind(checkpoint)}")
    stripped = _described(checkpoint, WEIGHTS)
    stripped.update(
        {
            "ema": checkpoint["ema"],
            "updates": checkpoint["updates"],
            "best_fitness": checkpoint["best_fitness"],
            "best_epoch": checkpoint["best_epoch"],
            "finished": checkpoint["finished"],
            "metrics": dict(metrics or {}),
            "date": checkpoint.get("date"),
            "versions": checkpoint.get("versions"),
        }
    )
    return stripped


def foreign_checkpoint(
    model_yaml: dict, names: list[str], weights: dict[str, torch.Tensor], source: str, image_size: int | None = None
) -> dict:
    """Another framework's weights in our terms (never written: --weights and inference read them)."""
    return {
        "kind": FOREIGN,
        "model_yaml": model_yaml,
        "names": list(names),
        "ema": weights,
        "model": weights,
        "hyp": {},
        "opt": {"imgsz": image_size} if image_size else {},
        "updates": 0,
        "source": source,
    }


# Reading


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically (a crash at any moment leaves either the old file or the new one), streamed
    to the file: memory grows by one tensor at most, not by the file's size."""
    atomic_write(path, writer_of(checkpoint))


def writer_of(checkpoint: dict) -> Callable[[BinaryIO], None]:
    """For atomic_write: torch.save of `checkpoint` into the open file. A write that fails (a full
    disk) raises its OSError, which torch's zip writer would report as a RuntimeError of its own."""

    def write(f: BinaryIO) -> None:
        recording = _WriteErrors(f)
        try:
            torch.save(checkpoint, recording)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise

    return write


class _WriteErrors:
    """A file's write() and flush(), keeping the first OSError they raise."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.f.flush()


def strip_for_inference(path: Path, metrics: dict[str, float] | None = None) -> tuple[int, int]:
    """Rewrite the training checkpoint at `path` as stripped_checkpoint() does, atomically; returns
    the file's size in bytes before and after. Only the EMA's tensors are read from the file."""
    path = Path(path)
    before = path.stat().st_size
    # The old file's tensors stream from its mapping into the new file; the rename then replaces
    # a file still mapped, which POSIX allows (the mapping keeps the old inode until it is dropped).
    save_checkpoint(path, stripped_checkpoint(load_checkpoint(path, mmap=True), metrics))
    return before, path.stat().st_size


def load_checkpoint(
    path: str | Path, trust_pickle: bool = False, offers_trust_pickle: bool = False, mmap: bool = False
) -> dict:
    """Read one of our checkpoints with weights_only=True; any other file is a UserError naming it.
    mmap: tensors are mapped from the file and read when used (torch.load's mmap).

    With trust_pickle (the user's --trust-pickle), a file that needs full unpickling is read as a
    YOLOv5 or Ultralytics checkpoint instead (a foreign-kind checkpoint). offers_trust_pickle: the command has
    that option, so a refusal may suggest it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): not a checkpoint, or a copy that did not finish")
    with open(path, "rb") as f:
        head = f.read(4)
    mmap = mmap and head == ZIP_MAGIC  # torch.load maps only its zip archive, not the legacy format
    # torch.save writes a zip archive; its legacy format, like any pickle, starts with the PROTO opcode
    if not head.startswith((ZIP_MAGIC, b"\x80")):
        raise UserError(
            f"{path} is not a checkpoint: not a file torch.save writes (neither its zip archive nor a pickle)"
        )
    try:
        with warnings.catch_warnings():  # a foreign pickle is reported below as one clear error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if trust_pickle:
            weights = read_pickled_checkpoint(path)
            return foreign_checkpoint(
                weights.model_yaml,
                weights.names,
                weights.state,
                f"{weights.framework} checkpoint {path}",
                weights.image_size,
            )
        hint = (
            "If it is a YOLOv5 or Ultralytics checkpoint you trust, add --trust-pickle to read its weights"
            if offers_trust_pickle
            else "A YOLOv5 or Ultralytics checkpoint you trust can be read by train.py --weights, val.py and "
            "detect.py with --trust-pickle"
        )
        raise UserError(
            f"{path} is not a checkpoint of this framework: loading it would need full unpickling, "
            f"which can run arbitrary code, so it is refused. {hint}"
        ) from None
    except Exception as error:  # torch raises many types for a damaged file; all mean "unreadable"
        raise UserError(f"checkpoint {path} is unreadable (truncated or damaged): {_first_line(error)}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this framework (no '{FORMAT}' format marker)")
    version = checkpoint.get("format_version")
    if version == 1:
        return _from_version_1(checkpoint)
    if version != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {version}; this version reads 1 and {FORMAT_VERSION}")
    return checkpoint


def _from_version_1(checkpoint: dict) -> dict:
    """Version 1 had no 'kind': averages were the files with a 'source' line and no optimizer."""
    averaged = checkpoint.get("source") is not None and checkpoint.get("optimizer") is None
    return {**checkpoint, "format_version": FORMAT_VERSION, "kind": AVERAGE if averaged else TRAINING}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Questions


def describe_kind(checkpoint: dict) -> str:
    """'a training checkpoint', 'an average of weights (...)', a stripped best.pt's or a snapshot's
    description, or 'a YOLOv5 or Ultralytics checkpoint'."""
    kind = checkpoint.get("kind")
    if kind == AVERAGE:
        return f"an average of weights ({checkpoint.get('source')})"
    if kind == WEIGHTS:
        return (
            "a finished run's best weights, stripped for inference (its EMA only: no raw model, optimizer or "
            "training state; the run's last.pt holds them, and train.py --keep-optimizer keeps best.pt whole)"
        )
    if kind == SNAPSHOT:
        return "a post-hoc EMA snapshot (average.py --posthoc RUN_DIR combines them into a checkpoint)"
    return "a YOLOv5 or Ultralytics checkpoint" if kind == FOREIGN else "a training checkpoint"


def training_option(checkpoint: dict, name: str, default: object = None) -> object:
    """One of the run's options (opt.yaml) as the checkpoint recorded it."""
    return (checkpoint.get("opt") or {}).get(name, default)


def image_size(checkpoint: dict) -> int:
    """The image size the weights were trained at (YOLOv5's 640 when a foreign file does not say)."""
    return int(training_option(checkpoint, "imgsz") or DEFAULT_IMAGE_SIZE)


def batch_per_process(checkpoint: dict) -> int:
    """The batch each training process ran (--batch-size is the global batch under torchrun, and
    each process's own with --graft): the batch BatchNorm saw, and the one validation batches are
    sized from."""
    batch = int(training_option(checkpoint, "batch_size") or DEFAULT_BATCH_SIZE)
    if training_option(checkpoint, "graft", False):
        return batch
    return per_process_batch(batch, int(checkpoint.get("world_size") or 1))


def trained_amp(checkpoint: dict) -> str | None:
    """The autocast the run trained with, as its --amp recorded it: 'bf16', 'fp16' or 'off' ('off'
    too for a --no-amp run from before --amp); None where it recorded neither (a run from before
    --amp that used its device's autocast, or a foreign one)."""
    amp = training_option(checkpoint, "amp")
    if amp in ("bf16", "fp16", "off"):
        return amp
    return "off" if training_option(checkpoint, "no_amp", False) else None


def model_from_checkpoint(checkpoint: dict, weights: str = "ema", source: str = "checkpoint") -> DetectionModel:
    """Rebuild the detector from a checkpoint's model YAML and load the `ema` or `model` weights."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if checkpoint.get("kind") == SNAPSHOT:
        raise UserError(f"{source} is {describe_kind(checkpoint)}, not a model checkpoint")
    state = checkpoint.get(weights)
    if state is None:
        raise UserError(f"{source} holds no '{weights}' weights: it is {describe_kind(checkpoint)}")
    model = DetectionModel(checkpoint["model_yaml"])
    if any(t.dtype == torch.float64 for t in state.values()):
        model.double()  # a train.py --float64 run's weights stay in double precision
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{source}: its '{weights}' weights do not fit its model YAML: {_first_line(error)}") from None
    model.names = list(checkpoint["names"])
    model.hyp = dict(checkpoint.get("hyp") or {})
    return model


def load_for_inference(
    path: str | Path, weights: str, device: torch.device, trust_pickle: bool = False
) -> tuple[dict, DetectionModel]:
    """A checkpoint and its `ema` (or `model`) weights as an eval-mode, channels_last model on
    `device` (for commands that offer --trust-pickle)."""
    checkpoint = load_checkpoint(path, trust_pickle, offers_trust_pickle=True, mmap=True)  # reads the used weights only
    model = model_from_checkpoint(checkpoint, weights, source=str(path)).eval()
    return checkpoint, model.to(device, memory_format=torch.channels_last)


def transfer_matching_weights(
    model: torch.nn.Module, checkpoint: dict, exclude: tuple[str, ...] = (), weights: str = "ema"
) -> tuple[int, int]:
    """Load the checkpoint's EMA weights (else its model weights; `weights`='model': the model
    weights) wherever name and shape match. Returns (tensors transferred, tensors in the model)."""
    matched = matching_weights(model, checkpoint, exclude, weights)
    model.load_state_dict(matched, strict=False)
    return len(matched), len(model.state_dict())


def matching_weights(
    model: torch.nn.Module, checkpoint: dict, exclude: tuple[str, ...] = (), weights: str = "ema"
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (as transfer_matching_weights picks them) whose name and shape the model has."""
    source = (checkpoint.get("model") if weights == "model" else checkpoint.get("ema") or checkpoint.get("model")) or {}
    own = model.state_dict()
    return {
        k: v for k, v in source.items() if k in own and own[k].shape == v.shape and not any(x in k for x in exclude)
    }
