"""What detect.py, val.py and the Python API run: one of our checkpoints (.pt), or a file export.py
wrote (.onnx through onnxruntime, .torchscript through torch.jit), behind one interface:
`model(images)` -> (decoded, raw) as DetectionModel's eval mode returns, with names, nc, stride
and anchor_free."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint.format import (
    DEFAULT_BATCH_SIZE,
    batch_per_process,
    image_size,
    load_for_inference,
    trained_amp,
    training_option,
)
from utils.data.augment import PAD_VALUE
from utils.errors import UserError
from utils.export.metadata import EXPORT_SUFFIXES, read_export_metadata
from utils.image_size import check_image_size, round_image_size
from utils.precision import Precision, inference_precision


class ExportedModel(nn.Module):
    """An ONNX or TorchScript export with DetectionModel's eval interface. A static export (fixed
    batch and size) takes any batch no larger than its size: it runs in chunks of its batch, each
    padded at the bottom and right (the boxes' pixel coordinates are unchanged), and the padding
    rows are dropped."""

    def __init__(self, path: Path, device: torch.device):
        super().__init__()
        meta = read_export_metadata(path)
        self.path, self.format, self.metadata = path, "ONNX" if path.suffix == ".onnx" else "TorchScript", meta
        self.names, self.nc, self.anchor_free = list(meta["names"]), int(meta["nc"]), bool(meta["anchor_free"])
        self.stride = torch.tensor([float(meta["stride"])])  # callers read int(model.stride.max())
        self.input_dtype = torch.float16 if meta["half"] else torch.float32
        self.fixed_shape = None if meta["dynamic"] else (int(meta["batch"]), *map(int, meta["imgsz"]))
        self.device = device
        if self.format == "ONNX":
            import onnxruntime  # only where an ONNX file is run

            wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
            self.input_name = self.session.get_inputs()[0].name
            self.runs_on = f"onnxruntime {self.session.get_providers()[0]}"  # the CPU build has no CUDA provider
        else:
            traced_on = torch.device(meta.get("device", "cpu"))
            if traced_on.type != device.type:  # a trace keeps the device its grids were made on
                raise UserError(
                    f"{path} was traced on {traced_on.type} and runs there only; use --device "
                    f"{'cpu' if traced_on.type == 'cpu' else 0}, or export on {device.type}"
                )
            with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export: said once, in docs
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
                self.module = torch.jit.load(str(path), map_location=device).eval()
            self.runs_on = f"torch.jit on {device}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(B, 3, H, W) in [0, 1] -> ((B, N, 5 + nc) or (B, N, 4 + nc) decoded, no raw outputs)."""
        if self.fixed_shape is None:
            return self._run(images), []
        batch, height, width = self.fixed_shape
        h, w = images.shape[2:]
        if h > height or w > width:
            raise UserError(
                f"{self.path} was exported for {height}x{width} inputs and cannot take {h}x{w}: "
                "export with --dynamic for other shapes"
            )
        outputs = []
        for chunk in images.split(batch):
            n = len(chunk)
            padded = F.pad(chunk, (0, width - w, 0, height - h), value=PAD_VALUE / 255)
            if n < batch:
                padded = torch.cat((padded, padded.new_zeros(batch - n, *padded.shape[1:])))
            outputs.append(self._run(padded)[:n])
        return torch.cat(outputs), []

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.input_dtype).contiguous()
        if self.format == "ONNX":
            (out,) = self.session.run(None, {self.input_name: images.cpu().numpy()})
            return torch.from_numpy(np.asarray(out)).to(images.device).float()
        return self.module(images.to(self.device)).float()


