"""What an export says about itself, and where each format keeps it.

A JSON-serialisable dict (`export_metadata`): the format marker and version, class names, max
stride, input size, batch, whether the shapes are dynamic, fp16, the head's family, which weights
(EMA or raw model) of which checkpoint, and how that run trained. ONNX keeps it as the model's
metadata_props, one entry per key with the value JSON-encoded; TorchScript as the extra file
config.json of its archive. `read_export_metadata` reads it back from either.
"""

from __future__ import annotations

import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from models.yolo import DetectionModel
from utils.checkpoint.format import (
    batch_per_process,
    describe_kind,
    image_size,
    trained_amp,
    training_option,
)
from utils.errors import UserError

EXPORT_FORMAT = "ema-yolo-export"
EXPORT_FORMAT_VERSION = 1
TORCHSCRIPT_METADATA_FILE = "config.json"  # the extra file of a TorchScript archive
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}  # export.py's --include names and their files


def export_metadata(
    checkpoint: dict,
    model: DetectionModel,
    img_size: tuple[int, int],
    batch_size: int,
    dynamic: bool,
    half: bool,
    weights: str,
    source: str | None = None,
) -> dict:
    """The description an export of `model` (the checkpoint's `weights`, 'ema' or 'model') carries.
    img_size (h, w) and batch_size: the input it was exported at (any, with `dynamic`). source: what
    the weights came from, e.g. the checkpoint's path (default: the checkpoint's own description)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "names": [str(name) for name in model.names],
        "nc": int(model.nc),
        "stride": int(model.stride.max()),
        "imgsz": [int(img_size[0]), int(img_size[1])],
        "batch": int(batch_size),
        "dynamic": bool(dynamic),
        "half": bool(half),
        "anchor_free": bool(model.anchor_free),
        "weights": weights,
        "device": next(model.parameters()).device.type,  # where it was exported: a TorchScript trace runs there
        "source": source or checkpoint.get("source") or describe_kind(checkpoint),
        "trained_amp": trained_amp(checkpoint),  # the run's autocast: 'bf16', 'fp16', 'off' (None: not recorded)
        # How the run trained, so that evaluating the export can batch and label as train.py validated.
        "train_imgsz": image_size(checkpoint),
        "train_batch_per_process": batch_per_process(checkpoint),
        "single_cls": bool(training_option(checkpoint, "single_cls", False)),
        "hyp": json.loads(json.dumps(checkpoint.get("hyp") or {}, default=str)),  # plain JSON values
        "input": "images: (B, 3, H, W) RGB in [0, 1], " + ("float16" if half else "float32"),
        "output": "output0: (B, N, 4 + nc) xywh pixels, class probabilities"
        if model.anchor_free
        else "output0: (B, N, 5 + nc) xywh pixels, objectness, class probabilities",
        "torch": str(torch.__version__),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def add_onnx_metadata(onnx_model, metadata: dict) -> None:
    """Store `metadata` in an onnx.ModelProto: one metadata_props entry per key, its value as JSON."""
    for key, value in metadata.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def torchscript_extra_files(metadata: dict) -> dict[str, str]:
    """torch.jit.save's _extra_files holding `metadata`."""
    return {TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)}


def read_export_metadata(path: str | Path) -> dict:
    """The metadata of an ONNX or TorchScript file export.py wrote (told apart by content: TorchScript
    is a zip archive). Any other file, or one without our metadata, is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        metadata = _torchscript_metadata(path)
    else:
        metadata = _onnx_metadata(path)
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise UserError(
            f"{path} is not an export of this framework: no '{EXPORT_FORMAT}' metadata (export.py writes it)"
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise UserError(f"{path} has export format version {version}; this version reads up to {EXPORT_FORMAT_VERSION}")
    return metadata


def _torchscript_metadata(path: Path) -> dict | None:
    """config.json of a TorchScript archive (read from the zip, without loading the model), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.jit.save puts extra files at <archive name>/extra/<name>
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}")]
            if not names:
                return None
            return json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable as a TorchScript archive: {error}") from None


def _onnx_metadata(path: Path) -> dict | None:
    """metadata_props of an ONNX file, each value JSON-decoded, or None when it has none."""
    import onnx  # only where an ONNX file is read

    try:
        onnx_model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises its own DecodeError and others for a file that is not ONNX
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is neither an ONNX file nor a TorchScript archive: {reason}") from None
    if not onnx_model.metadata_props:
        return None
    try:
        return {entry.key: json.loads(entry.value) for entry in onnx_model.metadata_props}
    except ValueError:
        return None  # another exporter's metadata: plain strings
