"""ImageTable (utils/data/image_table.py): a split's paths, labels and sizes as flat arrays give back
exactly what they were built from, in any order taken, whatever the paths have in common."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from utils.data.image_table import ImageTable


def random_labels(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.random((int(rng.integers(0, 4)), 5)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize(
    "paths",
    [
        [Path("/data/images/train/a.jpg"), Path("/data/images/train/sub/b.png"), Path("/data/images/trainX/c.jpg")],
        [Path("relative/a.jpg"), Path("/absolute/b.jpg")],  # nothing in common
        [Path("/only/one.jpg")],
        [Path("/d/ünïcode €.jpg"), Path("/d/x.jpg")],
        [],
    ],
)
def test_a_table_gives_back_its_lists_and_takes_in_any_order(paths):
    rng = np.random.default_rng(len(paths))
    labels = random_labels(rng, len(paths))
    shapes = rng.integers(1, 1000, (len(paths), 2))
    table = ImageTable.from_lists(paths, labels, shapes)
    assert table.paths() == paths and len(table) == len(paths)
    assert all(np.array_equal(a, b) and a.dtype == np.float32 for a, b in zip(table.label_list(), labels))
    order = rng.permutation(len(paths))[::-1]
    taken = table.take(order)
    assert taken.paths() == [paths[i] for i in order]
    assert all(np.array_equal(taken.labels(k), labels[i]) for k, i in enumerate(order))
    assert np.array_equal(taken.shapes, shapes[order])


def test_single_class_zeroes_the_classes_of_a_copy():
    labels = [np.array([[3, 0.5, 0.5, 0.1, 0.1]], np.float32), np.array([[7, 0.2, 0.2, 0.1, 0.1]], np.float32)]
    table = ImageTable.from_lists([Path("/a.jpg"), Path("/b.jpg")], labels, np.ones((2, 2)))
    single = table.single_class()
    assert single.boxes[:, 0].tolist() == [0, 0] and table.boxes[:, 0].tolist() == [3, 7]
    assert np.array_equal(single.boxes[:, 1:], table.boxes[:, 1:])


def test_a_large_table_holds_a_few_arrays_not_an_object_per_image():
    """What makes it cheap in every DataLoader worker: no Python object per image to copy on read."""
    count = 20_000
    paths = [Path(f"/data/coco/images/train2017/{i:012d}.jpg") for i in range(count)]
    table = ImageTable.from_lists(paths, random_labels(np.random.default_rng(0), count), np.ones((count, 2)))
    arrays = [table.path_bytes, table.path_offsets, table.boxes, table.box_offsets, table.shapes]
    held = sum(a.nbytes for a in arrays) + len(table.prefix)
    assert held / count < 16 + 8 + 20 * 1.5 + 8 + 16 + 1  # name, offsets, ~1.5 boxes of 20 bytes, shape
    assert table.path(12345) == paths[12345]