@dataclass
class LoadedWeights:
    """A model ready for inference and what the commands need to know about it."""

    model: nn.Module  # DetectionModel (eval, channels_last, on the device) or ExportedModel
    img_size: int  # the size it was trained at (a checkpoint) or exported at (the longer side)
    trained_amp: str | None  # a checkpoint's recorded --amp (format.trained_amp); exports run as exported
    description: str  # what runs, for the log: "EMA (265 updates)", "ONNX export (...) of ..."
    # How the run trained (an export records it), so that evaluation batches and labels as train.py validated:
    batch_per_process: int
    single_cls: bool
    hyp: dict | None
    data: str | None = None  # the dataset YAML the run trained on, as its opt.yaml gives it (a checkpoint's)

    def precision(self, device: torch.device, requested: str | None, *, batch_size: int, img_size: int) -> Precision:
        """The autocast to run with: --amp `requested` where given, else as the run trained
        (utils/precision.py's inference_precision). An export runs in the precision it was exported in."""
        if isinstance(self.model, ExportedModel):
            if requested not in (None, "off"):
                raise UserError(
                    f"--amp {requested}: an export runs in the precision it was exported in "
                    f"({'fp16' if self.model.metadata['half'] else 'fp32'}); export.py --half makes an fp16 one"
                )
            return Precision("off", device.type, "an export runs as exported")
        return inference_precision(
            self.trained_amp, self.model, device, batch=batch_size, img_size=img_size, requested=requested
        )


def is_export(path: str | Path) -> bool:
    """True for a file export.py writes (by its suffix)."""
    return Path(path).suffix in EXPORT_SUFFIXES.values()


def load_weights(
    path: str | Path,
    device: torch.device,
    *,
    raw: bool = False,
    fuse: bool = False,
    trust_pickle: bool = False,
) -> LoadedWeights:
    """A checkpoint's EMA weights (raw: its model weights), or an export, ready to run on `device`.
    fuse: fold BatchNorm into the convolutions (faster; val.py leaves it off so that it reproduces
    train.py's numbers exactly)."""
    path = Path(path)
    if is_export(path):
        if not path.is_file():
            raise UserError(f"--weights {path} does not exist")
        model = ExportedModel(path, device)
        exported = model.metadata["weights"]
        if raw and exported != "model":
            raise UserError(f"--raw: {path} holds the {exported.upper()} weights; export with --raw for the model's")
        shape = "dynamic" if model.fixed_shape is None else "x".join(map(str, model.fixed_shape))
        description = (
            f"{model.format} export ({shape}, {'fp16' if model.metadata['half'] else 'fp32'}, {model.runs_on}) of "
            f"the {exported.upper() if exported == 'ema' else 'model'} weights of {model.metadata['source']}"
        )
        meta = model.metadata
        return LoadedWeights(
            model,
            max(map(int, meta["imgsz"])),
            None,
            description,
            int(meta.get("train_batch_per_process") or DEFAULT_BATCH_SIZE),
            bool(meta.get("single_cls", False)),
            meta.get("hyp") or None,
        )
    checkpoint, model = load_for_inference(path, "model" if raw else "ema", device, trust_pickle)
    if fuse:
        model.fuse().to(memory_format=torch.channels_last)  # fusing makes new weights
    description = checkpoint.get("source") or ("raw model" if raw else f"EMA ({checkpoint.get('updates', 0)} updates)")
    return LoadedWeights(
        model,
        image_size(checkpoint),
        trained_amp(checkpoint),
        description,
        batch_per_process(checkpoint),
        bool(training_option(checkpoint, "single_cls", False)),
        checkpoint.get("hyp") or None,
        training_option(checkpoint, "data"),
    )


def inference_image_size(loaded: LoadedWeights, requested: int | None, batch_size: int, device: torch.device) -> int:
    """The size to run at: `requested` (default: the trained or exported size) rounded to the
    stride and checked against the device memory; a static export runs at its own size only."""
    size = loaded.img_size if requested is None else requested
    model = loaded.model
    if not isinstance(model, ExportedModel):
        return check_image_size(size, model, batch_size=batch_size, device=device)
    if model.fixed_shape is not None and size != loaded.img_size:
        height, width = model.fixed_shape[1:]
        raise UserError(
            f"--imgsz {size}: {model.path} was exported for {height}x{width} inputs only "
            "(export with --dynamic for other sizes)"
        )
    return round_image_size(size, int(model.stride.max()))
