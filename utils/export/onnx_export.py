"""A detector as one ONNX file: torch.onnx's dynamo exporter (torch.export), checked by onnx.checker.

The dynamo exporter (torch.onnx.export's default; it needs the onnxscript package) traces the
model with symbolic shapes: with `dynamic`, the batch, height and width of "images" are
dimensions of the graph, and the heads compute their grids from them (models/head.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from utils.atomic_write import atomic_write
from utils.errors import UserError
from utils.export.graph import INPUT_NAME, OUTPUT_NAME, DecodedOutput
from utils.export.metadata import add_onnx_metadata

ONNX_MIN_OPSET, ONNX_MAX_OPSET = 7, 23  # what torch.onnx writes (torch.onnx._constants, torch 2.x)
DEFAULT_OPSET = 18  # the dynamo exporter's lowest native opset; onnxruntime has run it since 1.14


def export_onnx(
    graph: DecodedOutput, example: torch.Tensor, path: Path, metadata: dict, dynamic: bool, opset: int
) -> Path:
    """Write `graph` (an eval-mode, fused model) traced at `example` to `path` as one ONNX file (no
    external data) with `metadata`, after onnx.checker has passed it. dynamic: batch, height and
    width are free (output axes 0 and 1 follow); else the file takes example's shape only."""
    import onnx  # only where ONNX is exported

    dims = torch.export.Dim
    dynamic_shapes = {INPUT_NAME: {0: dims("batch"), 2: dims("height"), 3: dims("width")}} if dynamic else None
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph,
                (example,),
                None,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
    except ImportError as error:
        raise UserError(f"ONNX export needs the onnxscript package ({error}): pip install onnxscript") from None
    model_proto = program.model_proto
    written = next(entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != opset:  # the exporter converts from its own opset, and can fail to: nothing is written then
        raise UserError(
            f"--opset {opset}: the ONNX exporter could not convert this model to it (it wrote opset {written}); "
            f"use --opset {written}"
        )
    add_onnx_metadata(model_proto, metadata)
    onnx.checker.check_model(model_proto, full_check=True)
    atomic_write(path, model_proto.SerializeToString())
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Errors only from the exporter's packages while it runs: our INFO root logger would print every
    step of their graph optimisation, and torch.onnx warns that the heads' stride attribute (a
    constant of the model) is no initializer."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
