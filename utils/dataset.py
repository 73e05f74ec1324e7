"""Detection dataset, epoch-seeded sampler, collate and the DataLoader built from them.

Reproducibility: the sampler yields (epoch, index) keys, and every random draw of a sample
(mosaic partners, augmentation) comes from a generator seeded by (seed, epoch, index). The
data a run sees therefore depends on neither the number of workers nor on a resume.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.augment import (augment_hsv, flip_left_right, flip_up_down, letterbox, mixup, mosaic_canvas,
                           pixel_augmentations, random_perspective)
from utils.boxes import xywhn_to_xyxy, xyxy_to_xywhn
from utils.data_config import DatasetConfig
from utils.dist import World, local_main_first
from utils.errors import UserError
from utils.labels import LabelScan, scan_split
from utils.log import LOGGER

# Stream tags keep the sample-order generator apart from the per-sample generators.
ORDER_STREAM, SAMPLE_STREAM = 0, 1


class Batch(NamedTuple):
    images: torch.Tensor     # (B, 3, H, W) uint8 RGB
    targets: torch.Tensor    # (M, 6) float32 [index in batch, class, cx, cy, w, h], normalised
    indices: torch.Tensor    # (B,) dataset indices
    letterbox: torch.Tensor  # (B, 4) float64 scale_x, scale_y, pad_x, pad_y: original -> network input


class DetectionDataset(Dataset):
    """Images and YOLO labels of one split, with YOLOv5's training augmentation when `augment`.

    With `rect` (validation), images are ordered by aspect ratio and each batch is
    letterboxed to its own stride-aligned shape instead of a square. Epochs from
    `mosaic_until_epoch` on train without mosaic (and so without mixup): the hyp's close_mosaic.
    """

    def __init__(self, scan: LabelScan, img_size: int, hyp: dict, augment: bool, seed: int = 0,
                 rect: bool = False, batch_size: int = 16, stride: int = 32, single_cls: bool = False,
                 mosaic_until_epoch: int | None = None):
        self.img_size, self.hyp, self.augment, self.seed = img_size, hyp, augment, seed
        self.mosaic_until_epoch = mosaic_until_epoch
        self.image_files, self.labels, self.shapes = list(scan.image_files), list(scan.labels), scan.shapes
        self.scan_key, self.single_cls = scan.cache_key, single_cls
        if single_cls:
            self.labels = [np.concatenate((np.zeros_like(lb[:, :1]), lb[:, 1:]), axis=1) for lb in self.labels]
        self.batch_shapes: np.ndarray | None = None
        if rect:
            self._sort_by_aspect_ratio(batch_size, stride)
        self.pixel_augment = pixel_augmentations(hyp) if augment else None
        self.use_pixel_augment = augment and any(hyp[k] > 0 for k in ("blur", "median_blur", "to_gray", "clahe"))
        self.ram_cache: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.image_files)

    def _sort_by_aspect_ratio(self, batch_size: int, stride: int) -> None:
        aspect = self.shapes[:, 0] / self.shapes[:, 1]  # h / w
        order = aspect.argsort(kind="stable")
        self.image_files = [self.image_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, aspect = self.shapes[order], aspect[order]
        num_batches = math.ceil(len(order) / batch_size)
        shapes = np.ones((num_batches, 2))
        for b in range(num_batches):
            ratios = aspect[b * batch_size:(b + 1) * batch_size]
            if ratios.max() < 1:
                shapes[b] = (ratios.max(), 1)
            elif ratios.min() > 1:
                shapes[b] = (1, 1 / ratios.min())
        # Half a stride of margin, as YOLOv5 validates, then up to a multiple of the stride.
        self.batch_shapes = (np.ceil(shapes * self.img_size / stride + 0.5) * stride).astype(int)
        self.batch_size = batch_size

    def cache_images_in_ram(self, threads: int = 4, max_share: float = 0.7, quiet: bool = False) -> bool:
        """Decode and resize every image once; False (with a warning unless quiet) when that would
        take more than max_share of the available memory."""
        needed = sum(self._resized_hw(h, w)[0] * self._resized_hw(h, w)[1] * 3 for h, w in self.shapes)
        available = _available_memory_bytes()
        if available is not None and needed > max_share * available:
            if not quiet:
                LOGGER.warning(f"WARNING: --cache ram needs {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB "
                               "are available: images are read from disk instead")
            return False
        with ThreadPoolExecutor(threads) as pool:
            self.ram_cache = list(pool.map(self._read_resized, range(len(self))))
        LOGGER.info(f"Cached {len(self)} images in RAM ({needed / 2**20:.0f} MiB)")
        return True

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        ratio = self.img_size / max(h, w)
        return max(1, round(h * ratio)), max(1, round(w * ratio))

    def _read_resized(self, index: int) -> np.ndarray:
        """RGB image with its long side resized to img_size."""
        path = self.image_files[index]
        image = cv2.imread(str(path))
        if image is None:
            raise UserError(f"cannot read image {path} (it was readable when the dataset was scanned)")
        h, w = image.shape[:2]
        new_h, new_w = self._resized_hw(h, w)
        if (new_h, new_w) != (h, w):
            shrink_for_val = not self.augment and new_w < w
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink_for_val else cv2.INTER_LINEAR)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def load_image(self, index: int) -> np.ndarray:
        return self.ram_cache[index] if self.ram_cache is not None else self._read_resized(index)

    def _pixel_labels(self, index: int, width: float, height: float, pad_x: float = 0, pad_y: float = 0) -> np.ndarray:
        """Labels of `index` as (n, 5) [class, x1, y1, x2, y2] on an image drawn at width x height."""
        labels = self.labels[index]
        return np.concatenate((labels[:, :1], xywhn_to_xyxy(labels[:, 1:], width, height, pad_x, pad_y)), axis=1)

    def _load_mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        indices = [index, *rng.integers(0, len(self), size=3).tolist()]
        images, labels = [], []
        for i in indices:
            image = self.load_image(i)
            images.append(image)
            labels.append(self._pixel_labels(i, image.shape[1], image.shape[0]))
        canvas, canvas_labels = mosaic_canvas(images, labels, self.img_size, rng)
        border = -self.img_size // 2
        return self._random_perspective(canvas, canvas_labels, rng, border=(border, border))

    def _random_perspective(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                            border: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
        h = self.hyp
        return random_perspective(image, labels, rng, degrees=h["degrees"], translate=h["translate"],
                                  scale=h["scale"], shear=h["shear"], perspective=h["perspective"], border=border)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor, int, tuple[float, ...]]:
        """(epoch, index) -> (image (3, H, W) uint8 RGB, targets (n, 6), index, letterbox scale_x, scale_y, pad_x, pad_y)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng((self.seed, epoch, SAMPLE_STREAM, index))
        hyp = self.hyp
        letterbox_info = (1.0, 1.0, 0.0, 0.0)
        mosaic_open = self.mosaic_until_epoch is None or epoch < self.mosaic_until_epoch
        if self.augment and rng.random() < hyp["mosaic"] and mosaic_open:
            image, labels = self._load_mosaic(index, rng)
            if rng.random() < hyp["mixup"]:
                image2, labels2 = self._load_mosaic(int(rng.integers(0, len(self))), rng)
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
                image, labels = self._random_perspective(image, labels, rng)

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
        image_chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image_chw, targets, index, letterbox_info

    def original_boxes_xyxy(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of `index` in original-image pixels (float64): boxes (n, 4), classes (n,)."""
        h0, w0 = self.shapes[index]
        labels = self.labels[index].astype(np.float64)
        cx, cy, w, h = labels[:, 1] * w0, labels[:, 2] * h0, labels[:, 3] * w0, labels[:, 4] * h0
        return np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1), labels[:, 0].astype(np.int64)


def collate(samples: list[tuple]) -> Batch:
    """Stack images and letterbox data; concatenate targets with their image's batch index in column 0."""
    images, targets, indices, letterbox_info = zip(*samples)
    for i, t in enumerate(targets):
        t[:, 0] = i  # image index within the batch, for the loss
    return Batch(torch.stack(images), torch.cat(targets, 0), torch.tensor(indices),
                 torch.tensor(letterbox_info, dtype=torch.float64))


class EpochSampler(Sampler):
    """Yields (epoch, index) keys; the shuffled order is a function of (seed, epoch) alone.

    With several ranks each takes every world_size-th key of the same order (padded by
    wrapping around so all ranks get the same count).
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` leaves out this rank's first keys (a resume inside the epoch)."""
        self.epoch, self.skip = epoch, skip

    def epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng((self.seed, self.epoch, ORDER_STREAM, 0)).permutation(self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        per_rank = math.ceil(len(order) / self.world_size)
        order = np.resize(order, per_rank * self.world_size)[self.rank::self.world_size][self.skip:]
        return iter([(self.epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size) - self.skip


def _init_worker(_: int) -> None:
    cv2.setNumThreads(0)  # one worker, one core: OpenCV's own threads only add contention
    torch.set_num_threads(1)


def build_dataloader(dataset: DetectionDataset, batch_size: int, workers: int, shuffle: bool,
                     seed: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                     processes_per_machine: int = 1) -> DataLoader:
    """DataLoader over `dataset` (this rank's share of it) with an EpochSampler; call
    loader.sampler.set_epoch(e) every epoch. The machine's cores are shared by its processes."""
    cores = max((os.cpu_count() or 1) // processes_per_machine, 1)
    workers = min(workers, cores, batch_size if batch_size > 1 else 0)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0, worker_init_fn=_init_worker)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_train_dataset(data: DatasetConfig, hyp: dict, img_size: int, seed: int, single_cls: bool, cache: str,
                        report_path: Path | None, epochs: int, world: World = World()) -> DetectionDataset:
    """The augmenting dataset of the verified train split (mosaic closed for the last
    hyp['close_mosaic'] of `epochs`), its images cached in RAM as `cache` says; problem files go
    to report_path."""
    with local_main_first(world):  # one process per machine writes the label cache, the others read it
        scan = scan_split(data.train, data.nc, prefix="train: ", report_path=report_path)
    dataset = DetectionDataset(scan, img_size, hyp, augment=True, seed=seed, single_cls=single_cls,
                               mosaic_until_epoch=epochs - int(hyp["close_mosaic"]))
    if cache == "ram":  # every process of the machine holds its own copy
        dataset.cache_images_in_ram(max_share=0.7 / world.local_size)
    elif cache == "auto":  # decoding in the workers takes CPU from training: ~15% on 2 cores (bench_train.py)
        dataset.cache_images_in_ram(max_share=0.1 / world.local_size, quiet=True)
    return dataset


def build_train_loader(data: DatasetConfig, hyp: dict, img_size: int, batch_size: int, workers: int, seed: int,
                       single_cls: bool, cache: str, pin_memory: bool, report_path: Path | None,
                       epochs: int, world: World = World()) -> torch.utils.data.DataLoader:
    """The training loader over build_train_dataset. Under torchrun it yields this rank's
    batch_size / world.size images of each global batch."""
    dataset = build_train_dataset(data, hyp, img_size, seed, single_cls, cache, report_path, epochs, world)
    return build_dataloader(dataset, batch_size // world.size, workers, shuffle=True, seed=seed,
                            pin_memory=pin_memory, rank=world.rank, world_size=world.size,
                            processes_per_machine=world.local_size)
