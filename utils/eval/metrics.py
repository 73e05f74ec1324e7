"""Detection AP / mAP exactly as pycocotools' COCOeval ('bbox') computes it, vectorised, plus YOLOv5's
precision / recall / F1 at the best-F1 confidence.

What "exactly" means: DetectionEvaluator equals COCOeval(iouType='bbox') run on the same data with image
ids in add_image order, category id = class + 1, every ground truth box iscrowd=0 with area = w * h, and
boxes and scores as float64, boxes converted xyxy -> xywh as (x1, y1, x2 - x1, y2 - y1). Only the
summary row for area range 'all' and maxDets=100 is reproduced (stats[0] and stats[1]); boxes whose
area lies outside that range (negative, or above 1e10) are ignored as COCOeval ignores them.
tests/test_metrics.py pins this to pycocotools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# Built exactly as pycocotools' Params.setDetParams builds them, so every float is identical.
IOU_THRESHOLDS = _read_only(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True))
RECALL_THRESHOLDS = _read_only(np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True))
# COCOeval skips a pair when iou < min(t, 1 - 1e-10): an IoU threshold of 1.0 still lets a perfect box match.
MATCH_THRESHOLDS = _read_only(np.minimum(IOU_THRESHOLDS, 1 - 1e-10))
AREA_RANGE_ALL = (0.0, 1e5**2)  # COCOeval's area range 'all'
CONF_GRID = _read_only(np.linspace(0, 1, 1000))  # x axis of the precision / recall / F1 vs confidence curves
F1_SMOOTHING = 0.1  # box filter width (fraction of CONF_GRID) before the F1 argmax
CHUNK_ELEMENTS = 1 << 20  # groups x dets x gts IoU entries matched at once


@dataclass
class DetectionMetrics:
    """Result of DetectionEvaluator.compute(). "No gt" classes are left out of every mean."""

    map50: float  # pycocotools stats[1]; 0.0 when no class has gt (pycocotools: -1)
    map50_95: float  # pycocotools stats[0]; 0.0 when no class has gt (pycocotools: -1)
    precision: float  # mean over classes with gt, at best_conf
    recall: float
    f1: float
    best_conf: float  # confidence that maximises the smoothed class-mean F1
    ap_per_class: np.ndarray  # (num_classes, 10) AP per IoU threshold, nan where the class has no gt
    ap50_per_class: np.ndarray  # (num_classes,), nan where no gt
    ap50_95_per_class: np.ndarray  # (num_classes,), nan where no gt
    precision_per_class: np.ndarray  # (num_classes,) at best_conf, nan where no gt
    recall_per_class: np.ndarray  # (num_classes,) at best_conf, nan where no gt
    instances_per_class: np.ndarray  # (num_classes,) int, gt boxes that count (area inside range 'all')
    num_images: int
    conf_grid: np.ndarray  # (1000,) confidence
    precision_vs_conf: np.ndarray  # (num_classes, 1000), nan rows where no gt
    recall_vs_conf: np.ndarray  # (num_classes, 1000)
    f1_vs_conf: np.ndarray  # (num_classes, 1000)
    recall_grid: np.ndarray  # (101,) COCO recall thresholds
    pr_curve_50: np.ndarray  # (num_classes, 101) interpolated precision at IoU 0.5, nan where no gt

    @property
    def fitness(self) -> float:
        """Model-selection score: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95."""
        return 0.1 * self.map50 + 0.9 * self.map50_95


class DetectionEvaluator:
    """Collects predictions and ground truth image by image; compute() scores them all at once."""

    def __init__(self, num_classes: int, max_dets: int = 100):
        if num_classes < 1 or max_dets < 1:
            raise ValueError(f"num_classes and max_dets must be >= 1, got {num_classes} and {max_dets}")
        self.num_classes = num_classes
        self.max_dets = max_dets
        self._pred_boxes: list[np.ndarray] = []
        self._pred_scores: list[np.ndarray] = []
        self._pred_classes: list[np.ndarray] = []
        self._gt_boxes: list[np.ndarray] = []
        self._gt_classes: list[np.ndarray] = []
        self._image_ids: list[int] = []

    @property
    def num_images(self) -> int:
        return len(self._gt_boxes)

    def add_image(
        self,
        pred_boxes_xyxy: np.ndarray,
        pred_scores: np.ndarray,
        pred_classes: np.ndarray,
        gt_boxes_xyxy: np.ndarray,
        gt_classes: np.ndarray,
        image_id: int | None = None,
    ) -> None:
        """One image: predictions (N,4) xyxy pixels, (N,), (N,) int; ground truth (M,4) xyxy, (M,) int.
        Accepts numpy arrays or CPU torch tensors; N or M may be 0. `image_id` (default: the order of
        the calls) is the COCO image id: COCOeval breaks score ties between images by sorted id."""
        pred_boxes = _as_array(pred_boxes_xyxy, np.float64).reshape(-1, 4)
        scores = _as_array(pred_scores, np.float64).reshape(-1)
        pred_cls = self._as_classes(pred_classes, "pred_classes")
        gt_boxes = _as_array(gt_boxes_xyxy, np.float64).reshape(-1, 4)
        gt_cls = self._as_classes(gt_classes, "gt_classes")
        if not len(pred_boxes) == len(scores) == len(pred_cls):
            raise ValueError(
                f"prediction lengths differ: boxes {len(pred_boxes)}, scores {len(scores)}, classes {len(pred_cls)}"
            )
        if len(gt_boxes) != len(gt_cls):
            raise ValueError(f"ground truth lengths differ: boxes {len(gt_boxes)}, classes {len(gt_cls)}")
        self._pred_boxes.append(pred_boxes)
        self._pred_scores.append(scores)
        self._pred_classes.append(pred_cls)
        self._gt_boxes.append(gt_boxes)
        self._gt_classes.append(gt_cls)
        self._image_ids.append(len(self._image_ids) if image_id is None else int(image_id))

    def _as_classes(self, classes: np.ndarray, name: str) -> np.ndarray:
        values = _as_array(classes, None).reshape(-1)
        as_int = values.astype(np.int64)
        if not np.array_equal(as_int, values):
            raise ValueError(f"{name} must hold whole numbers")
        if as_int.size and (as_int.min() < 0 or as_int.max() >= self.num_classes):
            raise ValueError(f"{name} must lie in [0, {self.num_classes}), got {as_int.min()}..{as_int.max()}")
        return as_int

    def compute(self) -> DetectionMetrics:
        """COCO AP for every class and IoU threshold, then YOLOv5's P/R/F1 from the IoU-0.5 matches."""
        num_classes, num_images = self.num_classes, self.num_images
        order = np.argsort(self._image_ids, kind="stable")  # COCOeval walks images in sorted id order
        for parts in (self._pred_boxes, self._pred_scores, self._pred_classes, self._gt_boxes, self._gt_classes):
            parts[:] = [parts[i] for i in order]
        self._image_ids = sorted(self._image_ids)
        pred_image = np.repeat(np.arange(num_images), [len(s) for s in self._pred_scores])
        gt_image = np.repeat(np.arange(num_images), [len(c) for c in self._gt_classes])
        pred_boxes = _xyxy_to_coco_xywh(_concat(self._pred_boxes, (0, 4), np.float64))
        scores = _concat(self._pred_scores, (0,), np.float64)
        pred_cls = _concat(self._pred_classes, (0,), np.int64)
        gt_boxes = _xyxy_to_coco_xywh(_concat(self._gt_boxes, (0, 4), np.float64))
        gt_cls = _concat(self._gt_classes, (0,), np.int64)

        # An (image, class) pair is one COCOeval evaluateImg call; its id orders pairs image-major.
        pred_group = pred_image * num_classes + pred_cls
        keep = top_detections(pred_group, scores, self.max_dets)
        det_group = pred_group[keep]
        gt_group = gt_image * num_classes + gt_cls
        gt_order = np.argsort(gt_group, kind="stable")
        gt_group, gt_boxes, gt_cls = gt_group[gt_order], gt_boxes[gt_order], gt_cls[gt_order]
        gt_ignored = _outside_area_all(gt_boxes)

        matched, on_ignored = greedy_match(det_group, pred_boxes[keep], gt_group, gt_boxes, gt_ignored)
        det_ignored = on_ignored | (~matched & _outside_area_all(pred_boxes[keep])[:, None])
        num_gt = np.bincount(gt_cls[~gt_ignored], minlength=num_classes)

        # COCOeval concatenates each class's detections image by image, then stable-sorts by score:
        # ties go to the earlier image, then to the earlier detection within the image.
        det_cls, det_scores = pred_cls[keep], scores[keep]
        order = np.lexsort((keep, -det_scores, det_cls))
        class_start = np.searchsorted(det_cls[order], np.arange(num_classes + 1))
        tp = (matched & ~on_ignored)[order]
        fp = (~matched & ~det_ignored)[order]
        det_scores, det_ignored = det_scores[order], det_ignored[order]

        precision = np.full((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), num_classes), -1.0)
        shape = (num_classes, len(CONF_GRID))
        p_vs_conf, r_vs_conf = np.full(shape, np.nan), np.full(shape, np.nan)
        for k in np.flatnonzero(num_gt):
            rows = slice(class_start[k], class_start[k + 1])
            precision[:, :, k] = coco_interpolated_precision(tp[rows].T, fp[rows].T, num_gt[k])
            counted = ~det_ignored[rows, 0]
            p_vs_conf[k], r_vs_conf[k] = precision_recall_vs_conf(
                det_scores[rows][counted], tp[rows, 0][counted], num_gt[k]
            )
        return _summarise(precision, p_vs_conf, r_vs_conf, num_gt, num_images)


