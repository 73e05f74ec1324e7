"""COCO JSON: ids, COCO's category mapping, and a ground truth that pycocotools reads back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.config import load_dataset_config
from utils.data.dataset import DetectionDataset
from utils.data.labels import scan_labels
from utils.data.listing import label_path_for, list_image_paths
from utils.eval.coco_json import (
    COCO80_TO_91,
    cached_ground_truth,
    category_ids,
    ground_truth,
    image_ids,
    prediction_records,
    pycocotools_stats,
)
from utils.hyp import load_hyp


def test_image_ids_numeric_stems_or_positions():
    assert image_ids([Path("a/000000000139.jpg"), Path("a/9.jpg")]) == {
        Path("a/000000000139.jpg"): 139,
        Path("a/9.jpg"): 9,
    }
    mixed = [Path("b/zebra.jpg"), Path("b/ant.jpg"), Path("b/7.jpg")]
    assert image_ids(mixed) == {Path("b/7.jpg"): 0, Path("b/ant.jpg"): 1, Path("b/zebra.jpg"): 2}


def test_coco_category_mapping():
    assert len(COCO80_TO_91) == 80 and list(COCO80_TO_91) == sorted(set(COCO80_TO_91))
    assert category_ids(80, is_coco=True)[:3] == [1, 2, 3] and category_ids(80, True)[-1] == 90
    assert category_ids(3, is_coco=False) == [0, 1, 2]


def test_ground_truth_matches_the_label_files(tiny_dataset, tmp_path):
    """The COCO annotations equal boxes computed here straight from the .txt files and image sizes."""
    data = load_dataset_config(tiny_dataset)
    scan = scan_labels(list_image_paths(data.val)[0], data.nc, cache_path=None)
    dataset = DetectionDataset(scan, 64, load_hyp("scratch-low.yaml"), augment=False)
    ids = image_ids(dataset.image_files)
    coco = ground_truth(dataset, ids, category_ids(data.nc, is_coco=False), list(data.names))
    expected = []
    for path in dataset.image_files:
        width, height = Image.open(path).size
        for line in label_path_for(path).read_text().splitlines():
            cls, cx, cy, w, h = map(float, line.split())
            expected.append((ids[path], int(cls), (cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height))
    got = [(a["image_id"], a["category_id"], *a["bbox"]) for a in coco["annotations"]]
    assert len(got) == len(expected) > 0
    for g, e in zip(sorted(got), sorted(expected)):
        assert g[:2] == e[:2] and np.allclose(g[2:], e[2:], atol=1e-9)
    assert {i["id"]: (i["width"], i["height"]) for i in coco["images"]} == {
        ids[p]: Image.open(p).size for p in dataset.image_files
    }


def test_ground_truth_scores_perfectly_against_itself(tiny_dataset, tmp_path):
    data = load_dataset_config(tiny_dataset)
    scan = scan_labels(list_image_paths(data.val)[0], data.nc, cache_path=None)
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
