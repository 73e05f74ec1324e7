"""Time utils.metrics.DetectionEvaluator against pycocotools' COCOeval (and faster-coco-eval if installed)
on seeded synthetic detections, and print a table of times, speed-ups and the mAPs each one reports.

    python benchmarks/bench_metrics.py [--images 5000] [--preds 100] [--classes 80] [--seed 0]

COCO objects (and the result lists they load) are built before the clocks start: the reference times
cover evaluate() + accumulate() only. Ours covers add_image for every image + compute(). Memory is
what each adds at its peak (resident set, utils/peak_memory.py), building the COCO objects included
for the references.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.eval.metrics import DetectionEvaluator  # noqa: E402
from utils.peak_memory import PeakMemory  # noqa: E402

IMAGE_SIZE = 640
GT_PER_IMAGE = 7  # Poisson mean


def synthetic_images(num_images: int, preds_per_image: int, num_classes: int, seed: int) -> list[tuple]:
    """(pred_boxes_xyxy, scores, pred_classes, gt_boxes_xyxy, gt_classes) per image. Ground truth: ~7
    boxes of log-uniform size with long-tailed class frequencies; predictions: 1-4 jittered copies of each
    gt (mostly the right class, high scores) topped up with random boxes of random class (low scores)."""
    rng = np.random.default_rng(seed)
    class_freq = rng.dirichlet(np.full(num_classes, 0.5))
    images = []
    for _ in range(num_images):
        num_gt = rng.poisson(GT_PER_IMAGE)
        gt_boxes = random_boxes(rng, num_gt)
        gt_cls = rng.choice(num_classes, num_gt, p=class_freq)
        copies = np.repeat(np.arange(num_gt), rng.integers(1, 5, num_gt))[:preds_per_image]
        size = np.tile(gt_boxes[copies, 2:] - gt_boxes[copies, :2], 2)
        jittered = np.clip(gt_boxes[copies] + rng.normal(0, 0.08, (len(copies), 4)) * size, 0, IMAGE_SIZE)
        jittered_cls = np.where(
            rng.random(len(copies)) < 0.9, gt_cls[copies], rng.integers(0, num_classes, len(copies))
        )
        num_random = preds_per_image - len(copies)
        pred_boxes = np.concatenate([jittered, random_boxes(rng, num_random)])
        pred_cls = np.concatenate([jittered_cls, rng.integers(0, num_classes, num_random)])
        scores = np.concatenate([rng.beta(5, 2, len(copies)), rng.beta(1, 6, num_random)])
        images.append((pred_boxes, scores, pred_cls, gt_boxes, gt_cls))
    return images


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) xyxy inside the image, side lengths log-uniform in [8, 320] pixels, rounded to 0.01 px."""
    wh = np.exp(rng.uniform(np.log(8), np.log(320), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (IMAGE_SIZE - wh)
    return np.round(np.concatenate([xy, xy + wh], axis=1), 2)


def coco_inputs(images: list[tuple], num_classes: int) -> tuple[dict, list[dict]]:
    """Ground-truth dataset dict and result list: image id = index + 1, category id = class + 1, xywh
    computed as the evaluator computes it (x1, y1, x2 - x1, y2 - y1) so both sides see the same floats."""
    dataset = {
        "images": [{"id": i + 1} for i in range(len(images))],
        "categories": [{"id": k + 1} for k in range(num_classes)],
        "annotations": [],
    }
    results = []
    for image_id, (pred_boxes, scores, pred_cls, gt_boxes, gt_cls) in enumerate(images, start=1):
        gt_xywh = np.concatenate([gt_boxes[:, :2], gt_boxes[:, 2:] - gt_boxes[:, :2]], 1)
        for box, cls in zip(gt_xywh.tolist(), gt_cls.tolist()):
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        pred_xywh = np.concatenate([pred_boxes[:, :2], pred_boxes[:, 2:] - pred_boxes[:, :2]], 1)
        for box, score, cls in zip(pred_xywh.tolist(), scores.tolist(), pred_cls.tolist()):
            results.append({"image_id": image_id, "category_id": cls + 1, "bbox": box, "score": score})
    return dataset, results


def run_ours(images: list[tuple], num_classes: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    evaluator = DetectionEvaluator(num_classes)
    for image in images:
        evaluator.add_image(*image)
    metrics = evaluator.compute()
    return time.perf_counter() - start, metrics.map50, metrics.map50_95


def with_peak_memory(run, *args) -> tuple:
    """run(*args)'s result and the memory it added at its peak (resident set, bytes)."""
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.in_use()
    result = run(*args)
    return (*result, memory.peak() - before)


def run_reference(coco_cls: type, eval_cls: type, dataset: dict, results: list[dict]) -> tuple[float, float, float]:
    """COCO objects built untimed; evaluate() + accumulate() timed; summarize() for the stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it gets
        coco_eval = eval_cls(coco_gt, coco_dt, "bbox")
        start = time.perf_counter()
        coco_eval.evaluate()
        coco_eval.accumulate()
        elapsed = time.perf_counter() - start
        coco_eval.summarize()
    return elapsed, float(coco_eval.stats[1]), float(coco_eval.stats[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--preds", type=int, default=100, help="predictions per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = synthetic_images(args.images, args.preds, args.classes, args.seed)
    dataset, results = coco_inputs(images, args.classes)
    print(
        f"{args.images} images, {len(results)} predictions, {len(dataset['annotations'])} gt boxes, "
        f"{args.classes} classes, seed {args.seed}"
    )

    rows = {"pycocotools COCOeval": with_peak_memory(run_reference, COCO, COCOeval, dataset, results)}
    try:
        import faster_coco_eval

        rows[f"faster-coco-eval {faster_coco_eval.__version__}"] = with_peak_memory(
            run_reference, faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, dataset, results
        )
    except ImportError:
        print("faster-coco-eval not installed: skipped")
    rows["ours (utils/eval/metrics.py)"] = with_peak_memory(run_ours, images, args.classes)

    reference_time, reference_map50, reference_map, _ = rows["pycocotools COCOeval"]
    print(
        f"\n| {'method':<26} | {'time (s)':>8} | {'speed-up':>8} | {'memory (MB)':>11} | {'mAP50':>10} "
        f"| {'mAP50-95':>10} |"
    )
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 9}:|{'-' * 12}:|{'-' * 11}:|{'-' * 11}:|")
    for name, (elapsed, map50, map50_95, memory) in rows.items():
        print(
            f"| {name:<26} | {elapsed:8.2f} | {reference_time / elapsed:7.1f}x | {memory / 1e6:11.0f} "
            f"| {map50:10.6f} | {map50_95:10.6f} |"
        )
    _, ours_map50, ours_map, _ = rows["ours (utils/eval/metrics.py)"]
    print(f"\nours - pycocotools: mAP50 {ours_map50 - reference_map50:+.3e}, mAP50-95 {ours_map - reference_map:+.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
