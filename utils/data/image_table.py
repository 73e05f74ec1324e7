"""A split's per-image data (path, labels, original size) as a few flat numpy arrays.

A list of N Paths and N label arrays is 2N Python objects of ~250 bytes each, and a forked
DataLoader worker that only reads them still copies the pages it touches, since reading an
object writes its reference count: a worker's private memory grows towards the whole list over
an epoch (pytorch/pytorch#13246). Here paths are one byte buffer and labels one (M, 5) array,
each with offsets: ~(path length + 20 x boxes + 24) bytes an image, nothing per image for a
worker to copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))


def _gather(flat: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows offsets[i]:offsets[i + 1] of `flat` for each of `indices`, back to back, and their offsets."""
    lengths = np.diff(offsets)[indices]
    new_offsets = _offsets(lengths)
    rows = np.repeat(offsets[:-1][indices] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return flat[rows], new_offsets


def _common_folder(paths: list[str]) -> str:
    """The folder (with its trailing separator) that every path starts with, letter for letter; "" if none."""
    if not paths:
        return ""
    first, last = min(paths), max(paths)  # the common start of all is that of the smallest and the largest
    common = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return first[: first.rfind(os.sep, 0, common) + 1]


@dataclass(frozen=True)
class ImageTable:
    """Paths, labels ((n, 5) float32 [class, cx, cy, w, h] normalised per image) and original
    (height, width) of N images."""

    prefix: bytes  # the folder every path starts with (os.fsencode'd, with its separator), stored once
    path_bytes: np.ndarray  # uint8: the rest of every path, back to back
    path_offsets: np.ndarray  # int64 (N + 1,): path i is path_bytes[path_offsets[i] : path_offsets[i + 1]]
    boxes: np.ndarray  # float32 (M, 5): every label row, image after image
    box_offsets: np.ndarray  # int64 (N + 1,)
    shapes: np.ndarray  # int64 (N, 2) original (height, width)

    @classmethod
    def from_lists(cls, paths: list[Path], labels: list[np.ndarray], shapes: np.ndarray) -> ImageTable:
        """From a path, an (n, 5) label array and a (height, width) per image."""
        return cls.from_flat(
            [os.fspath(p) for p in paths],
            np.concatenate([*labels, np.zeros((0, 5), np.float32)]),
            [len(lb) for lb in labels],
            shapes,
        )

    @classmethod
    def from_flat(
        cls, paths: list[str], boxes: np.ndarray, counts: np.ndarray | list[int], shapes: np.ndarray
    ) -> ImageTable:
        """From path strings, every label row back to back and the number of rows of each image."""
        prefix = _common_folder(paths)
        # One encoding of all the paths, cut at the NULs that no path holds.
        encoded = np.frombuffer(os.fsencode("".join(p[len(prefix) :] + "\0" for p in paths)), np.uint8)
        ends = np.flatnonzero(encoded == 0)
        starts = np.concatenate(([0], ends[:-1] + 1))
        return cls(
            os.fsencode(prefix),
            np.delete(encoded, ends),
            _offsets(ends - starts),
            np.ascontiguousarray(boxes, np.float32).reshape(-1, 5),
            _offsets(np.asarray(counts, np.int64)),
            np.asarray(shapes, np.int64).reshape(-1, 2),
        )

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    def path(self, index: int) -> Path:
        """Image `index`'s path."""
        rest = self.path_bytes[self.path_offsets[index] : self.path_offsets[index + 1]].tobytes()
        return Path(os.fsdecode(self.prefix + rest))

    def labels(self, index: int) -> np.ndarray:
        """The (n, 5) label rows of image `index` (a view: copy before changing it)."""
        return self.boxes[self.box_offsets[index] : self.box_offsets[index + 1]]

    def paths(self) -> list[Path]:
        """Every image's path, as a new list."""
        return [self.path(i) for i in range(len(self))]

    def label_list(self) -> list[np.ndarray]:
        """Every image's labels (views), as a new list."""
        return [self.labels(i) for i in range(len(self))]

    def take(self, indices: np.ndarray | list[int]) -> ImageTable:
        """The images `indices`, in that order."""
        indices = np.asarray(indices, np.int64)
        path_bytes, path_offsets = _gather(self.path_bytes, self.path_offsets, indices)
        boxes, box_offsets = _gather(self.boxes, self.box_offsets, indices)
        return ImageTable(self.prefix, path_bytes, path_offsets, boxes, box_offsets, self.shapes[indices])

    def single_class(self) -> ImageTable:
        """Every label of class 0 (--single-cls)."""
        boxes = self.boxes.copy()
        boxes[:, 0] = 0
        return ImageTable(self.prefix, self.path_bytes, self.path_offsets, boxes, self.box_offsets, self.shapes)


class TableView:
    """What a split's holders (LabelScan, DetectionDataset) read from their `table`: one image's path
    and labels, and the whole lists (new lists: index with image_file(i) and labels_of(i) in loops)."""

    table: ImageTable

    @property
    def shapes(self) -> np.ndarray:
        """(N, 2) original (height, width), EXIF orientation applied."""
        return self.table.shapes

    @property
    def image_files(self) -> list[Path]:
        return self.table.paths()

    @property
    def labels(self) -> list[np.ndarray]:
        return self.table.label_list()

    def image_file(self, index: int) -> Path:
        return self.table.path(index)

    def labels_of(self, index: int) -> np.ndarray:
        """(n, 5) float32 [class, cx, cy, w, h] normalised (a view: copy before changing it)."""
        return self.table.labels(index)
