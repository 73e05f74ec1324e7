"""Evaluate a detector: `evaluate(model, loader)` for train.py, and the val.py command line.

    python val.py --weights runs/train/exp/weights/best.pt --data data/shapes.yaml

evaluates the checkpoint's EMA weights (the model weights with --raw) and prints YOLOv5's
table: Class, Images, Instances, P, R, mAP50, mAP50-95 (per class with --verbose).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.augment import round_image_size
from utils.boxes import letterbox_to_original, xyxy_to_xywhn
from utils.checkpoint import load_for_inference
from utils.coco_json import (category_ids, cached_ground_truth, image_ids, prediction_records, pycocotools_stats,
                             write_json)
from utils.confusion import ConfusionMatrix
from utils.data_config import DatasetConfig, load_dataset_config
from utils.dataset import Batch, DetectionDataset, build_dataloader
from utils.device import (autocast, describe_precision, inference_amp_dtype, parameter_dtype, select_device,
                          to_model_input)
from utils.errors import UserError, run_cli
from utils.log import LOGGER, interactive, setup_logging
from utils.loss import DetectionLoss
from utils.metrics import DetectionEvaluator, DetectionMetrics
from utils.labels import cache_path_for, scan_split
from utils.nms import non_max_suppression
from utils.plots import plot_confusion_matrix, plot_image_batch, plot_metric_vs_conf, plot_pr_curve
from utils.run_dir import add_run_dir_arguments, next_run_dir

TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


@dataclass
class EvalResult:
    metrics: DetectionMetrics
    confusion: ConfusionMatrix | None  # with plot_dir only: it is drawn, never logged
    images_per_class: np.ndarray      # (nc,) images holding at least one box of the class
    loss: np.ndarray | None           # mean [box, obj, cls] loss when a loss function was given
    speed_ms: tuple[float, float, float]  # per image: pre-process, inference, NMS
    input_shape: tuple[int, ...]      # shape of the last batch
    predictions: dict[int, np.ndarray]  # dataset index -> (n, 6) x1, y1, x2, y2, score, class in original
                                      # pixels, when asked for (keep_predictions)


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, *, device: torch.device,
             amp_dtype: torch.dtype | None, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
             loss_fn: DetectionLoss | None = None, keep_predictions: bool = False,
             plot_dir: Path | None = None) -> EvalResult:
    """mAP of `model` on `loader` (no augmentation), in original-image coordinates.

    Runs under autocast with the given dtype; the model's own weights are never cast. With
    plot_dir, the first three batches are drawn there with their labels and predictions.
    """
    dataset: DetectionDataset = loader.dataset
    was_training = model.training
    input_dtype = parameter_dtype(model)
    model.eval()
    nc = model.nc
    evaluator = DetectionEvaluator(nc)
    confusion = ConfusionMatrix(nc) if plot_dir is not None else None
    coco_ids = image_ids(dataset.image_files)  # the ids pycocotools would see, for its tie order
    images_per_class = np.zeros(nc, dtype=np.int64)
    loss_sum, num_batches = torch.zeros(3, device=device), 0
    times, num_images, num_truncated, predictions = np.zeros(3), 0, 0, {}
    input_shape: tuple[int, ...] = ()
    bar = tqdm(loader, desc=_row(*TABLE_HEADER), leave=False, disable=not interactive(), bar_format="{l_bar}{bar:10}{r_bar}")
    for batch_number, batch in enumerate(bar):
        t0 = time.perf_counter()
        images = to_model_input(batch.images, device, input_dtype)
        input_shape = tuple(images.shape)
        t1 = time.perf_counter()
        with autocast(device, amp_dtype):
            decoded, raw = model(images)
        if loss_fn is not None:
            loss_sum += loss_fn(raw, batch.targets)[1]
            num_batches += 1
        t2 = time.perf_counter()
        detections, truncated = non_max_suppression(decoded, conf_thres, iou_thres, max_det=max_det, multi_label=True)
        num_truncated += truncated
        t3 = time.perf_counter()
        times += (t1 - t0, t2 - t1, t3 - t2)
        num_images += len(images)
        if plot_dir is not None and batch_number < 3:
            plot_validation_batch(batch, detections, list(model.names), plot_dir / f"val_batch{batch_number}")
        for det, index, (scale_x, scale_y, pad_x, pad_y) in zip(detections, batch.indices.tolist(), batch.letterbox.tolist()):
            det = det.cpu()
            boxes = letterbox_to_original(det[:, :4].double(), tuple(dataset.shapes[index]), (scale_x, scale_y), (pad_x, pad_y))
            gt_boxes, gt_classes = dataset.original_boxes_xyxy(index)
            evaluator.add_image(boxes.numpy(), det[:, 4].numpy(), det[:, 5].numpy(), gt_boxes, gt_classes,
                                image_id=coco_ids[dataset.image_files[index]])
            if confusion is not None:
                confusion.add_image(boxes, det[:, 4], det[:, 5], torch.from_numpy(gt_boxes), torch.from_numpy(gt_classes))
            images_per_class[np.unique(gt_classes)] += 1
            if keep_predictions:
                predictions[index] = torch.cat((boxes, det[:, 4:].double()), dim=1).numpy()
    if num_truncated:
        LOGGER.warning(f"WARNING: {num_truncated} image(s) had more than the NMS candidate limit; "
                       "their lowest-scoring candidates were not considered")
    model.train(was_training)
    return EvalResult(metrics=evaluator.compute(), confusion=confusion, images_per_class=images_per_class,
                      loss=(loss_sum / max(num_batches, 1)).cpu().numpy() if loss_fn is not None else None,
                      speed_ms=tuple(times / max(num_images, 1) * 1e3), input_shape=input_shape, predictions=predictions)


def plot_validation_batch(batch: Batch, detections: list[torch.Tensor], names: list[str], stem: Path) -> None:
    """<stem>_labels.jpg and <stem>_pred.jpg: the batch as the model saw it, with ground truth / predictions."""
    plot_image_batch(batch.images, batch.targets.numpy(), names, stem.with_name(stem.name + "_labels.jpg"))
    height, width = batch.images.shape[2:]
    rows = []
    for i, det in enumerate(detections):  # (n, 7) image index, class, cx, cy, w, h normalised, score
        det = det.cpu().numpy()
        rows.append(np.concatenate((np.full((len(det), 1), i), det[:, 5:6], xyxy_to_xywhn(det[:, :4], width, height),
                                    det[:, 4:5]), axis=1))
    targets = np.concatenate(rows) if rows else np.zeros((0, 7))
    plot_image_batch(batch.images, targets, names, stem.with_name(stem.name + "_pred.jpg"))


def save_validation_plots(result: EvalResult, names: list[str], out_dir: Path) -> None:
    """PR curve, F1 / P / R against confidence, and the confusion matrix (counts and normalised);
    `result` comes from evaluate() with a plot_dir."""
    m = result.metrics
    plot_pr_curve(m.recall_grid, m.pr_curve_50, m.ap50_per_class, names, out_dir / "PR_curve.png")
    for values, label, name in ((m.f1_vs_conf, "F1", "F1_curve.png"), (m.precision_vs_conf, "Precision", "P_curve.png"),
                                (m.recall_vs_conf, "Recall", "R_curve.png")):
        plot_metric_vs_conf(m.conf_grid, values, names, label, out_dir / name)
    plot_confusion_matrix(result.confusion.matrix, names, out_dir / "confusion_matrix.png", normalize=False)
    plot_confusion_matrix(result.confusion.matrix, names, out_dir / "confusion_matrix_normalized.png", normalize=True)


def _row(*cells) -> str:
    return f"{cells[0]:>22}" + "".join(f"{c:>11}" for c in cells[1:])


def results_table(result: EvalResult, names: list[str], verbose: bool = False) -> str:
    """YOLOv5's table: an 'all' row, then (verbose) one row per class that has ground truth."""
    m = result.metrics
    lines = [_row(*TABLE_HEADER),
             _row("all", m.num_images, int(m.instances_per_class.sum()), f"{m.precision:.3g}", f"{m.recall:.3g}",
                  f"{m.map50:.3g}", f"{m.map50_95:.3g}")]
    if verbose and len(names) > 1:
        for c in np.flatnonzero(m.instances_per_class):
            lines.append(_row(names[c], int(result.images_per_class[c]), int(m.instances_per_class[c]),
                              f"{m.precision_per_class[c]:.3g}", f"{m.recall_per_class[c]:.3g}",
                              f"{m.ap50_per_class[c]:.3g}", f"{m.ap50_95_per_class[c]:.3g}"))
    return "\n".join(lines)


