"""The data path made faster and leaner (issue 29) gives the samples it gave before, bit for bit:
each sample of DetectionDataset against the pipeline as it was written before (kept here as the
oracle: per-image lists, BGR decoding then cvtColor, numpy flips, HSV through split and merge),
over a few hundred (epoch, index) keys with every augmentation switched on often."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from utils.boxes import xywhn_to_xyxy, xyxy_to_xywhn
from utils.data.augment import PAD_VALUE, box_candidates, letterbox, mixup, pixel_augmentations
from utils.data.config import load_dataset_config
from utils.data.dataset import SAMPLE_STREAM, DetectionDataset
from utils.data.labels import scan_labels, verify_image_and_label
from utils.data.listing import label_path_for, list_image_paths
from utils.hyp import load_hyp


# The whole 2s x 2s mosaic canvas and the warp, as they were written before issue 29.
def old_random_perspective(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """One random affine (or perspective) warp of the image and its boxes.

    A negative `border` crops: a mosaic canvas of 2s x 2s with border (-s/2, -s/2) comes out s x s.
    Boxes that become too small, too thin or lose most of their area are dropped.
    """
    out_h, out_w = image.shape[0] + 2 * border[0], image.shape[1] + 2 * border[1]
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -image.shape[1] / 2, -image.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, size=2)
    rotate = np.eye(3)
    angle, gain = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rotate[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=gain)
    shear_m = np.eye(3)
    shear_m[0, 1], shear_m[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear, size=2)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    matrix = move @ shear_m @ rotate @ persp @ centre  # right to left: centre first

    if perspective:
        image = cv2.warpPerspective(image, matrix, dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)
    else:
        image = cv2.warpAffine(image, matrix[:2], dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)

    if len(labels):
        corners = np.ones((len(labels) * 4, 3))
        corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(-1, 2)  # x1y1, x2y2, x1y2, x2y1
        corners = corners @ matrix.T
        corners = corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]
        corners = corners.reshape(-1, 8)
        xs, ys = corners[:, 0::2], corners[:, 1::2]
        boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(labels[:, 1:5] * gain, boxes)
        labels = np.concatenate((labels[keep, :1], boxes[keep]), axis=1).astype(np.float32)
    return image, labels


def old_mosaic_canvas(
    images: list[np.ndarray], labels: list[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Place four images around a random centre of a 2size x 2size grey canvas.

    Each image (long side already `size`) touches the centre with one corner: top-left image
    with its bottom-right corner, and so on. The caller crops with one perspective warp.
    """
    canvas = np.full((size * 2, size * 2, 3), PAD_VALUE, dtype=np.uint8)
    xc, yc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, size=2))
    placed = []
    for k, (image, boxes) in enumerate(zip(images, labels)):
        h, w = image.shape[:2]
        if k == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif k == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, size * 2), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif k == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(size * 2, yc + h)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, size * 2), min(size * 2, yc + h)
            x1b, y1b = 0, 0
        canvas[y1a:y2a, x1a:x2a] = image[y1b : y1b + (y2a - y1a), x1b : x1b + (x2a - x1a)]
        shifted = boxes.copy()
        shifted[:, [1, 3]] += x1a - x1b
        shifted[:, [2, 4]] += y1a - y1b
        placed.append(shifted)
    all_labels = np.concatenate(placed, axis=0)
    all_labels[:, 1:] = all_labels[:, 1:].clip(0, 2 * size)
    return canvas, all_labels


