"""The detection dataset (YOLOv5's augmentation, rectangular validation batches, RAM cache) and its collate.

Reproducibility: every random draw of a sample (mosaic partners, augmentation) comes from a
generator seeded by (seed, epoch, index), the key the sampler of utils/data/loader.py yields.
A key may end with a pool of indices (the hyp's mosaic_pool): the mosaic partners are then drawn
from the pool's other images instead of the whole split. The sampler's pools lie inside a batch,
and a batch (__getitems__) decodes each of its images once, so a mosaic sample costs about one
JPEG decode instead of four.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from utils.boxes import xywhn_to_xyxy, xyxy_to_xywhn
from utils.data.augment import (
    augment_hsv,
    flip_left_right,
    flip_up_down,
    letterbox,
    mixup,
    mosaic,
    pixel_augmentations,
    random_perspective,
)
from utils.data.decode import read_image_rgb
from utils.data.image_table import TableView
from utils.data.labels import UNDECODABLE_IMAGE, LabelScan
from utils.device import available_memory_bytes
from utils.errors import UserError
from utils.log import LOGGER

# Stream tags keep the sample-order generator apart from the per-sample generators.
ORDER_STREAM, SAMPLE_STREAM = 0, 1


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) uint8 RGB
    targets: torch.Tensor  # (M, 6) float32 [index in batch, class, cx, cy, w, h], normalised
    indices: torch.Tensor  # (B,) dataset indices
    letterbox: torch.Tensor  # (B, 4) float64 scale_x, scale_y, pad_x, pad_y: original -> network input


class DetectionDataset(TableView, Dataset):
    """Images and YOLO labels of one split, with YOLOv5's training augmentation when `augment`.

    With `rect` (validation), images are ordered by aspect ratio and each batch is
    letterboxed to its own stride-aligned shape instead of a square. Epochs from
    `mosaic_until_epoch` on train without mosaic (and so without mixup): the hyp's close_mosaic.
    """

    def __init__(
        self,
        scan: LabelScan,
        img_size: int,
        hyp: dict,
        augment: bool,
        seed: int = 0,
        rect: bool = False,
        batch_size: int = 16,
        stride: int = 32,
        single_cls: bool = False,
        mosaic_until_epoch: int | None = None,
    ):
        self.img_size, self.hyp, self.augment, self.seed = img_size, hyp, augment, seed
        self.mosaic_until_epoch = mosaic_until_epoch
        self.table = scan.table.single_class() if single_cls else scan.table  # flat: see utils/data/image_table.py
        self.scan_key, self.single_cls = scan.cache_key, single_cls
        self.scan = scan  # its counts and messages, for the run's data report
        self.batch_shapes: np.ndarray | None = None
        if rect:
            self._sort_by_aspect_ratio(batch_size, stride)
        self.pixel_augment = pixel_augmentations(hyp) if augment else None
        self.use_pixel_augment = augment and any(hyp[k] > 0 for k in ("blur", "median_blur", "to_gray", "clahe"))
        self.ram_cache: list[np.ndarray] | None = None
        self.batch_images: dict[int, np.ndarray] | None = None  # within __getitems__: decoded once per batch

    def __len__(self) -> int:
        return len(self.table)

    def _sort_by_aspect_ratio(self, batch_size: int, stride: int) -> None:
        aspect = self.shapes[:, 0] / self.shapes[:, 1]  # h / w
        order = aspect.argsort(kind="stable")
        self.table, aspect = self.table.take(order), aspect[order]
        num_batches = math.ceil(len(order) / batch_size)
        shapes = np.ones((num_batches, 2))
        for b in range(num_batches):
            ratios = aspect[b * batch_size : (b + 1) * batch_size]
            if ratios.max() < 1:
                shapes[b] = (ratios.max(), 1)
            elif ratios.min() > 1:
                shapes[b] = (1, 1 / ratios.min())
        # Half a stride of margin, as YOLOv5 validates, then up to a multiple of the stride.
        self.batch_shapes = (np.ceil(shapes * self.img_size / stride + 0.5) * stride).astype(int)
        self.batch_size = batch_size

    def cache_images_in_ram(self, threads: int = 4, max_share: float = 0.7, quiet: bool = False) -> bool:
        """Decode and resize every image once; False (with a warning unless quiet) when that would
        take more than max_share of the available memory. An image that cannot be decoded after all
        is skipped and counted in the scan, like those the scan rejected."""
        needed = sum(self._resized_hw(h, w)[0] * self._resized_hw(h, w)[1] * 3 for h, w in self.shapes)
        available = available_memory_bytes(torch.device("cpu"))
        if available is not None and needed > max_share * available:
            if not quiet:
                LOGGER.warning(
                    f"WARNING: --cache ram needs {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB "
                    "are available: images are read from disk instead"
                )
            return False
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(self._read_resized, range(len(self))))
        undecodable = [i for i, image in enumerate(images) if image is None]
        if undecodable:
            self._skip_undecodable(undecodable)
        self.ram_cache = [image for image in images if image is not None]
        LOGGER.info(f"Cached {len(self)} images in RAM ({needed / 2**20:.0f} MiB)")
        return True

    def _skip_undecodable(self, indices: list[int]) -> None:
        """Leave out images that passed the scan but cannot be decoded; the scan counts them."""
        if self.batch_shapes is not None:
            raise ValueError("a rectangular (validation) dataset is not cached: its batches are fixed")
        for i in indices:
            self.scan.skip(
                self.image_file(i),
                UNDECODABLE_IMAGE,
                f"{self.image_file(i)}: passed the scan but cannot be decoded (skipped)",
            )
        self.table = self.table.take(sorted(set(range(len(self))) - set(indices)))
        LOGGER.warning(
            f"WARNING: {len(indices)} image(s) passed the scan but cannot be decoded and were skipped "
            f"(the first: {self.scan.messages[-len(indices)][1]})"
        )
        if not len(self):
            raise UserError(f"no image of {self.scan.table.path(0).parent} can be decoded")

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        ratio = self.img_size / max(h, w)
        return max(1, round(h * ratio)), max(1, round(w * ratio))

    def _read_resized(self, index: int) -> np.ndarray | None:
        """RGB image with its long side resized to img_size (None if it cannot be decoded)."""
        image = read_image_rgb(self.image_file(index))
        if image is None:
            return None
        h, w = image.shape[:2]
        new_h, new_w = self._resized_hw(h, w)
        if (new_h, new_w) != (h, w):
            shrink_for_val = not self.augment and new_w < w
            image = cv2.resize(
                image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink_for_val else cv2.INTER_LINEAR
            )
        return image

    def load_image(self, index: int) -> np.ndarray:
        """The image resized for training (its long side img_size), never modified by the caller: a
        RAM cache, and a batch's images (__getitems__), hand out the same array again."""
        if self.ram_cache is not None:
            return self.ram_cache[index]
        if self.batch_images is not None and index in self.batch_images:
            return self.batch_images[index]
        image = self._read_resized(index)
        if image is None:  # it decoded when the scan (and its cache) last saw it: changed since
            raise UserError(
                f"cannot decode image {self.image_file(index)}, which the dataset scan accepted: was it "
                "changed during the run? Restore it (or remove it) and resume"
            )
        if self.batch_images is not None:
            self.batch_images[index] = image
        return image

    def _pixel_labels(self, index: int, width: float, height: float, pad_x: float = 0, pad_y: float = 0) -> np.ndarray:
        """Labels of `index` as (n, 5) [class, x1, y1, x2, y2] on an image drawn at width x height."""
        labels = self.labels_of(index)
        return np.concatenate((labels[:, :1], xywhn_to_xyxy(labels[:, 1:], width, height, pad_x, pad_y)), axis=1)

    def _partners(self, index: int, count: int, rng: np.random.Generator, pool: tuple[int, ...]) -> list[int]:
        """`count` images to mosaic with `index`: drawn from the whole split (YOLOv5's draw), or
        distinct ones from the other images of its pool."""
        if not pool:
            return rng.integers(0, len(self), size=count).tolist()
        others = [i for i in pool if i != index] or [index]
        if len(others) >= count:  # distinct, as a draw from a whole split almost always is
            return [others[j] for j in rng.choice(len(others), size=count, replace=False).tolist()]
        return [others[j] for j in rng.integers(0, len(others), size=count).tolist()]

    def _load_mosaic(
        self, index: int, rng: np.random.Generator, pool: tuple[int, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        indices = [index, *self._partners(index, 3, rng, pool)]
        images = [self.load_image(i) for i in indices]
        labels = [self._pixel_labels(i, image.shape[1], image.shape[0]) for i, image in zip(indices, images)]
        return mosaic(images, labels, self.img_size, rng, **self._warp_options())

    def _warp_options(self) -> dict[str, float]:
        return {key: self.hyp[key] for key in ("degrees", "translate", "scale", "shear", "perspective")}

    def __getitems__(self, keys: list[tuple]) -> list[tuple]:
        """A batch's samples (the DataLoader's batched fetch); with mosaic pools, each image decoded
        once for all of them (without, a batch holds no more than one sample's images at a time)."""
        self.batch_images = {} if any(mosaic_pool_of_key(key) for key in keys) else None
        try:
            return [self[key] for key in keys]
        finally:
            self.batch_images = None

    def __getitem__(self, key: tuple | int) -> tuple[torch.Tensor, torch.Tensor, int, tuple[float, ...]]:
        """(epoch, index) -> (image (3, H, W) uint8 RGB, targets (n, 6), index,
        letterbox (scale_x, scale_y, pad_x, pad_y)). A key (epoch, index, stream) draws the
        augmentation from a stream of its own (a process training separately under torchrun); a
        key ending with a tuple of indices draws the mosaic partners from that pool."""
        pool = mosaic_pool_of_key(key)
        epoch, index, *stream = key[: len(key) - bool(pool)] if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng((self.seed, epoch, SAMPLE_STREAM, index, *stream))
        hyp = self.hyp
        letterbox_info = (1.0, 1.0, 0.0, 0.0)
        mosaic_open = self.mosaic_until_epoch is None or epoch < self.mosaic_until_epoch
        if self.augment and rng.random() < hyp["mosaic"] and mosaic_open:
            image, labels = self._load_mosaic(index, rng, pool)
            if rng.random() < hyp["mixup"]:
                (other,) = self._partners(index, 1, rng, pool)
                image2, labels2 = self._load_mosaic(other, rng, pool)
                image, labels = mixup(image, labels, image2, labels2, rng)
        else:
            image = self.load_image(index)
            (h0, w0), (h, w) = self.shapes[index], image.shape[:2]
            if self.batch_shapes is not None:
                shape = tuple(self.batch_shapes[index // self.batch_size])
            else:
                shape = (self.img_size, self.img_size)
            image, (ratio_x, ratio_y), (pad_x, pad_y) = letterbox(image, shape, scaleup=self.augment)
            labels = self._pixel_labels(index, w * ratio_x, h * ratio_y, pad_x, pad_y)
            letterbox_info = (w * ratio_x / w0, h * ratio_y / h0, pad_x, pad_y)
            if self.augment:
                image, labels = random_perspective(image, labels, rng, **self._warp_options())

        if self.augment:
            if self.use_pixel_augment:
                self.pixel_augment.set_random_seed(int(rng.integers(2**31)))
                image = self.pixel_augment(image=image)["image"]
            image = augment_hsv(image, rng, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            if rng.random() < hyp["flipud"]:
                image, labels = flip_up_down(image, labels)
            if rng.random() < hyp["fliplr"]:
                image, labels = flip_left_right(image, labels)

        height, width = image.shape[:2]
        targets = torch.zeros((len(labels), 6), dtype=torch.float32)
        if len(labels):
            targets[:, 1] = torch.from_numpy(labels[:, 0])
            targets[:, 2:] = torch.from_numpy(xyxy_to_xywhn(labels[:, 1:], width, height))
        image_chw = torch.from_numpy(np.stack(cv2.split(image)))  # HWC -> CHW, faster than a transposed copy
        return image_chw, targets, index, letterbox_info

    def original_boxes_xyxy(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of `index` in original-image pixels (float64): boxes (n, 4), classes (n,)."""
        h0, w0 = self.shapes[index]
        labels = self.labels_of(index).astype(np.float64)
        cx, cy, w, h = labels[:, 1] * w0, labels[:, 2] * h0, labels[:, 3] * w0, labels[:, 4] * h0
        return np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1), labels[:, 0].astype(np.int64)


def mosaic_pool_of_key(key: tuple | int) -> tuple[int, ...]:
    """The pool a sampler key ends with (utils/data/loader.py's mosaic_pool), else ()."""
    return key[-1] if isinstance(key, tuple) and isinstance(key[-1], tuple) else ()


def collate(samples: list[tuple]) -> Batch:
    """Stack images and letterbox data; concatenate targets with their image's batch index in column 0."""
    images, targets, indices, letterbox_info = zip(*samples)
    for i, t in enumerate(targets):
        t[:, 0] = i  # image index within the batch, for the loss
    return Batch(
        default_collate(list(images)),  # in a worker: stacked straight into shared memory, one copy fewer
        torch.cat(targets, 0),
        torch.tensor(indices),
        torch.tensor(letterbox_info, dtype=torch.float64),
    )