def build_val_loader(sources: tuple[Path, ...], num_classes: int, img_size: int, batch_size: int, workers: int,
                     hyp: dict, stride: int, single_cls: bool = False, prefix: str = "val: ",
                     pin_memory: bool = False, report_path: Path | None = None) -> torch.utils.data.DataLoader:
    """The rectangular, non-augmented loader of a verified split (images ordered by aspect ratio);
    problem files are listed in report_path."""
    scan = scan_split(sources, num_classes, prefix=prefix, report_path=report_path)
    dataset = DetectionDataset(scan, img_size, hyp, augment=False, rect=True, batch_size=batch_size, stride=stride,
                               single_cls=single_cls)
    return build_dataloader(dataset, batch_size, workers, shuffle=False, pin_memory=pin_memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint's EMA weights on a dataset split.")
    parser.add_argument("--weights", required=True, help="checkpoint (.pt) written by train.py")
    parser.add_argument("--data", default="data/shapes.yaml", help="dataset YAML")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                        help="inference size in pixels (default: the checkpoint's training size)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: twice the training batch, as train.py validates)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=("train", "val", "test"), help="which split to evaluate")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat the dataset as single-class")
    parser.add_argument("--verbose", action="store_true", help="print mAP per class (always when nc < 50)")
    parser.add_argument("--save-json", action="store_true",
                        help="write COCO-format predictions.json and cross-check the mAP with pycocotools")
    parser.add_argument("--no-plots", action="store_true", help="do not save plots")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a pickled YOLOv5 checkpoint as --weights (unpickling can run code: trusted files only)")
    parser.add_argument("--raw", action="store_true", help="evaluate the raw model weights instead of the EMA")
    parser.add_argument("--no-amp", action="store_true", help="no autocast: run in the weights' own precision, fp32 (float64 for a --float64 run); "
                             "default: the training precision")
    add_run_dir_arguments(parser, "runs/val")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """val.py's command line: evaluate a checkpoint on a split and print the table."""
    opt = parse_args(argv)
    setup_logging()
    device = select_device(opt.device)
    checkpoint, model = load_for_inference(opt.weights, "model" if opt.raw else "ema", device, opt.trust_pickle)
    train_opt = checkpoint.get("opt", {})
    data = load_dataset_config(opt.data)
    nc = 1 if opt.single_cls else data.nc
    if nc != model.nc:
        raise UserError(f"{opt.weights} was trained for {model.nc} classes but {data.source} has {nc}")
    img_size = int(train_opt.get("imgsz", 640)) if opt.imgsz is None else opt.imgsz
    stride = int(model.stride.max())
    batch_size = 2 * int(train_opt.get("batch_size", 16)) if opt.batch_size is None else opt.batch_size
    if batch_size < 1 or img_size < 32 or opt.workers < 0:
        raise UserError("--batch-size must be at least 1, --imgsz at least 32, --workers not negative")
    img_size = round_image_size(img_size, stride)
    amp_dtype = inference_amp_dtype(model, device, enabled=not opt.no_amp and not train_opt.get("no_amp", False))
    split = {"train": data.train, "val": data.val, "test": data.test}[opt.task]
    if not split:
        raise UserError(f"{data.source} defines no {opt.task} split")
    names = list(model.names)
    run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok) if not opt.no_plots or opt.save_json else None
    loader = build_val_loader(split, data.nc, img_size, batch_size, opt.workers, checkpoint["hyp"], stride,
                              single_cls=opt.single_cls, prefix=f"{opt.task}: ", pin_memory=device.type == "cuda",
                              report_path=run_dir / "data_report.txt" if run_dir else None)
    result = evaluate(model, loader, device=device, amp_dtype=amp_dtype, conf_thres=opt.conf_thres,
                      iou_thres=opt.iou_thres, max_det=opt.max_det, keep_predictions=opt.save_json,
                      plot_dir=None if opt.no_plots else run_dir)
    weights_used = checkpoint.get("source") or ("raw model" if opt.raw else f"EMA ({checkpoint['updates']} updates)")
    LOGGER.info(f"{opt.weights}: {weights_used}, {img_size} px, {describe_precision(amp_dtype, parameter_dtype(model))}")
    LOGGER.info(results_table(result, names, verbose=opt.verbose or nc < 50))
    pre, infer, nms = result.speed_ms
    LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {infer:.1f}ms inference, {nms:.1f}ms NMS per image "
                f"at shape {result.input_shape}")
    if not opt.no_plots:
        save_validation_plots(result, names, run_dir)
    if opt.save_json:
        cross_check_with_pycocotools(result, loader.dataset, data, names, run_dir)
    if run_dir is not None:
        LOGGER.info(f"Results saved to {run_dir}")
    return 0


