"""utils/eval/metrics.py against pycocotools' COCOeval, plus hand-derived values."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.eval.metrics import DetectionEvaluator

# An image: (pred_boxes_xyxy (N,4), pred_scores (N,), pred_classes (N,), gt_boxes_xyxy (M,4), gt_classes (M,))
Image = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def xyxy_to_coco_xywh(boxes: np.ndarray) -> np.ndarray:
    """Same arithmetic as the evaluator, so both sides see identical float64 xywh values."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def pycocotools_eval(images: list[Image], num_classes: int) -> COCOeval:
    """Run COCOeval (bbox) on the case: image ids 1.., category id = class + 1, gt iscrowd=0, area = w*h."""
    gt_dataset = {
        "images": [{"id": i + 1} for i in range(len(images))],
        "categories": [{"id": k + 1} for k in range(num_classes)],
        "annotations": [],
    }
    results = []
    for image_id, (pred_boxes, scores, pred_cls, gt_boxes, gt_cls) in enumerate(images, start=1):
        for box, cls in zip(xyxy_to_coco_xywh(gt_boxes).tolist(), np.asarray(gt_cls).tolist()):
            gt_dataset["annotations"].append(
                {
                    "id": len(gt_dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        for box, score, cls in zip(
            xyxy_to_coco_xywh(pred_boxes).tolist(),
            np.asarray(scores, np.float64).tolist(),
            np.asarray(pred_cls).tolist(),
        ):
            results.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": box, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list (it reads results[0])
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": gt_dataset["images"],
                "categories": gt_dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def evaluate(images: list[Image], num_classes: int, order: list[int] | None = None):
    """Our evaluator; with `order`, images are added in that order, each with its COCO id (position + 1)."""
    evaluator = DetectionEvaluator(num_classes)
    if order is None:
        for image in images:
            evaluator.add_image(*image)
    else:
        for position in order:
            evaluator.add_image(*images[position], image_id=position + 1)
    return evaluator.compute()


def assert_matches_pycocotools(images: list[Image], num_classes: int, order: list[int] | None = None) -> None:
    ours = evaluate(images, num_classes, order)
    ref = pycocotools_eval(images, num_classes)
    if ref.stats[0] == -1:  # no class has gt: pycocotools reports -1, we report 0.0
        assert ours.map50 == 0.0 and ours.map50_95 == 0.0
        assert np.isnan(ours.ap_per_class).all()
        return
    assert ours.map50_95 == pytest.approx(ref.stats[0], abs=1e-6)
    assert ours.map50 == pytest.approx(ref.stats[1], abs=1e-6)
    precision = ref.eval["precision"][:, :, :, 0, 2]  # (T, R, K) at area 'all', maxDets 100
    for k in range(num_classes):
        per_class = precision[:, :, k]
        if (per_class > -1).any():
            assert ours.ap50_95_per_class[k] == pytest.approx(per_class[per_class > -1].mean(), abs=1e-6)
            assert ours.ap_per_class[k] == pytest.approx(per_class.mean(axis=1), abs=1e-6)
            assert ours.ap50_per_class[k] == pytest.approx(per_class[0].mean(), abs=1e-6)
            np.testing.assert_array_equal(ours.pr_curve_50[k], per_class[0])
        else:
            assert np.isnan(ours.ap_per_class[k]).all() and np.isnan(ours.pr_curve_50[k]).all()


@st.composite
def detection_cases(draw) -> tuple[list[Image], int]:
    """Small integer-grid boxes (exact IoU ties, IoUs exactly on thresholds), scores from a small set
    (score ties), classes without gt or without predictions, empty images. A scale of 3e4 makes some gt
    areas exceed 1e10, and flipped boxes have negative areas: both are boxes COCOeval ignores."""
    num_classes = draw(st.integers(1, 5))
    gt_classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    pred_classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    scale = draw(st.sampled_from([1.0, 1.0, 1.0, 0.1, 3e4]))
    coordinate, size = st.integers(0, draw(st.sampled_from([3, 8]))), st.integers(0, 5)  # 3: crowded

    def box() -> list[float]:
        x, y, w, h = draw(coordinate), draw(coordinate), draw(size), draw(size)
        if draw(st.integers(0, 19)) == 0:  # flipped: negative area
            w = -w
        return [x, y, x + w, y + h]

    images = []
    for _ in range(draw(st.integers(1, 6))):
        gts = [(box(), draw(st.sampled_from(gt_classes))) for _ in range(draw(st.integers(0, 12)))]
        preds = []
        for _ in range(draw(st.integers(0, 15))):
            kind = draw(st.sampled_from(["near copy", "near copy", "hull", "random"] if gts else ["random"]))
            if kind == "near copy":  # matches, duplicates, IoUs on a threshold
                (x1, y1, x2, y2), cls = draw(st.sampled_from(gts))
                dx1, dy1, dx2, dy2 = (draw(st.integers(-1, 1)) for _ in range(4))
                coords = [x1 + dx1, y1 + dy1, x2 + dx2, y2 + dy2]
            elif kind == "hull":  # the hull of two gts often overlaps both equally: an IoU tie between gts
                (a, cls), (b, _) = draw(st.sampled_from(gts)), draw(st.sampled_from(gts))
                coords = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
            if kind != "random" and draw(st.integers(0, 4)) == 0:
                cls = draw(st.sampled_from(pred_classes))
            if kind == "random":
                coords, cls = box(), draw(st.sampled_from(pred_classes))
            preds.append((coords, draw(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9])), cls))
        images.append(
            (
                np.array([p[0] for p in preds], np.float64).reshape(-1, 4) * scale,
                np.array([p[1] for p in preds], np.float64),
                np.array([p[2] for p in preds], np.int64),
                np.array([g[0] for g in gts], np.float64).reshape(-1, 4) * scale,
                np.array([g[1] for g in gts], np.int64),
            )
        )
    return images, num_classes


@settings(max_examples=200, deadline=None)
@given(detection_cases(), st.randoms(use_true_random=False))
def test_matches_pycocotools(case, random):
    """Images are added in a shuffled order with their ids: score ties between images still resolve
    as COCOeval resolves them (by sorted image id), as validation adds images in batch order."""
    images, num_classes = case
    order = list(range(len(images)))
    random.shuffle(order)
    assert_matches_pycocotools(images, num_classes, order)


def test_more_than_max_dets_and_a_crowded_image_match_pycocotools():
    """Truncation to 100 detections per (image, class), and a 300-object image in its own bucket."""
    rng = np.random.default_rng(0)
    images = []
    for num_gt, num_pred in [(300, 250), (5, 150), (0, 120), (40, 0), (7, 7)]:
        xy = rng.integers(0, 60, (num_gt, 2))
        gt = np.concatenate([xy, xy + rng.integers(1, 12, (num_gt, 2))], 1).astype(np.float64)
        src = gt[rng.integers(0, max(num_gt, 1), num_pred)] if num_gt else np.zeros((num_pred, 4))
        pred = src + rng.integers(-2, 3, (num_pred, 4))
        images.append(
            (
                pred,
                rng.choice([0.2, 0.4, 0.6, 0.8], num_pred),
                rng.integers(0, 2, num_pred),
                gt,
                rng.integers(0, 2, num_gt),
            )
        )
    assert_matches_pycocotools(images, num_classes=3)


def test_ignored_gt_is_matched_only_when_no_regular_gt_qualifies():
    """Areas above 1e10 are outside range 'all': such gts are ignored, sorted last by COCOeval, and a
    detection takes one only when no regular gt reaches the threshold (then the detection is ignored)."""
    s = 3e4  # a 3x3 box has area 8.1e9 (counts), a 4x4 box 1.44e10 (ignored)
    gt = np.array([[0, 0, 4, 4], [0, 0, 3, 3], [10, 10, 14, 14]], np.float64) * s
    # The first detection has IoU 1 with the ignored 4x4 gt and 9/16 with the regular 3x3 one: at IoU
    # thresholds 0.5 and 0.55 it must take the regular gt (a TP), above them the ignored one.
    pred = np.array([[0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 23, 23]], np.float64) * s
    image = (pred, np.array([0.9, 0.7, 0.6]), np.zeros(3, np.int64), gt, np.zeros(3, np.int64))
    assert_matches_pycocotools([image], num_classes=1)
    metrics = evaluate([image], 1)
    assert metrics.instances_per_class[0] == 1
    np.testing.assert_allclose(metrics.ap_per_class[0], [1, 1] + [0] * 8, atol=1e-12)


def one_class_image(pred_boxes, scores, gt_boxes) -> Image:
    return (
        np.array(pred_boxes, np.float64).reshape(-1, 4),
        np.array(scores, np.float64),
        np.zeros(len(scores), np.int64),
        np.array(gt_boxes, np.float64).reshape(-1, 4),
        np.zeros(len(gt_boxes), np.int64),
    )


def test_perfect_predictions_score_one():
    gts = [[0, 0, 10, 10], [20, 20, 40, 30], [50, 0, 60, 5]]
    metrics = evaluate([one_class_image(gts, [0.9, 0.8, 0.7], gts)], 1)
    # Not bit-exactly 1: COCO's precision tp / (tp + fp + eps) is 1 / (1 + 2**-52) < 1 at the first
    # detection, though the envelope lifts it to 2 / (2 + eps) == 1.0 here.
    assert metrics.map50 == pytest.approx(1.0, abs=1e-12)
    assert metrics.map50_95 == pytest.approx(1.0, abs=1e-12)
    assert metrics.precision == 1.0 and metrics.recall == 1.0


def test_false_positive_above_true_positive_halves_ap():
    # One gt. Score order: FP (0.9), TP (0.8) -> cumulative tp [0, 1], fp [1, 1]; recall [0, 1],
    # precision [0, 1/2]; envelope [1/2, 1/2]. Every recall threshold 0..1 reads 1/2, at every IoU
    # threshold (the TP is exact), so AP = 0.5.
    image = one_class_image([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [[0, 0, 10, 10]])
    metrics = evaluate([image], 1)
    assert metrics.map50 == pytest.approx(0.5, abs=1e-12)
    assert metrics.map50_95 == pytest.approx(0.5, abs=1e-12)


def test_duplicate_detection_is_a_false_positive():
    # Gts A, B. Detections: A (0.9), A again (0.8: A is taken, so FP), B (0.7).
    # tp [1, 1, 2], fp [0, 1, 1] -> recall [.5, .5, 1], precision [1, 1/2, 2/3], envelope [1, 2/3, 2/3].
    # Recall thresholds 0.00..0.50 (51 of them) read 1, 0.51..1.00 (50) read 2/3:
    # AP = (51 + 50 * 2/3) / 101 = 253 / 303.
    a, b = [0, 0, 10, 10], [20, 0, 30, 10]
    metrics = evaluate([one_class_image([a, a, b], [0.9, 0.8, 0.7], [a, b])], 1)
    assert metrics.map50 == pytest.approx(253 / 303, abs=1e-12)
    assert metrics.map50_95 == pytest.approx(253 / 303, abs=1e-12)


def test_precision_recall_at_best_f1_confidence():
    # Class 0: three gts found by three detections at 0.9 and one FP at 0.1. Between the scores YOLOv5
    # interpolates linearly: recall is 1 and precision falls from 1 (conf 0.9) to 3/4 (conf 0.1);
    # above 0.9 recall is 0. The smoothing window spans 101 grid points (+-0.05), so the smoothed F1 peaks
    # where the window's top edge reaches 0.9: conf ~0.85. Class 1 has gt but no detections (p = r = 0);
    # class 2 has no gt (nan, left out of the means).
    gts = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    image = (
        np.array(gts + [[70, 70, 80, 80]], np.float64),
        np.array([0.9, 0.9, 0.9, 0.1]),
        np.zeros(4, np.int64),
        np.array(gts + [[0, 50, 10, 60]], np.float64),
        np.array([0, 0, 0, 1]),
    )
    metrics = evaluate([image], 3)
    assert 0.84 <= metrics.best_conf <= 0.86
    expected_p0 = 1 - 0.25 * (0.9 - metrics.best_conf) / 0.8
    np.testing.assert_allclose(metrics.precision_per_class[:2], [expected_p0, 0.0], atol=1e-9)
    np.testing.assert_allclose(metrics.recall_per_class[:2], [1.0, 0.0], atol=1e-12)
    assert np.isnan(metrics.precision_per_class[2]) and np.isnan(metrics.recall_per_class[2])
    assert metrics.precision == pytest.approx(expected_p0 / 2, abs=1e-9)
    assert metrics.recall == pytest.approx(0.5, abs=1e-12)
    assert metrics.f1 == pytest.approx(expected_p0 / (expected_p0 + 1), abs=1e-9)
    np.testing.assert_array_equal(metrics.instances_per_class, [3, 1, 0])


def test_accepts_torch_tensors_and_empty_images():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    evaluator = DetectionEvaluator(num_classes=2)
    evaluator.add_image(gt.clone().requires_grad_(), torch.tensor([0.5]), torch.tensor([1.0]), gt, torch.tensor([1]))
    evaluator.add_image(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), torch.zeros(0, 4), torch.zeros(0))
    metrics = evaluator.compute()
    assert metrics.num_images == 2
    assert metrics.map50 == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(metrics.ap50_per_class[0])


def test_no_ground_truth_gives_zero_map():
    metrics = evaluate([one_class_image([[0, 0, 5, 5]], [0.5], [])], 1)
    assert metrics.map50 == 0.0 and metrics.map50_95 == 0.0 and metrics.fitness == 0.0


def test_rejects_classes_out_of_range():
    with pytest.raises(ValueError, match="pred_classes"):
        DetectionEvaluator(2).add_image(np.zeros((1, 4)), np.ones(1), np.array([2]), np.zeros((0, 4)), np.zeros(0))