def top_detections(group: np.ndarray, scores: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices of the max_dets best detections of every group, sorted by (group, score desc, index).
    group, scores (N,) -> (K,) indices into them; equal scores keep their input order (COCOeval's mergesort)."""
    if len(group) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(group)), -scores, group))
    sorted_group = group[order]
    run_start = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    rank = np.arange(len(group)) - np.repeat(run_start, np.diff(np.r_[run_start, len(group)]))
    return order[rank < max_dets]


def bb_iou_xywh(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU as pycocotools' C bbIou computes it. dets (..., D, 4), gts (..., M, 4) COCO xywh -> (..., D, M).
    The operation order is the C one (right edge as x + w), so results are bit-identical in float64;
    torchvision.ops.box_iou works from x2 and can differ in the last bit, which moves IoUs on a threshold."""
    dx, dy, dw, dh = (dets[..., :, None, i] for i in range(4))
    gx, gy, gw, gh = (gts[..., None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    union = dw * dh + gw * gh - inter
    overlap = (w > 0) & (h > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def greedy_match(
    det_group: np.ndarray, det_boxes: np.ndarray, gt_group: np.ndarray, gt_boxes: np.ndarray, gt_ignored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching of every (image, class) group at every IoU threshold.

    det_group (N,), det_boxes (N, 4) xywh sorted by (group, score desc); gt_group (M,), gt_boxes (M, 4) xywh,
    gt_ignored (M,) sorted by group. Returns matched (N, T) and matched-to-an-ignored-gt (N, T).
    Groups are padded into (groups, dets, gts) tensors, bucketed by power-of-two sizes so that one
    crowded image does not inflate the padding of all others.
    """
    num_thresholds = len(IOU_THRESHOLDS)
    matched = np.zeros((len(det_group), num_thresholds), bool)
    on_ignored = np.zeros_like(matched)
    if len(det_group) == 0 or len(gt_group) == 0:
        return matched, on_ignored
    det_start = np.flatnonzero(np.r_[True, det_group[1:] != det_group[:-1]])
    det_count = np.diff(np.r_[det_start, len(det_group)])
    groups = det_group[det_start]
    gt_start = np.searchsorted(gt_group, groups, side="left")
    gt_count = np.searchsorted(gt_group, groups, side="right") - gt_start
    both = gt_count > 0
    if not both.any():
        return matched, on_ignored
    det_start, det_count, gt_start, gt_count = det_start[both], det_count[both], gt_start[both], gt_count[both]

    bucket = _ceil_log2(det_count) * 64 + _ceil_log2(gt_count)
    by_bucket = np.argsort(bucket, kind="stable")
    edges = np.flatnonzero(np.diff(bucket[by_bucket])) + 1
    for members in np.split(by_bucket, edges):
        size = int(det_count[members].max()) * int(gt_count[members].max())
        step = max(1, CHUNK_ELEMENTS // size)
        for first in range(0, len(members), step):
            chunk = members[first : first + step]
            _match_chunk(
                det_start[chunk],
                det_count[chunk],
                gt_start[chunk],
                gt_count[chunk],
                det_boxes,
                gt_boxes,
                gt_ignored,
                matched,
                on_ignored,
            )
    return matched, on_ignored


def _match_chunk(
    det_start: np.ndarray,
    det_count: np.ndarray,
    gt_start: np.ndarray,
    gt_count: np.ndarray,
    det_boxes: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignored: np.ndarray,
    matched: np.ndarray,
    on_ignored: np.ndarray,
) -> None:
    """Match G groups at once, writing into matched / on_ignored (N, T) rows of their detections.

    One iteration per detection rank handles every group and threshold: each detection takes the free gt
    with the highest IoU >= threshold; among equal IoUs COCOeval keeps the LAST gt (its `<` comparison
    lets a later equal IoU replace the best so far). The gt axis is stored reversed so that argmax,
    which returns the first maximum, picks that last gt.
    """
    num_dets, num_gts = int(det_count.max()), int(gt_count.max())
    det_valid = np.arange(num_dets) < det_count[:, None]  # (G, D)
    det_index = np.where(det_valid, det_start[:, None] + np.arange(num_dets), 0)
    gt_valid = np.arange(num_gts) < gt_count[:, None]  # (G, M)
    gt_index = np.where(gt_valid, (gt_start + gt_count - 1)[:, None] - np.arange(num_gts), 0)

    iou = bb_iou_xywh(det_boxes[det_index], gt_boxes[gt_index])  # (G, D, M)
    iou[~(det_valid[:, :, None] & gt_valid[:, None, :])] = -1.0  # padding never matches
    above = iou[:, :, None, :] >= MATCH_THRESHOLDS[:, None]  # (G, D, T, M)
    ignored = gt_ignored[gt_index] & gt_valid  # (G, M)
    any_ignored = bool(ignored.any())
    taken = np.zeros((len(det_start), len(MATCH_THRESHOLDS), num_gts), bool)  # (G, T, M)
    match_pos = np.full((len(det_start), num_dets, len(MATCH_THRESHOLDS)), -1)  # (G, D, T)
    for d in range(num_dets):
        candidate = above[:, d] & ~taken
        if any_ignored:  # COCOeval sorts ignored gts last and stops at them once a regular gt matched
            regular = candidate & ~ignored[:, None, :]
            candidate = np.where(regular.any(-1, keepdims=True), regular, candidate)
        best = np.where(candidate, iou[:, d, None, :], -1.0).argmax(-1)  # (G, T)
        hit = np.take_along_axis(candidate, best[..., None], -1)[..., 0]
        hit_group, hit_threshold = np.nonzero(hit)
        taken[hit_group, hit_threshold, best[hit_group, hit_threshold]] = True
        match_pos[:, d] = np.where(hit, best, -1)

    rows = det_index[det_valid]
    pos = match_pos[det_valid]  # (n, T)
    matched[rows] = pos >= 0
    group_of_row = np.nonzero(det_valid)[0]
    on_ignored[rows] = (pos >= 0) & ignored[group_of_row[:, None], np.maximum(pos, 0)]


def coco_interpolated_precision(tp: np.ndarray, fp: np.ndarray, num_gt: int) -> np.ndarray:
    """COCOeval.accumulate for one class: tp, fp (T, n) flags in score order -> precision (T, 101)
    at the recall thresholds, taken from the precision envelope, 0 past the highest recall reached."""
    tp_sum = np.cumsum(tp, axis=1, dtype=np.float64)
    fp_sum = np.cumsum(fp, axis=1, dtype=np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))  # same operation order as COCOeval
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((len(tp), len(RECALL_THRESHOLDS)))
    num_dets = tp.shape[1]
    for t in range(len(tp)):
        index = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
        reached = index < num_dets
        out[t, reached] = envelope[t, index[reached]]
    return out


def precision_recall_vs_conf(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv5's curves for one class: scores (n,) descending, tp (n,) flags -> precision, recall on CONF_GRID.
    Above the top score recall is 0 and precision 1; with no detections both are 0 (YOLOv5 leaves them so)."""
    if len(scores) == 0:
        return np.zeros(len(CONF_GRID)), np.zeros(len(CONF_GRID))
    tp_sum = np.cumsum(tp, dtype=np.float64)
    fp_sum = np.cumsum(~tp, dtype=np.float64)
    recall = np.interp(-CONF_GRID, -scores, tp_sum / num_gt, left=0)
    precision = np.interp(-CONF_GRID, -scores, tp_sum / (tp_sum + fp_sum), left=1)
    return precision, recall


def smooth(y: np.ndarray, fraction: float) -> np.ndarray:
    """Box filter over `fraction` of y's length (odd width), edges padded with the end values."""
    width = round(len(y) * fraction * 2) // 2 + 1
    padded = np.concatenate([np.full(width // 2, y[0]), y, np.full(width // 2, y[-1])])
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def _summarise(
    precision: np.ndarray, p_vs_conf: np.ndarray, r_vs_conf: np.ndarray, num_gt: np.ndarray, num_images: int
) -> DetectionMetrics:
    """precision (T, 101, K) with -1 for classes without gt, curves (K, 1000) -> DetectionMetrics."""
    has_gt = num_gt > 0
    ap = precision.mean(axis=1).T  # (K, T)
    ap[~has_gt] = np.nan
    pr_curve_50 = precision[0].T.copy()  # (K, 101)
    pr_curve_50[~has_gt] = np.nan
    f1_vs_conf = 2 * p_vs_conf * r_vs_conf / (p_vs_conf + r_vs_conf + 1e-16)
    if has_gt.any():
        # Flattened in COCOeval.summarize's (t, r, k) order so that np.mean sums in the same order.
        map50_95 = float(np.mean(precision[:, :, has_gt].ravel()))
        map50 = float(np.mean(precision[0][:, has_gt].ravel()))
        best = int(smooth(f1_vs_conf[has_gt].mean(0), F1_SMOOTHING).argmax())
        mean_p, mean_r, mean_f1 = (float(x[has_gt, best].mean()) for x in (p_vs_conf, r_vs_conf, f1_vs_conf))
    else:  # pycocotools reports -1 here
        map50 = map50_95 = mean_p = mean_r = mean_f1 = 0.0
        best = 0
    p, r = p_vs_conf[:, best], r_vs_conf[:, best]
    return DetectionMetrics(
        map50=map50,
        map50_95=map50_95,
        precision=mean_p,
        recall=mean_r,
        f1=mean_f1,
        best_conf=float(CONF_GRID[best]),
        ap_per_class=ap,
        ap50_per_class=ap[:, 0].copy(),
        ap50_95_per_class=np.where(has_gt, precision.mean(axis=(0, 1)), np.nan),
        precision_per_class=p.copy(),
        recall_per_class=r.copy(),
        instances_per_class=num_gt.astype(np.int64),
        num_images=num_images,
        conf_grid=CONF_GRID.copy(),
        precision_vs_conf=p_vs_conf,
        recall_vs_conf=r_vs_conf,
        f1_vs_conf=f1_vs_conf,
        recall_grid=RECALL_THRESHOLDS.copy(),
        pr_curve_50=pr_curve_50,
    )


def _as_array(x: np.ndarray | torch.Tensor, dtype: type | None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _xyxy_to_coco_xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) COCO xywh (top-left corner, not utils.boxes' centre form): x1, y1, x2 - x1, y2 - y1."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _outside_area_all(boxes_xywh: np.ndarray) -> np.ndarray:
    """(N, 4) xywh -> (N,) True where area w * h lies outside COCOeval's range 'all' (COCOeval ignores those)."""
    area = boxes_xywh[:, 2] * boxes_xywh[:, 3]
    return (area < AREA_RANGE_ALL[0]) | (area > AREA_RANGE_ALL[1])


def _ceil_log2(n: np.ndarray) -> np.ndarray:
    return np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64)
