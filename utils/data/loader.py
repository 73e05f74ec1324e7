"""Loaders: the epoch-seeded sampler, and the training and validation DataLoaders of a dataset.

Reproducibility: the sampler yields (epoch, index) keys (and the sample's mosaic pool), and every
random draw of a sample comes from a generator seeded by (seed, epoch, index) (see
utils/data/dataset.py), so the data a run sees depends on neither the number of workers, nor the
number of processes sharing each global batch, nor a resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from utils.data.config import DatasetConfig
from utils.data.dataset import ORDER_STREAM, DetectionDataset, collate
from utils.data.labels import scan_split
from utils.dist import World, per_process_batch
from utils.peak_memory import steady_malloc
from utils.resources import usable_cpu_count
from utils.stop_signals import end_workers_at_exit, ignore_stop_signals


class EpochSampler(Sampler):
    """Yields (epoch, index) keys; the shuffled order is a function of (seed, epoch) alone.

    With several ranks each takes its share of every global batch of `batch_size` keys per rank
    (a contiguous part of it: rank r the r-th), the order padded by wrapping around so all ranks
    get the same count. Ranks training separately (set_epoch's `independent`) each take theirs
    from an order of their own, a function of (seed, epoch, rank), and their keys (epoch, index,
    stream) draw augmentations of their own too. `whole`: each rank takes every key of its own
    order (ranks that are runs of their own: --graft).

    `mosaic_pool` G > 0: the order's positions are grouped into pools of G (the last pool takes
    the remainder too), and each key ends with its pool's indices (a tuple): the dataset draws
    the sample's mosaic partners from them (utils/data/dataset.py). A pool lies inside one batch
    of one rank when G divides `batch_size`, so a worker decodes each image of its batch once.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        whole: bool = False,
        batch_size: int = 1,
        mosaic_pool: int = 0,
    ):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.whole = rank, world_size, whole
        self.batch_size, self.mosaic_pool = batch_size, mosaic_pool
        self.epoch, self.skip, self.independent = 0, 0, False

    def set_epoch(self, epoch: int, skip: int = 0, independent: bool = False) -> None:
        """Select the epoch's order; `skip` leaves out this rank's first keys (a resume inside the
        epoch); `independent`: this rank's own order and augmentation streams (always, when whole)."""
        self.epoch, self.skip, self.independent = epoch, skip, independent

    def epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng((self.seed, self.epoch, ORDER_STREAM, self.stream)).permutation(self.num_samples)

    @property
    def own(self) -> bool:
        """Whether this rank draws an order and augmentations of its own this epoch."""
        return self.independent or self.whole

    @property
    def stream(self) -> int:
        """0 for ranks sharing one order, 1 + rank for a rank on its own."""
        return 1 + self.rank if self.own else 0

    def positions(self) -> np.ndarray:
        """This rank's positions in the epoch's order, before the skip: its contiguous share of
        each global batch of the order padded to an equal count per rank (all of it when whole)."""
        if self.whole or self.world_size == 1:
            return np.arange(self.num_samples)
        world, per_rank = self.world_size, math.ceil(self.num_samples / self.world_size)
        padded = np.resize(np.arange(self.num_samples), per_rank * world)  # wraps around
        global_batch, parts = self.batch_size * world, []
        for start in range(0, len(padded), global_batch):
            share = min(global_batch, len(padded) - start) // world  # the last global batch: an equal part each
            parts.append(padded[start + self.rank * share : start + (self.rank + 1) * share])
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[tuple]:
        order, stream = self.epoch_order(), ((self.stream,) if self.own else ())
        positions = self.positions()[self.skip :]
        if not self.mosaic_pool:
            return iter([(self.epoch, int(order[p]), *stream) for p in positions])
        return self._pooled_keys(order, positions, stream)

    def _pooled_keys(self, order: np.ndarray, positions: np.ndarray, stream: tuple) -> Iterator[tuple]:
        """The keys at `positions` of `order`, each ending with its pool's indices (made lazily: a
        tuple per pool, not per key, and none for the epoch's whole order at once)."""
        size = self.mosaic_pool
        last_pool = max(len(order) // size - 1, 0)  # it takes the remainder
        current, pool = -1, ()
        for position in positions.tolist():
            which = min(position // size, last_pool)
            if which != current:
                end = len(order) if which == last_pool else (which + 1) * size
                current, pool = which, tuple(order[which * size : end].tolist())
            yield (self.epoch, int(order[position]), *stream, pool)

    def __len__(self) -> int:
        return (self.num_samples if self.whole else math.ceil(self.num_samples / self.world_size)) - self.skip


class BatchShard(Sampler):
    """One rank's share of a sequential pass in batches: every world_size-th batch from batch
    `rank`, each holding exactly the indices it holds in one process (index order, as
    EpochSampler without shuffle gives them). Ranks may get one batch more than others, or none."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        starts = range(self.rank * self.batch_size, self.num_samples, self.world_size * self.batch_size)
        return iter([list(range(start, min(start + self.batch_size, self.num_samples))) for start in starts])

    def __len__(self) -> int:
        return len(range(self.rank * self.batch_size, self.num_samples, self.world_size * self.batch_size))


def _init_worker(_: int) -> None:
    cv2.setNumThreads(0)  # one worker, one core: OpenCV's own threads only add contention
    torch.set_num_threads(1)
    size = get_worker_info().dataset.img_size
    steady_malloc(2 * size * size * 3)  # samples (size^2 x 3 bytes) reused, 2x2 mosaic canvases mapped
    ignore_stop_signals()  # a cluster's SIGTERM to every process: the main process finishes its step first


def build_dataloader(
    dataset: DetectionDataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    processes_per_machine: int = 1,
    whole: bool = False,
    mosaic_pool: int = 0,
) -> DataLoader:
    """DataLoader over `dataset` (this rank's share of it, or all of it when `whole`) with an
    EpochSampler (its `mosaic_pool`: see there); call loader.sampler.set_epoch(e) every epoch. The
    CPUs this process may use (its container's quota too) are shared by the machine's processes."""
    cores = max(usable_cpu_count() // processes_per_machine, 1)
    workers = min(workers, cores, batch_size if batch_size > 1 else 0)
    sampler = EpochSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        whole=whole,
        batch_size=batch_size,
        mosaic_pool=mosaic_pool,
    )
    return _data_loader(dataset, workers, pin_memory, batch_size=batch_size, sampler=sampler)


def _data_loader(dataset: DetectionDataset, workers: int, pin_memory: bool, **sampling) -> DataLoader:
    """A DataLoader of our batches (collate) and seeded workers; `sampling`: its sampler arguments."""
    if workers:
        end_workers_at_exit()  # the workers ignore SIGTERM (see utils/stop_signals.py)
    return DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_init_worker,
        **sampling,
    )


def build_train_dataset(
    data: DatasetConfig,
    hyp: dict,
    *,
    img_size: int,
    seed: int,
    single_cls: bool,
    cache: str,
    epochs: int,
    world: World = World(),
    reported: bool = False,
) -> DetectionDataset:
    """The augmenting dataset of the verified train split (mosaic closed for the last
    hyp['close_mosaic'] of `epochs`), its images cached in RAM as `cache` says ('auto', 'ram' or
    'off'). A split without a single labelled box is refused. `reported`: its problem files go to
    the run's data_report.txt."""
    # Global rank 0 alone lists, checks and caches the split; the others receive its scan, which
    # holds whether or not the machines share the dataset's folder.
    scan = world.decided_by_main(
        lambda: scan_split(data.train, data.nc, prefix="train: ", reported=reported, needs_labels=True)
    )
    dataset = DetectionDataset(
        scan,
        img_size,
        hyp,
        augment=True,
        seed=seed,
        single_cls=single_cls,
        mosaic_until_epoch=epochs - int(hyp["close_mosaic"]),
    )
    if cache == "ram":  # every process of the machine holds its own copy
        dataset.cache_images_in_ram(max_share=0.7 / world.local_size)
    elif cache == "auto":  # decoding in the workers takes CPU from training: ~15% on 2 cores (bench_train.py)
        dataset.cache_images_in_ram(max_share=0.1 / world.local_size, quiet=True)
    return dataset


def build_train_loader(
    dataset: DetectionDataset,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    pin_memory: bool,
    world: World = World(),
    whole: bool = False,
) -> DataLoader:
    """The training loader over `dataset`. Under torchrun it yields this rank's
    batch_size / world.size images of each global batch; with `whole` (ranks that are runs of
    their own: --graft) batches of batch_size from all of the split, in this rank's own order.
    Mosaic partners come from pools of the hyp's mosaic_pool images (a run whose hyp predates the
    key: 0, from the whole split as YOLOv5 draws them)."""
    return build_dataloader(
        dataset,
        batch_size if whole else per_process_batch(batch_size, world.size),
        workers,
        shuffle=True,
        seed=seed,
        pin_memory=pin_memory,
        rank=world.rank,
        world_size=world.size,
        processes_per_machine=world.local_size,
        whole=whole,
        mosaic_pool=mosaic_pool_of(dataset.hyp),
    )


def mosaic_pool_of(hyp: dict) -> int:
    """The hyp's mosaic_pool; 0 (YOLOv5's draw from the whole split) for a run whose hyp predates it."""
    return int(hyp.get("mosaic_pool", 0))


def validation_batch_size(train_batch_per_process: int) -> int:
    """The batch train.py validates with (twice each process's training batch), and so val.py's
    default: rectangular batches group images, so the batch decides the mAP."""
    return 2 * train_batch_per_process


def build_val_loader(
    sources: tuple[Path, ...],
    num_classes: int,
    *,
    img_size: int,
    batch_size: int,
    workers: int,
    hyp: dict,
    stride: int,
    single_cls: bool = False,
    prefix: str = "val: ",
    pin_memory: bool = False,
    reported: bool = False,
    rect: bool = True,
    world: World = World(),
) -> DataLoader:
    """The rectangular, non-augmented loader of a verified split (images ordered by aspect ratio,
    so `batch_size` decides each batch's shape and with it the mAP; rect=False: every image
    letterboxed to img_size x img_size, for a model of fixed input shape). `reported`: its problem
    files go to the run's data_report.txt. Under torchrun rank 0 alone scans the split, and the
    others receive its scan."""
    scan = world.decided_by_main(lambda: scan_split(sources, num_classes, prefix=prefix, reported=reported))
    dataset = DetectionDataset(
        scan, img_size, hyp, augment=False, rect=rect, batch_size=batch_size, stride=stride, single_cls=single_cls
    )
    return build_dataloader(dataset, batch_size, workers, shuffle=False, pin_memory=pin_memory)


def val_shard_loader(loader: DataLoader, world: World) -> DataLoader:
    """This rank's share of a validation `loader` (build_val_loader's): every world.size-th of its
    batches from batch world.rank, each exactly as `loader` makes it. Batches are shared out
    whole, never images: a rectangular batch sets its images' letterbox shape, and a batch of
    other images could round differently; evaluate(..., world=world) gathers the results."""
    workers = min(loader.num_workers, max(usable_cpu_count() // world.local_size, 1))
    shard = BatchShard(len(loader.dataset), loader.batch_size, world.rank, world.size)
    return _data_loader(loader.dataset, workers, loader.pin_memory, batch_sampler=shard)
