"""Export a trained detector to ONNX and TorchScript, for val.py, detect.py and other runtimes.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript
    python export.py --weights best.pt --include onnx --dynamic          # any batch and image size
    python export.py --weights best.pt --include onnx --half --device 0  # fp16, CUDA only

Exports the checkpoint's EMA weights (--raw: the model weights), BatchNorm fused, in eval mode,
next to the checkpoint (or into --out-dir): best.pt -> best.onnx, best.torchscript (best-raw.* with --raw). Each file
takes one input "images" (B, 3, H, W), RGB in [0, 1], and gives one output "output0", the head's
decoded (B, N, 5 + nc) or (B, N, 4 + nc) tensor as PyTorch's eval mode returns it, and carries
its class names, stride, input size and origin as metadata (utils/export/metadata.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from utils.checkpoint.format import describe_kind, image_size, load_for_inference
from utils.device import select_device
from utils.errors import UserError, run_cli
from utils.export.graph import DecodedOutput, example_images
from utils.export.metadata import EXPORT_SUFFIXES, export_metadata
from utils.export.onnx_export import DEFAULT_OPSET, ONNX_MAX_OPSET, ONNX_MIN_OPSET, export_onnx
from utils.export.torchscript_export import export_torchscript
from utils.image_size import check_batch_fits, exact_image_size, round_image_size
from utils.log import LOGGER, setup_logging
from utils.option_checks import check_range, warn_no_effect
from utils.output_paths import check_writable_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a checkpoint's EMA weights to ONNX and TorchScript.")
    p.add_argument("--weights", required=True, help="checkpoint (.pt) written by train.py")
    p.add_argument(
        "--include",
        nargs="+",
        default=["torchscript"],
        help=f"formats to write: {', '.join(EXPORT_SUFFIXES)} (default: torchscript)",
    )
    p.add_argument(
        "--imgsz",
        "--img",
        "--img-size",
        nargs="+",
        type=int,
        default=None,
        help="input size: one size or height width, multiples of the stride (default: the checkpoint's training size)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="input batch (the example traced, with --dynamic)")
    p.add_argument("--dynamic", action="store_true", help="any batch and image size (ONNX axes; TorchScript checked)")
    p.add_argument("--half", action="store_true", help="fp16 weights and input (CUDA only)")
    p.add_argument("--raw", action="store_true", help="export the raw model weights instead of the EMA")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: a TorchScript trace runs on the device type it was made on) or a cuda device, i.e. 0 "
        "(needed for --half)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="folder to write the exports into (made if missing; default: the folder of --weights)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset version (default {DEFAULT_OPSET})")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled YOLOv5 or Ultralytics checkpoint as --weights (unpickling runs code: trusted files only)",
    )
    return p.parse_args(argv)


def requested_formats(include: list[str]) -> list[str]:
    """--include as known format names, in order, each once; an unknown one is a UserError listing them."""
    formats = list(dict.fromkeys(name.lower() for name in include))
    unknown = [name for name in formats if name not in EXPORT_SUFFIXES]
    if unknown:
        raise UserError(f"--include {' '.join(unknown)}: unknown format; export.py writes {', '.join(EXPORT_SUFFIXES)}")
    return formats


def export_path(weights: Path, fmt: str, raw: bool, out_dir: str | None = None) -> Path:
    """Where a format's file goes: into --out-dir, else next to the checkpoint; best.pt -> best.onnx
    (best-raw.onnx for --raw)."""
    return Path(out_dir or weights.parent) / (weights.stem + ("-raw" if raw else "") + EXPORT_SUFFIXES[fmt])


def check_export_paths(opt: argparse.Namespace, formats: list[str]) -> None:
    """Before any work: the folder the exports go to can be written, and no export is --weights itself."""
    folder = Path(opt.out_dir or Path(opt.weights).parent)
    what = f"--out-dir {folder}" if opt.out_dir else f"{folder} (the folder of --weights; --out-dir writes elsewhere)"
    check_writable_folder(folder, what)
    for fmt in formats:
        if export_path(Path(opt.weights), fmt, opt.raw, opt.out_dir).resolve() == Path(opt.weights).resolve():
            raise UserError(f"the {fmt} export would be written over --weights {opt.weights}: give --out-dir")


def main(argv: list[str] | None = None) -> int:
    """export.py's command line: write each --include format of the checkpoint's weights."""
    opt = parse_args(argv)
    setup_logging()
    formats = requested_formats(opt.include)
    check_export_paths(opt, formats)
    if opt.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if "onnx" in formats:
        check_range("--opset", opt.opset, ONNX_MIN_OPSET, ONNX_MAX_OPSET, meaning="the ONNX opsets torch can write")
    else:
        warn_no_effect({f"--opset {opt.opset}": opt.opset != DEFAULT_OPSET}, "only --include onnx has an opset")
    device = select_device(opt.device)
    if opt.half and device.type != "cuda":
        raise UserError(
            f"--half exports fp16, which needs a CUDA device, but it runs on {device}: use --device 0, or drop --half"
        )
    weights = "model" if opt.raw else "ema"
    checkpoint, model = load_for_inference(opt.weights, weights, device, opt.trust_pickle)
    model.fuse()  # eval mode from load_for_inference; the plain memory format and one precision for the file
    model.to(dtype=torch.float16 if opt.half else torch.float32, memory_format=torch.contiguous_format)
    stride = int(model.stride.max())
    if opt.imgsz is None:
        size = round_image_size(image_size(checkpoint), stride)
        img_size = (size, size)
    else:
        img_size = exact_image_size(opt.imgsz, stride)
    # as train.py and detect.py refuse it: a size whose batch cannot fit fails here, not in the allocator
    check_batch_fits(
        model, img_size, opt.batch_size, device, option=f"--imgsz {' '.join(map(str, opt.imgsz or img_size))}"
    )
    source = f"{opt.weights} ({describe_kind(checkpoint)})"
    metadata = export_metadata(checkpoint, model, img_size, opt.batch_size, opt.dynamic, opt.half, weights, source)
    graph, example = DecodedOutput(model), example_images(opt.batch_size, img_size, device, opt.half)
    shape = "dynamic batch and size, traced at " if opt.dynamic else ""
    LOGGER.info(
        f"Exporting the {'raw model' if opt.raw else 'EMA'} weights of {source}: {len(model.names)} classes, "
        f"input {shape}{tuple(example.shape)} {'fp16' if opt.half else 'fp32'}"
    )

    if opt.out_dir:
        Path(opt.out_dir).mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path, started = export_path(Path(opt.weights), fmt, opt.raw, opt.out_dir), time.perf_counter()
        if fmt == "onnx":
            export_onnx(graph, example, path, metadata, opt.dynamic, opt.opset)
        else:
            export_torchscript(graph, example, path, metadata, opt.dynamic)
        LOGGER.info(f"{fmt}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
    example_file = export_path(Path(opt.weights), formats[0], opt.raw, opt.out_dir)
    LOGGER.info(
        f"Use it: python val.py --weights {example_file} --data DATA.yaml, "
        f"or python detect.py --weights {example_file} --source IMAGES"
    )
    return 0


if __name__ == "__main__":
    run_cli(main, "export.py")
