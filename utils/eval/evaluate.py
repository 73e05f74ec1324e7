"""evaluate(): mAP of a model on a loader, as train.py validates each epoch and val.py reports,
with YOLOv5's results table and the validation plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.boxes import letterbox_to_original, xyxy_to_xywhn
from utils.data.dataset import Batch, DetectionDataset
from utils.device import autocast, parameter_dtype, to_model_input
from utils.dist import World
from utils.eval.coco_json import image_ids
from utils.eval.confusion import ConfusionMatrix
from utils.eval.metrics import DetectionEvaluator, DetectionMetrics
from utils.eval.nms import default_iou_threshold, non_max_suppression
from utils.eval.plots import plot_confusion_matrix, plot_image_batch, plot_metric_vs_conf, plot_pr_curve
from utils.log import LOGGER, interactive

# (raw Detect outputs, targets) -> (total loss, detached loss items): the training loss
LossFn = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# One image's predictions: dataset index, boxes (n, 4) xyxy float64 in original pixels, scores (n,), classes (n,)
ImagePredictions = tuple[int, np.ndarray, np.ndarray, np.ndarray]
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


@dataclass
class EvalResult:
    metrics: DetectionMetrics
    confusion: ConfusionMatrix | None  # with plot_dir only: it is drawn, never logged
    images_per_class: np.ndarray  # (nc,) images holding at least one box of the class
    loss: np.ndarray | None  # mean loss items ([box, obj, cls] or [box, cls, dfl]) when a loss function was given
    speed_ms: tuple[float, float, float]  # per image: pre-process, inference, NMS
    input_shape: tuple[int, ...]  # shape of the last batch
    predictions: dict[int, np.ndarray]  # dataset index -> (n, 6) x1, y1, x2, y2, score, class in original
    # pixels, when asked for (keep_predictions)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    conf_thres: float = 0.001,
    iou_thres: float | None = None,
    max_det: int = 300,
    loss_fn: LossFn | None = None,
    keep_predictions: bool = False,
    plot_dir: Path | None = None,
    world: World = World(),
) -> EvalResult | None:
    """mAP of `model` on `loader` (no augmentation), in original-image coordinates.

    Runs under autocast with the given dtype; the model's own weights are never cast. The NMS
    IoU threshold defaults to the model family's reference (utils/eval/nms.py). With plot_dir,
    the first three batches are drawn there with their labels and predictions.

    Under torchrun (`world` distributed, collective): every rank runs its share of the batches,
    `loader` being utils/data/loader.py's val_shard_loader (batch rank, rank + size, ...), with the
    same weights; rank 0 gathers each batch's predictions and loss and scores them in batch order,
    as one process would: the same result. Rank 0 returns it, the others None.
    """
    if plot_dir is not None and world.distributed:
        raise ValueError("evaluate() draws its plots in one process: give plot_dir without a distributed world")
    dataset: DetectionDataset = loader.dataset
    was_training = model.training
    input_dtype = parameter_dtype(model)
    model.eval()
    nc, anchor_free = model.nc, model.anchor_free
    if iou_thres is None:
        iou_thres = default_iou_threshold(anchor_free)
    evaluator = DetectionEvaluator(nc)
    confusion = ConfusionMatrix(nc) if plot_dir is not None else None
    coco_ids = image_ids(dataset.image_files)  # the ids pycocotools would see, for its tie order
    images_per_class = np.zeros(nc, dtype=np.int64)
    # Per batch: (batch number, input shape, loss items or None, predictions of its images)
    batches: list[tuple[int, tuple[int, ...], torch.Tensor | None, list[ImagePredictions]]] = []
    times, num_images, num_truncated, predictions = np.zeros(3), 0, 0, {}
    bar = tqdm(
        loader,
        desc=_row(*TABLE_HEADER),
        leave=False,
        disable=not interactive() or not world.is_main,
        bar_format="{l_bar}{bar:10}{r_bar}",
    )
    for local_number, batch in enumerate(bar):
        batch_number = world.rank + local_number * world.size  # its number in one process's pass
        t0 = time.perf_counter()
        images = to_model_input(batch.images, device, input_dtype)
        t1 = time.perf_counter()
        with autocast(device, amp_dtype):
            decoded, raw = model(images)
        loss_items = loss_fn(raw, batch.targets)[1] if loss_fn is not None else None
        t2 = time.perf_counter()
        detections, truncated = non_max_suppression(
            decoded, conf_thres, iou_thres, max_det=max_det, multi_label=True, objectness=not anchor_free
        )
        num_truncated += truncated
        t3 = time.perf_counter()
        times += (t1 - t0, t2 - t1, t3 - t2)
        num_images += len(images)
        if plot_dir is not None and batch_number < 3:
            plot_validation_batch(batch, detections, list(model.names), plot_dir / f"val_batch{batch_number}")
        in_original = []
        for det, index, (scale_x, scale_y, pad_x, pad_y) in zip(
            detections, batch.indices.tolist(), batch.letterbox.tolist()
        ):
            det = det.cpu()
            boxes = letterbox_to_original(
                det[:, :4].double(), tuple(dataset.shapes[index]), (scale_x, scale_y), (pad_x, pad_y)
            )
            in_original.append((index, boxes.numpy(), det[:, 4].numpy(), det[:, 5].numpy()))
        batches.append(
            (batch_number, tuple(images.shape), None if loss_items is None else loss_items.cpu(), in_original)
        )
    model.train(was_training)
    if world.distributed:  # rank 0 scores every rank's batches, in one process's order
        gathered = world.gather_to_main((batches, times, num_images, num_truncated))
        if not world.is_main:
            return None
        batches = sorted((b for rank_batches, *_ in gathered for b in rank_batches), key=lambda b: b[0])
        times = sum(g[1] for g in gathered)
        num_images, num_truncated = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    loss_sum = torch.zeros(3)
    for _, _, loss_items, in_original in batches:
        if loss_items is not None:
            loss_sum += loss_items  # in batch order, as one process adds them
        for index, boxes, scores, classes in in_original:
            gt_boxes, gt_classes = dataset.original_boxes_xyxy(index)
            evaluator.add_image(
                boxes, scores, classes, gt_boxes, gt_classes, image_id=coco_ids[dataset.image_file(index)]
            )
            if confusion is not None:
                confusion.add_image(
                    torch.from_numpy(boxes),
                    torch.from_numpy(scores),
                    torch.from_numpy(classes),
                    torch.from_numpy(gt_boxes),
                    torch.from_numpy(gt_classes),
                )
            images_per_class[np.unique(gt_classes)] += 1
            if keep_predictions:
                predictions[index] = np.concatenate((boxes, scores[:, None], classes[:, None]), axis=1)
    if num_truncated:
        LOGGER.warning(
            f"WARNING: {num_truncated} image(s) had more than the NMS candidate limit; "
            "their lowest-scoring candidates were not considered"
        )
    return EvalResult(
        metrics=evaluator.compute(),
        confusion=confusion,
        images_per_class=images_per_class,
        loss=(loss_sum / max(len(batches), 1)).numpy() if loss_fn is not None else None,
        speed_ms=tuple(times / max(num_images, 1) * 1e3),
        input_shape=batches[-1][1] if batches else (),
        predictions=predictions,
    )


def plot_validation_batch(batch: Batch, detections: list[torch.Tensor], names: list[str], stem: Path) -> None:
    """<stem>_labels.jpg and <stem>_pred.jpg: the batch as the model saw it, with ground truth / predictions."""
    plot_image_batch(batch.images, batch.targets.numpy(), names, stem.with_name(stem.name + "_labels.jpg"))
    height, width = batch.images.shape[2:]
    rows = []
    for i, det in enumerate(detections):  # (n, 7) image index, class, cx, cy, w, h normalised, score
        det = det.cpu().numpy()
        rows.append(
            np.concatenate(
                (np.full((len(det), 1), i), det[:, 5:6], xyxy_to_xywhn(det[:, :4], width, height), det[:, 4:5]), axis=1
            )
        )
    targets = np.concatenate(rows) if rows else np.zeros((0, 7))
    plot_image_batch(batch.images, targets, names, stem.with_name(stem.name + "_pred.jpg"))


def save_validation_plots(result: EvalResult, names: list[str], out_dir: Path) -> None:
    """PR curve, F1 / P / R against confidence, and the confusion matrix (counts and normalised);
    `result` comes from evaluate() with a plot_dir."""
    m = result.metrics
    plot_pr_curve(m.recall_grid, m.pr_curve_50, m.ap50_per_class, names, out_dir / "PR_curve.png")
    for values, label, name in (
        (m.f1_vs_conf, "F1", "F1_curve.png"),
        (m.precision_vs_conf, "Precision", "P_curve.png"),
        (m.recall_vs_conf, "Recall", "R_curve.png"),
    ):
        plot_metric_vs_conf(m.conf_grid, values, names, label, out_dir / name)
    plot_confusion_matrix(result.confusion.matrix, names, out_dir / "confusion_matrix.png", normalize=False)
    plot_confusion_matrix(result.confusion.matrix, names, out_dir / "confusion_matrix_normalized.png", normalize=True)


def _row(*cells) -> str:
    return f"{cells[0]:>22}" + "".join(f"{c:>11}" for c in cells[1:])


def results_table(result: EvalResult, names: list[str], verbose: bool = False) -> str:
    """YOLOv5's table: an 'all' row, then (verbose) one row per class that has ground truth."""
    m = result.metrics
    lines = [
        _row(*TABLE_HEADER),
        _row(
            "all",
            m.num_images,
            int(m.instances_per_class.sum()),
            f"{m.precision:.3g}",
            f"{m.recall:.3g}",
            f"{m.map50:.3g}",
            f"{m.map50_95:.3g}",
        ),
    ]
    if verbose and len(names) > 1:
        for c in np.flatnonzero(m.instances_per_class):
            lines.append(
                _row(
                    names[c],
                    int(result.images_per_class[c]),
                    int(m.instances_per_class[c]),
                    f"{m.precision_per_class[c]:.3g}",
                    f"{m.recall_per_class[c]:.3g}",
                    f"{m.ap50_per_class[c]:.3g}",
                    f"{m.ap50_95_per_class[c]:.3g}",
                )
            )
    return "\n".join(lines)
