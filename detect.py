"""Run a trained detector on images and save them annotated.

    python detect.py --weights runs/train/exp/weights/best.pt --source path/to/images
    python detect.py --weights best.pt --source 'data/*.jpg' --save-txt --save-conf

Uses the checkpoint's EMA weights (--raw for the model weights). Inference only: no loss,
EMA or optimizer code is imported here.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import letterbox_to_original
from utils.checkpoint.format import image_size, load_for_inference, trained_with_amp
from utils.data.augment import letterbox
from utils.data.decode import read_image_rgb
from utils.data.labels import IMAGE_SUFFIXES
from utils.device import autocast, inference_amp_dtype, parameter_dtype, select_device, to_model_input
from utils.errors import UserError, run_cli
from utils.eval.nms import default_iou_threshold, non_max_suppression
from utils.eval.plots import class_colour, draw_box
from utils.image_size import check_image_size
from utils.log import LOGGER, setup_logging
from utils.run_dir import add_run_dir_arguments, next_run_dir

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts", ".gif")


def list_sources(source: str) -> list[Path]:
    """An image file, a folder of images, or a glob pattern -> sorted image paths."""
    path = Path(source)
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in glob.glob(source, recursive=True)]
    elif path.is_dir():
        files = list(path.iterdir())
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"--source {source} is not an image, a folder or a glob pattern that exists")
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
        if videos:
            raise UserError(
                f"--source {source}: {videos[0].name} is a video; detect.py reads images only so far "
                "(videos, webcams and streams are planned). Extract frames first, e.g. with ffmpeg"
            )
        raise UserError(f"--source {source}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def output_names(images: list[Path]) -> list[Path]:
    """Where each image's results go, relative to the run folder: its path below the folder the
    images have in common, so two images with the same name in different folders (a recursive
    glob) both keep their results; the bare file name when they share one folder."""
    root = Path(os.path.commonpath([p.resolve().parent for p in images]))
    return [p.resolve().relative_to(root) for p in images]


def draw_detections(
    image_bgr: np.ndarray,
    detections: np.ndarray,
    names: list[str],
    line_width: int | None = None,
    hide_labels: bool = False,
    hide_conf: bool = False,
) -> np.ndarray:
    """Boxes with 'name 0.87' captions on a copy of the image; detections (n, 6) xyxy, conf, class."""
    canvas = image_bgr.copy()
    lw = line_width or max(round(sum(canvas.shape[:2]) / 2 * 0.003), 2)
    for x1, y1, x2, y2, conf, cls in detections.tolist():
        name = names[int(cls)]
        caption = "" if hide_labels else name if hide_conf else f"{name} {conf:.2f}"
        draw_box(canvas, (int(x1), int(y1), int(x2), int(y2)), class_colour(int(cls)), caption, lw, lw / 3)
    return canvas


def yolo_label_lines(detections: np.ndarray, width: int, height: int, save_conf: bool) -> list[str]:
    """Detections in original pixels -> 'cls cx cy w h [conf]' lines, normalised."""
    lines = []
    for x1, y1, x2, y2, conf, cls in detections.tolist():
        values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        text = f"{int(cls)} " + " ".join(f"{v:.6f}" for v in values)
        lines.append(text + (f" {conf:.6f}" if save_conf else ""))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Detect objects in images with a trained checkpoint.")
    p.add_argument("--weights", required=True, help="checkpoint (.pt) written by train.py")
    p.add_argument("--source", required=True, help="image file, folder, or glob pattern (quote it)")
    p.add_argument(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        default=None,
        help="inference size (default: the checkpoint's training size)",
    )
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    p.add_argument(
        "--iou-thres", type=float, default=None, help="NMS IoU threshold (default: 0.45 anchor-based, 0.7 anchor-free)"
    )
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these class ids")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled YOLOv5 or Ultralytics checkpoint as --weights (unpickling runs code: trusted files only)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw model weights instead of the EMA")
    p.add_argument(
        "--no-amp",
        action="store_true",
        help="no autocast: run in the weights' own precision (fp32, float64 for a --float64 run); "
        "default: the training precision",
    )
    p.add_argument("--save-txt", action="store_true", help="save results as YOLO label files")
    p.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images")
    p.add_argument("--line-thickness", type=int, default=None, help="box line width in pixels")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without captions")
    p.add_argument("--hide-conf", action="store_true", help="captions without confidences")
    add_run_dir_arguments(p, "runs/detect")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    """detect.py's command line: detect, draw and save for every source image."""
    opt = parse_args(argv)
    setup_logging()
    device = select_device(opt.device)
    checkpoint, model = load_for_inference(opt.weights, "model" if opt.raw else "ema", device, opt.trust_pickle)
    model.fuse().to(memory_format=torch.channels_last)  # fusing makes new weights
    names = list(model.names)
    stride = int(model.stride.max())
    img_size = check_image_size(
        image_size(checkpoint) if opt.imgsz is None else opt.imgsz, model, batch_size=1, device=device, training=False
    )
    amp_dtype = inference_amp_dtype(model, device, enabled=not opt.no_amp and trained_with_amp(checkpoint))
    images = list_sources(opt.source)
    run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
    if opt.save_txt:
        (run_dir / "labels").mkdir(exist_ok=True)

    iou_thres = opt.iou_thres if opt.iou_thres is not None else default_iou_threshold(model.anchor_free, inference=True)
    total_detections, started = 0, time.perf_counter()
    for path, out_name in zip(images, output_names(images)):
        rgb = read_image_rgb(path)
        if rgb is None:
            LOGGER.warning(f"WARNING: skipped {path}: not a readable image")
            continue
        h0, w0 = rgb.shape[:2]
        boxed, scale_xy, pad_xy = letterbox(rgb, (img_size, img_size), auto=True, stride=stride)
        tensor = to_model_input(
            torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))[None], device, parameter_dtype(model)
        )
        with autocast(device, amp_dtype):
            decoded, _ = model(tensor)
        (det,), _ = non_max_suppression(
            decoded,
            opt.conf_thres,
            iou_thres,
            max_det=opt.max_det,
            classes=opt.classes,
            agnostic=opt.agnostic_nms,
            objectness=not model.anchor_free,
        )
        det = det.cpu()
        det[:, :4] = letterbox_to_original(det[:, :4], (h0, w0), scale_xy, pad_xy)
        detections = det.numpy()
        total_detections += len(detections)
        counts = np.bincount(detections[:, 5].astype(int), minlength=len(names)) if len(detections) else []
        summary = ", ".join(f"{n} {names[c]}" for c, n in enumerate(counts) if n) or "no detections"
        LOGGER.info(f"{path}: {tuple(tensor.shape[2:])} {summary}")
        if not opt.nosave:
            annotated = draw_detections(
                cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                detections,
                names,
                opt.line_thickness,
                opt.hide_labels,
                opt.hide_conf,
            )
            (run_dir / out_name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(run_dir / out_name), annotated)
        if opt.save_txt and len(detections):  # as YOLOv5: no file for an image without detections
            label_file = run_dir / "labels" / out_name.with_suffix(".txt")
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(f"{line}\n" for line in yolo_label_lines(detections, w0, h0, opt.save_conf)))
    elapsed = time.perf_counter() - started
    LOGGER.info(
        f"{len(images)} images, {total_detections} detections, {elapsed / max(len(images), 1) * 1e3:.1f} ms per image"
    )
    LOGGER.info(f"Results saved to {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main, "detect.py")
