"""A checkpoint against its exports: mAP on a dataset and inference time, .pt, .onnx and .torchscript.

    python benchmarks/bench_export.py --weights runs/train/exp/weights/best.pt --data data/shapes.yaml
        [--include onnx torchscript] [--shapes static dynamic] [--repeats 30]

Exports the checkpoint's EMA weights with export.py (the --include formats), static (export.py's
default: batch 1 at the training size) and --dynamic (the --shapes), into a temporary folder, and
evaluates each file as val.py does: rectangular batches where the file takes any shape (as the .pt
validates), square ones where its shape is fixed, with the .pt also evaluated square so that each
export has a reference evaluated alike. Inference: median milliseconds of one forward pass of one
image at the training size (after warm-up), what detect.py runs per frame; the machine should be
otherwise idle.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.loader import build_val_loader, validation_batch_size  # noqa: E402
from utils.device import autocast, parameter_dtype, select_device, to_model_input  # noqa: E402
from utils.eval.evaluate import evaluate  # noqa: E402
from utils.export.metadata import EXPORT_SUFFIXES  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.infer.backends import LoadedWeights, load_weights  # noqa: E402


def evaluate_file(loaded: LoadedWeights, data, device: torch.device, rect: bool) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) on the val split, batched as val.py batches it."""
    model = loaded.model
    batch_size = validation_batch_size(loaded.batch_per_process)
    loader = build_val_loader(
        data.val,
        data.nc,
        img_size=loaded.img_size,
        batch_size=batch_size,
        workers=2,
        hyp=loaded.hyp or load_hyp(None, model.anchor_free),
        stride=int(model.stride.max()),
        single_cls=loaded.single_cls,
        rect=rect,
    )
    precision = loaded.precision(device, None, batch_size=batch_size, img_size=loaded.img_size)
    metrics = evaluate(model, loader, device=device, amp_dtype=precision.dtype).metrics
    return metrics.map50, metrics.map50_95


@torch.no_grad()
def inference_ms(loaded: LoadedWeights, device: torch.device, repeats: int) -> float:
    """Median time of one forward pass of a (1, 3, S, S) image."""
    size = loaded.img_size
    images = to_model_input(
        torch.full((1, 3, size, size), 114, dtype=torch.uint8), device, parameter_dtype(loaded.model)
    )
    precision = loaded.precision(device, None, batch_size=1, img_size=size)
    times = []
    for i in range(repeats + 5):  # 5 warm-up passes: allocators, TorchScript's profiling runs
        start = time.perf_counter()
        with autocast(device, precision.dtype):
            loaded.model(images)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--data", default="data/shapes.yaml", help="dataset YAML")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes per file")
    parser.add_argument("--include", nargs="+", default=["onnx", "torchscript"], choices=list(EXPORT_SUFFIXES))
    parser.add_argument("--shapes", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic"])
    args = parser.parse_args()
    device = select_device(args.device)
    data = load_dataset_config(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind in args.shapes:
            folder = Path(tmp) / kind
            folder.mkdir()
            shutil.copy(args.weights, folder / "best.pt")
            dynamic = ["--dynamic"] if kind == "dynamic" else []
            export.main(["--weights", str(folder / "best.pt"), "--include", *args.include, *dynamic])
            files[kind] = folder
        pt = load_weights(files[args.shapes[0]] / "best.pt", device, fuse=True)
        reference = {rect: evaluate_file(pt, data, device, rect) for rect in (True, False)}
        pt_ms = inference_ms(pt, device, args.repeats)
        for rect in (True, False):
            rows.append((".pt (fused)", "any", "rectangular" if rect else "square", *reference[rect], 0.0, pt_ms))
        for kind in args.shapes:
            for suffix in (EXPORT_SUFFIXES[name] for name in args.include):
                loaded = load_weights(files[kind] / f"best{suffix}", device)
                rect = kind == "dynamic"
                map50, map50_95 = evaluate_file(loaded, data, device, rect)
                shape = f"1x3x{loaded.img_size}x{loaded.img_size}" if kind == "static" else "dynamic"
                rows.append(
                    (
                        suffix,
                        shape,
                        "rectangular" if rect else "square",
                        map50,
                        map50_95,
                        map50_95 - reference[rect][1],
                        inference_ms(loaded, device, args.repeats),
                    )
                )
    print(f"\n{args.weights} on {data.source} (val), {device}, torch {torch.__version__}\n")
    print("| weights | input | val batches | mAP@0.5 | mAP@0.5:0.95 | vs .pt, same batches | ms / image (batch 1) |")
    print("|---|---|---|--:|--:|--:|--:|")
    for name, shape, batches, map50, map50_95, delta, ms in rows:
        print(f"| {name} | {shape} | {batches} | {map50:.4f} | {map50_95:.4f} | {delta:+.4f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
