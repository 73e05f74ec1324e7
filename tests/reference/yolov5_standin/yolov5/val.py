"""yolov5.val.run: our evaluation of a checkpoint of ours on the dataset YAML's val split."""

from __future__ import annotations

import torch

from utils.checkpoint.format import load_for_inference
from utils.data.config import load_dataset_config
from utils.data.loader import build_val_loader
from utils.eval.evaluate import evaluate


def run(
    data: str,
    weights: str | None = None,
    batch_size: int = 32,
    imgsz: int = 640,
    workers: int = 8,
    device: str = "",
    half: bool = True,
    plots: bool = True,
    project: str = "runs/val",
) -> tuple[tuple[float, ...], list[float], tuple[float, ...]]:
    """((P, R, mAP@0.5, mAP@0.5:0.95, box, obj, cls losses), per-class mAPs, times) as YOLOv5's run returns them."""
    checkpoint, model = load_for_inference(weights, "ema", torch.device("cpu"))
    dataset = load_dataset_config(data)
    loader = build_val_loader(
        dataset.val,
        dataset.nc,
        img_size=imgsz,
        batch_size=batch_size,
        workers=workers,
        hyp=checkpoint["hyp"],
        stride=int(model.stride.max()),
    )
    m = evaluate(model, loader, device=torch.device("cpu"), amp_dtype=None).metrics
    return (m.precision, m.recall, m.map50, m.map50_95, 0.0, 0.0, 0.0), list(m.ap50_95_per_class), (0.0, 0.0, 0.0)
