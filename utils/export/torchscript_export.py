"""A detector as one TorchScript file, traced with torch.jit.trace, its metadata as an extra file."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from utils.atomic_write import atomic_write
from utils.errors import UserError
from utils.export.graph import DecodedOutput, example_images
from utils.export.metadata import torchscript_extra_files


def export_torchscript(graph: DecodedOutput, example: torch.Tensor, path: Path, metadata: dict, dynamic: bool) -> Path:
    """Write `graph` (an eval-mode, fused model) traced at `example` to `path`, with `metadata`.

    A trace records shapes as operations on the input's sizes, and the heads compute their grids
    from them when traced (models/head.py), so the module runs at any batch and image size. With
    `dynamic` that is checked before the file is written: at a larger batch and another,
    non-square size its output must equal the model's. It runs on the device type it was traced
    on: the trace makes its grids there."""
    with warnings.catch_warnings():
        # The heads' strides become constants of the trace, as they should: they are the model's, not the input's.
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
        traced = torch.jit.trace(graph, example)
    if dynamic:
        b, _, h, w = example.shape
        stride = int(metadata["stride"])
        other = example_images(b + 1, (h + stride, w + 2 * stride), example.device, example.dtype == torch.float16)
        _check_same_output(traced, graph, other)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.save.* is deprecated")
        torch.jit.save(traced, buffer, _extra_files=torchscript_extra_files(metadata))
    atomic_write(path, buffer.getvalue())
    return path


@torch.no_grad()
def _check_same_output(traced: torch.jit.ScriptModule, graph: DecodedOutput, images: torch.Tensor) -> None:
    """The trace must give the model's output at `images`, a shape other than the one it was traced at."""
    expected = graph(images)
    try:
        output = traced(images)
    except RuntimeError as error:
        problem = (
            f"it fails there: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        )
    else:
        if output.shape == expected.shape and torch.allclose(output, expected, rtol=1e-3, atol=1e-3):
            return
        problem = "its output differs from the model's there"
    raise UserError(
        f"the TorchScript trace does not hold at input shape {tuple(images.shape)} ({problem}), so it cannot be "
        "exported with --dynamic: export it without"
    )
