"""Dataset and loader: reproducible whatever the workers, epoch-keyed order, exact val geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train
from tests.conftest import tiny_train_args
from utils.boxes import letterbox_to_original, xywhn_to_xyxy
from utils.data.config import load_dataset_config
from utils.data.dataset import DetectionDataset
from utils.data.decode import read_image_rgb
from utils.data.labels import scan_labels
from utils.data.listing import list_image_paths
from utils.data.loader import BatchShard, EpochSampler, build_dataloader
from utils.hyp import load_hyp


@pytest.fixture(scope="module")
def train_scan(tiny_dataset):
    data = load_dataset_config(tiny_dataset)
    return scan_labels(list_image_paths(data.train)[0], data.nc, cache_path=None)


def all_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("pool", [0, 4])
def test_batches_do_not_depend_on_worker_count(train_scan, pool):
    hyp = {**load_hyp("scratch-high.yaml"), "blur": 0.5, "to_gray": 0.5}  # exercise every random branch
    dataset = DetectionDataset(train_scan, 96, hyp, augment=True, seed=3)
    reference = all_batches(build_dataloader(dataset, 4, workers=0, shuffle=True, seed=3, mosaic_pool=pool), epoch=2)
    with_workers = all_batches(build_dataloader(dataset, 4, workers=2, shuffle=True, seed=3, mosaic_pool=pool), epoch=2)
    for a, b in zip(reference, with_workers):
        assert (
            torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and torch.equal(a.indices, b.indices)
        )
    other_epoch = all_batches(build_dataloader(dataset, 4, workers=0, shuffle=True, seed=3), epoch=3)
    assert not torch.equal(reference[0].images, other_epoch[0].images)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, shuffle=True, seed=1), EpochSampler(50, shuffle=True, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(i for _, i in a) == list(range(50))
    b.set_epoch(5)
    assert [i for _, i in a] != [i for _, i in b]
    ranks = [EpochSampler(50, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(4)
    assert sorted(i for r in ranks for _, i in r) == list(range(50))


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_batch_shards_share_out_one_process_batches_whole(ranks):
    """Validation under torchrun: rank r runs batches r, r + N, ... of the sequential pass in
    batches of 4 (10 images: 3 batches; 5 ranks leave two without any), each exactly as one
    process's loader makes it."""
    one_process = [[i for _, i in keys] for keys in torch.utils.data.BatchSampler(EpochSampler(10, False), 4, False)]
    shards = [list(BatchShard(10, 4, rank, ranks)) for rank in range(ranks)]
    assert [len(BatchShard(10, 4, rank, ranks)) for rank in range(ranks)] == [len(s) for s in shards]
    assert [shards[b % ranks][b // ranks] for b in range(len(one_process))] == one_process
    assert sum(len(s) for s in shards) == len(one_process) == 3


@pytest.mark.parametrize("world, per_rank, pool", [(1, 8, 4), (2, 4, 4), (3, 4, 2), (2, 8, 8), (4, 2, 4)])
def test_mosaic_pools_partition_the_order_and_are_the_same_for_any_number_of_processes(world, per_rank, pool):
    """Keys carry their mosaic pool: consecutive runs of the epoch's order (the last one takes the
    remainder), the same whatever the number of processes sharing a global batch; each global batch
    holds the same images as one process's, each rank a contiguous part of it, so a pool lies in
    one rank's batch when its size divides the rank's batch (not so for 4 ranks of 2: then a worker
    decodes the pool's other images itself)."""
    one = EpochSampler(50, shuffle=True, seed=1, batch_size=per_rank * world, mosaic_pool=pool)
    one.set_epoch(3)
    keys = list(one)
    order = [i for _, i, _ in keys]
    assert sorted(order) == list(range(50)) and [i for _, i in EpochSampler(50, True, seed=1, batch_size=8)] != []
    pools = [keys[p][2] for p in range(0, 50, pool)][: 50 // pool]
    assert [i for p in pools for i in p] == order and all(len(p) == pool for p in pools[:-1])
    assert pool <= len(pools[-1]) < 2 * pool
    assert all(i in p for _, i, p in keys)
    ranks = [
        EpochSampler(50, shuffle=True, seed=1, rank=r, world_size=world, batch_size=per_rank, mosaic_pool=pool)
        for r in range(world)
    ]
    for r in ranks:
        r.set_epoch(3)
    shares = [[list(b) for b in torch.utils.data.BatchSampler(r, per_rank, False)] for r in ranks]
    pooled = {i: p for _, i, p in keys}
    for step, global_batch in enumerate(torch.utils.data.BatchSampler(keys, per_rank * world, False)):
        together = [key for rank in shares for key in rank[step]]  # ranks pad their last batch by wrapping
        assert {i for _, i, _ in global_batch} <= {i for _, i, _ in together}
        assert all(p == pooled[i] for _, i, p in together)
        if per_rank % pool == 0 and len(global_batch) == per_rank * world:
            for rank in shares:
                held = {i for _, i, _ in rank[step]}
                assert all(set(p) <= held for _, _, p in rank[step] if p != pools[-1])  # the last: remainder


def test_a_batch_decodes_each_of_its_images_once_and_takes_partners_from_the_pools(train_scan, monkeypatch):
    """With mosaic pools, a batch's mosaics are made of the images of its own pools, each decoded
    once (without pools: partners from the whole split, 4 decodes a mosaic sample); the images it
    hands out are left unchanged."""
    dataset = DetectionDataset(train_scan, 96, load_hyp("scratch-low.yaml"), augment=True, seed=0)
    decoded, read = [], dataset._read_resized

    def counting(index):
        decoded.append(index)
        image = read(index)
        image.flags.writeable = False  # an augmentation writing into a shared image fails here
        return image

    monkeypatch.setattr(dataset, "_read_resized", counting)
    loader = build_dataloader(dataset, 8, workers=0, shuffle=True, seed=0, mosaic_pool=4)
    loader.sampler.set_epoch(0)
    batches = list(loader.batch_sampler)
    for keys in batches:
        decoded.clear()
        dataset.__getitems__(keys)
        assert sorted(decoded) == sorted({i for _, _, pool in keys for i in pool})
    pool = tuple(range(4, 20))
    for seed in range(50):  # three distinct other images of the pool, as YOLOv5's draw almost always gives
        partners = dataset._partners(7, 3, np.random.default_rng(seed), pool)
        assert len(set(partners)) == 3 and 7 not in partners and set(partners) <= set(pool)
    keys = [(0, i) for i in range(8)]
    decoded.clear()
    dataset.__getitems__(keys)
    assert len(decoded) == 4 * len(keys) and set(decoded) - set(range(8))  # YOLOv5's draw: 4 decodes a mosaic
    assert dataset.batch_images is None  # nothing held between batches


def test_ranks_that_are_runs_of_their_own_each_take_the_whole_split():
    """--graft: every rank's epoch is all of the split, in an order and with augmentation keys of
    its own; a resume inside the epoch skips this rank's first keys."""
    ranks = [EpochSampler(50, shuffle=True, seed=1, rank=r, world_size=2, whole=True) for r in range(2)]
    for r in ranks:
        r.set_epoch(4)
    keys = [list(r) for r in ranks]
    assert all(len(r) == 50 and sorted(i for _, i, _ in k) == list(range(50)) for r, k in zip(ranks, keys))
    assert [i for _, i, _ in keys[0]] != [i for _, i, _ in keys[1]]
    assert {k[2] for k in keys[0]} == {1} and {k[2] for k in keys[1]} == {2}
    ranks[1].set_epoch(4, skip=10)
    assert list(ranks[1]) == keys[1][10:] and len(ranks[1]) == 40


def test_training_samples_are_well_formed(train_scan):
    dataset = DetectionDataset(train_scan, 96, load_hyp("scratch-low.yaml"), augment=True, seed=0)
    for index in range(len(dataset)):
        image, targets, _, _ = dataset[(0, index)]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        if len(targets):
            assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
            assert (targets[:, 4:] > 0).all() and (targets[:, 1] < 6).all()


def test_validation_letterbox_maps_back_to_the_original_boxes(train_scan):
    """Without augmentation, a sample's targets are its labels moved by the letterbox, exactly."""
    dataset = DetectionDataset(train_scan, 128, load_hyp("scratch-low.yaml"), augment=False, rect=True, batch_size=4)
    for index in range(len(dataset)):
        image, targets, _, (scale_x, scale_y, pad_x, pad_y) = dataset[index]
        h, w = image.shape[1:]
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) <= 128 + 32
        boxes = torch.from_numpy(xywhn_to_xyxy(targets[:, 2:].numpy(), w, h)).double()
        restored = letterbox_to_original(boxes, tuple(dataset.shapes[index]), (scale_x, scale_y), (pad_x, pad_y))
        original, classes = dataset.original_boxes_xyxy(index)
        np.testing.assert_allclose(restored.numpy(), original, atol=1e-3)
        assert classes.tolist() == targets[:, 1].long().tolist()


def test_rect_batches_share_one_shape(train_scan):
    dataset = DetectionDataset(train_scan, 128, load_hyp("scratch-low.yaml"), augment=False, rect=True, batch_size=4)
    loader = build_dataloader(dataset, 4, workers=0, shuffle=False)
    aspect = [h / w for h, w in dataset.shapes]
    assert aspect == sorted(aspect)
    for number, batch in enumerate(loader):
        assert tuple(batch.images.shape[2:]) == tuple(dataset.batch_shapes[number])
        # The batch shape fits every image of the batch at img_size on its long side.
        for h, w in dataset.shapes[number * 4 : (number + 1) * 4]:
            scale = 128 / max(h, w)
            assert round(h * scale) <= batch.images.shape[2] and round(w * scale) <= batch.images.shape[3]


def test_ram_cache_gives_the_same_samples(train_scan):
    hyp = load_hyp("scratch-low.yaml")
    from_disk = DetectionDataset(train_scan, 96, hyp, augment=True, seed=5)
    cached = DetectionDataset(train_scan, 96, hyp, augment=True, seed=5)
    assert cached.cache_images_in_ram()
    for index in range(4):
        a, b = from_disk[(1, index)], cached[(1, index)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_close_mosaic_trains_the_last_epochs_on_single_images(train_scan):
    """From mosaic_until_epoch on, a sample is its own image with exactly its own boxes."""
    still = {"degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0, "perspective": 0.0, "fliplr": 0.0}
    hyp = {**load_hyp("scratch-low.yaml"), **still, "mosaic": 1.0, "close_mosaic": 2}
    dataset = DetectionDataset(train_scan, 96, hyp, augment=True, seed=0, mosaic_until_epoch=3)
    single = DetectionDataset(train_scan, 96, {**hyp, "mosaic": 0.0}, augment=True, seed=0)
    for index in range(len(dataset)):
        _, closed_targets, _, _ = dataset[(3, index)]
        _, single_targets, _, _ = single[(3, index)]
        assert torch.equal(closed_targets, single_targets)
    mosaic_counts = [len(dataset[(2, i)][1]) for i in range(len(dataset))]
    own_counts = [len(lb) for lb in dataset.labels]
    assert sum(mosaic_counts) > sum(own_counts)  # before: four images per sample


def exif_rotated_tiff(path: Path, size_hw: tuple[int, int] = (40, 64)) -> Path:
    """A TIFF stored landscape with EXIF orientation 6 (shown portrait): OpenCV 5's imread fails on it."""
    pixels = np.zeros((*size_hw, 3), np.uint8)
    pixels[:, : size_hw[1] // 2] = (200, 30, 30)  # the left half red, to check the rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_an_image_opencv_cannot_decode_is_read_by_pillow_as_the_scan_saw_it(tmp_path):
    path = exif_rotated_tiff(tmp_path / "rotated.tif")
    assert cv2.imread(str(path)) is None  # the decoder difference the fallback exists for
    image = read_image_rgb(path)
    assert image.shape == (64, 40, 3)  # rotated by EXIF, as the label scan measures it
    assert (image[0, 0] == (200, 30, 30)).all() and (image[-1, 0] == 0).all()  # the red half is now on top
    assert read_image_rgb(tmp_path / "absent.jpg") is None


def test_images_the_scan_accepted_but_no_decoder_reads_are_skipped_and_counted(tiny_dataset, tmp_path):
    """Cached in RAM, an image that cannot be decoded (damaged after the scan) is left out and
    counted as corrupt in the scan's summary and report, like those the scan rejects."""
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"])
    root = tmp_path / "copy"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("*.cache", "*.json"))
    files = list_image_paths([root / "images" / "train"])[0]
    scan = scan_labels(files, 6, cache_path=None)
    Path(files[3]).write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)  # damaged after the scan
    found = scan.num_found + scan.num_empty
    dataset = DetectionDataset(scan, 64, load_hyp("scratch-low.yaml"), augment=True)
    assert dataset.cache_images_in_ram()
    assert len(dataset) == len(files) - 1 and files[3] not in dataset.image_files
    assert scan.num_corrupt == 1 and scan.num_found + scan.num_empty == found - 1
    assert scan.messages[-1][0] == "undecodable image" and str(files[3]) in scan.messages[-1][1]
    assert "1 undecodable image" in scan.summary()
    for index in range(len(dataset)):  # every sample is of an image that remains
        dataset[(0, index)]


def test_training_reads_exif_tiffs_and_skips_truncated_bmps(tiny_dataset, tmp_path):
    """Both pass PIL's verify(); OpenCV decodes neither. The TIFF is decoded by Pillow and trained
    on; the truncated BMP is found by the scan (it decodes BMPs and TIFFs in full) and skipped."""
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"])
    root = tmp_path / "mixed"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("*.cache", "*.json"))
    exif_rotated_tiff(root / "images" / "train" / "rotated.tif")
    (root / "labels" / "train" / "rotated.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    bmp = root / "images" / "train" / "cut.bmp"
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(bmp)
    bmp.write_bytes(bmp.read_bytes()[:3000])
    (root / "labels" / "train" / "cut.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    data = tmp_path / "mixed.yaml"
    data.write_text(yaml.safe_dump({**yaml.safe_load(tiny_dataset.read_text()), "path": str(root)}))
    scan = scan_labels(list_image_paths([root / "images" / "train"])[0], 6, cache_path=None)
    assert scan.num_corrupt == 1 and root / "images" / "train" / "rotated.tif" in scan.image_files
    assert any("cut.bmp" in message for _, message in scan.messages)
    assert train.main(tiny_train_args(data, tmp_path / "runs", "--epochs", "1")) == 0
