"""COCO-format JSON for predictions, with COCO's 91-id category mapping for COCO datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# COCO's 80 detection classes as ids in its 91-id category list (YOLO labels use 0..79).
COCO80_TO_91 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                88, 89, 90)


def category_ids(num_classes: int, is_coco: bool) -> list[int]:
    """COCO ids for a COCO dataset; otherwise the class index itself."""
    return list(COCO80_TO_91) if is_coco else list(range(num_classes))


def image_id_for(path: Path) -> int | str:
    """COCO image ids are the numeric file stems (000000000139.jpg -> 139); other names stay strings."""
    return int(path.stem) if path.stem.isnumeric() else path.stem


def prediction_records(image_path: Path, boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       ids: list[int]) -> list[dict]:
    """One image's detections (original pixels) as COCO result dicts with xywh boxes."""
    image_id = image_id_for(image_path)
    records = []
    for (x1, y1, x2, y2), score, cls in zip(boxes_xyxy.tolist(), scores.tolist(), classes.tolist()):
        records.append({"image_id": image_id, "category_id": ids[int(cls)],
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": round(score, 5)})
    return records


def write_json(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(records, f)