def cross_check_with_pycocotools(result: EvalResult, dataset: DetectionDataset, data: DatasetConfig,
                                 names: list[str], run_dir: Path) -> None:
    """Write predictions.json, evaluate it with pycocotools against the ground truth and print both mAPs.

    The ground truth is COCO's official instances_val2017.json when a COCO dataset has it (then
    crowd boxes make the numbers differ, as in YOLOv5), else the YOLO labels converted to JSON.
    """
    is_coco = data.source.name == "coco.yaml" and len(names) == 80
    cat_ids = category_ids(len(names), is_coco)
    ids = image_ids(dataset.image_files)
    records = [record for index, det in sorted(result.predictions.items())
               for record in prediction_records(ids[dataset.image_files[index]], det[:, :4], det[:, 4], det[:, 5], cat_ids)]
    write_json(run_dir / "predictions.json", records)
    official = data.root / "annotations" / "instances_val2017.json"
    gt_path = official if is_coco and official.exists() else cached_ground_truth(
        dataset, ids, cat_ids, names, cache_path_for(dataset.image_files).with_suffix(".coco.json"), run_dir)
    checked = pycocotools_stats(gt_path, records, sorted(ids.values()))
    if checked is None:
        LOGGER.info("pycocotools: no predictions, nothing to evaluate")
        return
    stats, summary = checked
    m = result.metrics
    agree = abs(stats[1] - m.map50) <= 1e-6 and abs(stats[0] - m.map50_95) <= 1e-6
    LOGGER.info(f"pycocotools COCOeval against {gt_path}:\n{summary}")
    LOGGER.info(f"mAP@0.5 {m.map50:.6f} (table) vs {stats[1]:.6f} (pycocotools); "
                f"mAP@0.5:0.95 {m.map50_95:.6f} vs {stats[0]:.6f}: "
                + ("equal" if agree else "DIFFERENT (the ground truth differs from the YOLO labels, or a bug: please report)"))


if __name__ == "__main__":
    run_cli(main, "val.py")
