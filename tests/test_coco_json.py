"""COCO JSON: ids, COCO's category mapping, and a ground truth that pycocotools reads back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.coco_json import (COCO80_TO_91, cached_ground_truth, category_ids, image_ids, prediction_records,
                             pycocotools_stats)
from utils.data_config import load_dataset_config
from utils.dataset import DetectionDataset
from utils.hyp import load_hyp
from utils.labels import list_image_files, scan_labels


def test_image_ids_numeric_stems_or_positions():
    assert image_ids([Path("a/000000000139.jpg"), Path("a/9.jpg")]) == {Path("a/000000000139.jpg"): 139, Path("a/9.jpg"): 9}
    mixed = [Path("b/zebra.jpg"), Path("b/ant.jpg"), Path("b/7.jpg")]
    assert image_ids(mixed) == {Path("b/7.jpg"): 0, Path("b/ant.jpg"): 1, Path("b/zebra.jpg"): 2}


def test_coco_category_mapping():
    assert len(COCO80_TO_91) == 80 and list(COCO80_TO_91) == sorted(set(COCO80_TO_91))
    assert category_ids(80, is_coco=True)[:3] == [1, 2, 3] and category_ids(80, True)[-1] == 90
    assert category_ids(3, is_coco=False) == [0, 1, 2]


def test_ground_truth_scores_perfectly_against_itself(tiny_dataset, tmp_path):
    data = load_dataset_config(tiny_dataset)
    scan = scan_labels(list_image_files(data.val)[0], data.nc, cache_path=None)
    dataset = DetectionDataset(scan, 64, load_hyp("scratch-low.yaml"), augment=False)
    ids = image_ids(dataset.image_files)
    cat_ids = category_ids(data.nc, is_coco=False)
    gt_path = cached_ground_truth(dataset, ids, cat_ids, list(data.names), tmp_path / "val.coco.json", tmp_path)
    records = []
    for index, path in enumerate(dataset.image_files):
        boxes, classes = dataset.original_boxes_xyxy(index)
        records += prediction_records(ids[path], boxes, np.full(len(boxes), 0.9), classes, cat_ids)
    stats, summary = pycocotools_stats(gt_path, records, sorted(ids.values()))
    assert stats[0] == stats[1] > 0.999 and "Average Precision" in summary
    before = gt_path.stat().st_mtime_ns
    assert cached_ground_truth(dataset, ids, cat_ids, list(data.names), gt_path, tmp_path) == gt_path
    assert gt_path.stat().st_mtime_ns == before  # reused, not rewritten
    assert pycocotools_stats(gt_path, [], sorted(ids.values())) is None
