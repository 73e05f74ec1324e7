"""COCO-format JSON for ground truth and predictions, and the pycocotools cross-check of our mAP."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.atomic_write import atomic_write
from utils.data.config import DatasetConfig
from utils.data.dataset import DetectionDataset
from utils.eval.metrics import DetectionMetrics
from utils.log import LOGGER

# COCO's 80 detection classes as ids in its 91-id category list (YOLO labels use 0..79).
COCO80_TO_91 = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)
GT_FORMAT_VERSION = 1


def category_ids(num_classes: int, is_coco: bool) -> list[int]:
    """COCO ids for a COCO dataset; otherwise the class index itself."""
    return list(COCO80_TO_91) if is_coco else list(range(num_classes))


def image_ids(image_files: list[Path]) -> dict[Path, int]:
    """COCO image ids: the numeric file stems (000000000139.jpg -> 139) when all are numeric and
    distinct, as COCO's own files are; otherwise the position in the sorted file list."""
    stems = [p.stem for p in image_files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(p.stem) for p in image_files}
    return {p: i for i, p in enumerate(sorted(image_files))}


def prediction_records(
    image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, ids: list[int]
) -> list[dict]:
    """One image's detections (original pixels) as COCO result dicts, boxes as [x, y, w, h].

    Values are written unrounded, so pycocotools sees exactly what our evaluator saw."""
    return [
        {"image_id": image_id, "category_id": ids[int(c)], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
        for (x1, y1, x2, y2), s, c in zip(boxes_xyxy.tolist(), scores.tolist(), classes.tolist())
    ]


def ground_truth(dataset: DetectionDataset, ids: dict[Path, int], cat_ids: list[int], names: list[str]) -> dict:
    """The dataset's YOLO labels as a COCO ground-truth dict (original pixels, iscrowd 0, area w*h)."""
    images, annotations = [], []
    for index, (path, (height, width)) in enumerate(zip(dataset.image_files, dataset.shapes.tolist())):
        images.append({"id": ids[path], "file_name": path.name, "width": width, "height": height})
        boxes, classes = dataset.original_boxes_xyxy(index)
        for (x1, y1, x2, y2), cls in zip(boxes.tolist(), classes.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": ids[path],
                    "category_id": cat_ids[cls],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cat_ids[k], "name": name} for k, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def cached_ground_truth(
    dataset: DetectionDataset,
    ids: dict[Path, int],
    cat_ids: list[int],
    names: list[str],
    cache_path: Path,
    fallback_dir: Path,
) -> Path:
    """The COCO ground truth written once beside the label cache (keyed like it), or into fallback_dir
    (the run folder) when the cache folder cannot be written."""
    key = f"{GT_FORMAT_VERSION}-{dataset.scan_key}-{dataset.single_cls}-{cat_ids[:3]}"
    candidates = (cache_path, fallback_dir / cache_path.name)
    for path in candidates:
        try:
            if json.loads(path.read_text()).get("info", {}).get("key") == key:
                return path
        except (OSError, ValueError):
            pass
    content = json.dumps(
        {
            "info": {"key": key, "description": "written by val.py from the YOLO labels"},
            **ground_truth(dataset, ids, cat_ids, names),
        }
    ).encode()
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, content)
            return path
        except OSError:
            continue
    raise OSError(f"could not write the COCO ground truth to {cache_path} or {fallback_dir}")


def pycocotools_stats(gt_path: Path, records: list[dict], evaluated_ids: list[int]) -> tuple[np.ndarray, str] | None:
    """COCOeval('bbox') of `records` on the images `evaluated_ids` -> (its 12 stats, its summary text).
    None when there is no prediction (pycocotools cannot load an empty result list)."""
    if not records:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates loading and timing
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(records), "bbox")
        coco_eval.params.imgIds = evaluated_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        coco_eval.summarize()
    return coco_eval.stats, summary.getvalue().rstrip()


def write_json(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(records, f)
    LOGGER.info(f"Saved {len(records)} predictions to {path}")


def cross_check_with_pycocotools(
    predictions: dict[int, np.ndarray],
    metrics: DetectionMetrics,
    dataset: DetectionDataset,
    data: DatasetConfig,
    names: list[str],
    run_dir: Path,
) -> None:
    """Write predictions.json, evaluate it with pycocotools against the ground truth and print both mAPs.

    The ground truth is COCO's official instances_val2017.json when a COCO dataset has it (then
    crowd boxes make the numbers differ, as in YOLOv5), else the YOLO labels converted to JSON.
    """
    is_coco = data.source.name == "coco.yaml" and len(names) == 80
    cat_ids = category_ids(len(names), is_coco)
    ids = image_ids(dataset.image_files)
    records = [
        record
        for index, det in sorted(predictions.items())
        for record in prediction_records(ids[dataset.image_file(index)], det[:, :4], det[:, 4], det[:, 5], cat_ids)
    ]
    write_json(run_dir / "predictions.json", records)
    official = data.root / "annotations" / "instances_val2017.json"
    beside_scan = dataset.scan.cache_path or run_dir / "labels.cache"  # a scan not cached: the run folder
    gt_path = (
        official
        if is_coco and official.exists()
        else cached_ground_truth(dataset, ids, cat_ids, names, beside_scan.with_suffix(".coco.json"), run_dir)
    )
    checked = pycocotools_stats(gt_path, records, sorted(ids.values()))
    if checked is None:
        LOGGER.info("pycocotools: no predictions, nothing to evaluate")
        return
    stats, summary = checked
    m = metrics
    agree = abs(stats[1] - m.map50) <= 1e-6 and abs(stats[0] - m.map50_95) <= 1e-6
    LOGGER.info(f"pycocotools COCOeval against {gt_path}:\n{summary}")
    LOGGER.info(
        f"mAP@0.5 {m.map50:.6f} (table) vs {stats[1]:.6f} (pycocotools); "
        f"mAP@0.5:0.95 {m.map50_95:.6f} vs {stats[0]:.6f}: "
        + ("equal" if agree else "DIFFERENT (the ground truth differs from the YOLO labels, or a bug: please report)")
    )