class Oracle:
    """The sample pipeline before issue 29, on plain lists."""

    def __init__(self, files, labels, shapes, img_size, hyp, seed, mosaic_until_epoch, batch_shapes=None, batch=0):
        self.files, self.labels, self.shapes = files, labels, shapes
        self.img_size, self.hyp, self.seed, self.mosaic_until_epoch = img_size, hyp, seed, mosaic_until_epoch
        self.batch_shapes, self.batch_size = batch_shapes, batch
        self.pixel_augment = pixel_augmentations(hyp)

    def load_image(self, index, augment=True):
        image = cv2.cvtColor(cv2.imread(str(self.files[index])), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        ratio = self.img_size / max(h, w)
        new_h, new_w = max(1, round(h * ratio)), max(1, round(w * ratio))
        if (new_h, new_w) != (h, w):
            shrink_for_val = not augment and new_w < w
            image = cv2.resize(
                image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink_for_val else cv2.INTER_LINEAR
            )
        return image

    def pixel_labels(self, index, width, height, pad_x=0, pad_y=0):
        labels = self.labels[index]
        return np.concatenate((labels[:, :1], xywhn_to_xyxy(labels[:, 1:], width, height, pad_x, pad_y)), axis=1)

    def perspective(self, image, labels, rng, border=(0, 0)):
        h = self.hyp
        return old_random_perspective(
            image, labels, rng, h["degrees"], h["translate"], h["scale"], h["shear"], h["perspective"], border
        )

    def mosaic(self, index, rng):
        indices = [index, *rng.integers(0, len(self.files), size=3).tolist()]
        images = [self.load_image(i) for i in indices]
        labels = [self.pixel_labels(i, im.shape[1], im.shape[0]) for i, im in zip(indices, images)]
        canvas, canvas_labels = old_mosaic_canvas(images, labels, self.img_size, rng)
        border = -self.img_size // 2
        return self.perspective(canvas, canvas_labels, rng, border=(border, border))

    @staticmethod
    def hsv(image, rng, hue_gain, sat_gain, value_gain):
        gains = rng.uniform(-1, 1, 3) * (hue_gain, sat_gain, value_gain) + 1
        hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
        x = np.arange(256, dtype=np.float32)
        lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
        lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
        lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
        hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def __getitem__(self, key, augment=True):
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, SAMPLE_STREAM, index))
        hyp = self.hyp
        if augment and rng.random() < hyp["mosaic"] and epoch < self.mosaic_until_epoch:
            image, labels = self.mosaic(index, rng)
            if rng.random() < hyp["mixup"]:
                image2, labels2 = self.mosaic(int(rng.integers(0, len(self.files))), rng)
                image, labels = mixup(image, labels, image2, labels2, rng)
        else:
            image = self.load_image(index, augment)
            h, w = image.shape[:2]
            shape = tuple(self.batch_shapes[index // self.batch_size]) if self.batch_shapes is not None else None
            image, (rx, ry), (px, py) = letterbox(image, shape or (self.img_size,) * 2, scaleup=augment)
            labels = self.pixel_labels(index, w * rx, h * ry, px, py)
            if augment:
                image, labels = self.perspective(image, labels, rng)
        if augment:
            self.pixel_augment.set_random_seed(int(rng.integers(2**31)))
            image = self.pixel_augment(image=image)["image"]
            image = self.hsv(image, rng, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            if rng.random() < hyp["flipud"]:
                image, labels = np.ascontiguousarray(image[::-1]), labels.copy()
                labels[:, [2, 4]] = image.shape[0] - labels[:, [4, 2]]
            if rng.random() < hyp["fliplr"]:
                image, labels = np.ascontiguousarray(image[:, ::-1]), labels.copy()
                labels[:, [1, 3]] = image.shape[1] - labels[:, [3, 1]]
        height, width = image.shape[:2]
        targets = np.concatenate((labels[:, :1], xyxy_to_xywhn(labels[:, 1:], width, height)), axis=1)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), targets.astype(np.float32)


@pytest.fixture(scope="module")
def scan(tiny_dataset):
    data = load_dataset_config(str(tiny_dataset))
    return scan_labels(list_image_paths(data.train)[0], data.nc, cache_path=None)


def oracle_lists(tiny_dataset) -> tuple[list, list, np.ndarray]:
    """The split's files, labels and sizes as the oracle's own lists, verified one by one (not read
    back from the ImageTable under test)."""
    data = load_dataset_config(str(tiny_dataset))
    files = list_image_paths(data.train)[0]
    verified = [verify_image_and_label(f, label_path_for(f), data.nc) for f in files]
    return files, [v.labels for v in verified], np.array([v.shape for v in verified])


def every_augmentation_often() -> dict:
    hyp = load_hyp(None)
    hyp.update(mixup=0.5, flipud=0.5, degrees=10.0, shear=2.0, blur=0.3, median_blur=0.3, to_gray=0.3, clahe=0.3)
    return hyp


def test_training_samples_equal_the_pipeline_before(scan, tiny_dataset, img_size=96):  # 64x128: resized, padded
    hyp = every_augmentation_often()
    dataset = DetectionDataset(scan, img_size, hyp, augment=True, seed=3, mosaic_until_epoch=14)
    oracle = Oracle(*oracle_lists(tiny_dataset), img_size, hyp, 3, 14)
    keys = [(epoch, index) for epoch in range(18) for index in range(len(dataset))]  # 288: the last 4 epochs plain
    for key in keys:
        image, targets, index, _ = dataset[key]
        expected_image, expected_targets = oracle[key]
        assert index == key[1] and torch.equal(image, torch.from_numpy(expected_image)), key
        assert torch.equal(targets[:, 1:], torch.from_numpy(expected_targets)), key


def test_validation_samples_equal_the_pipeline_before(scan, tiny_dataset):
    hyp = load_hyp(None)
    dataset = DetectionDataset(scan, 96, hyp, augment=False, rect=True, batch_size=4)
    files, labels, shapes = oracle_lists(tiny_dataset)
    order = (shapes[:, 0] / shapes[:, 1]).argsort(kind="stable")
    oracle = Oracle(
        [files[i] for i in order], [labels[i] for i in order], shapes[order], 96, hyp, 0, 0, dataset.batch_shapes, 4
    )
    for index in range(len(dataset)):
        image, targets, _, _ = dataset[(0, index)]
        expected_image, expected_targets = oracle.__getitem__((0, index), augment=False)
        assert torch.equal(image, torch.from_numpy(expected_image)) and torch.equal(
            targets[:, 1:], torch.from_numpy(expected_targets)
        ), index
