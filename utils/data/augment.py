"""Training augmentation as YOLOv5 does it: (image, labels) -> (image, labels).

Images are HxWx3 uint8 arrays; labels are (N, 5) float32 arrays [class, x1, y1, x2, y2] in
pixels. Every random draw comes from the numpy Generator passed in, so a sample's
augmentation is fixed by the generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

PAD_VALUE = 114  # grey fill for letterbox borders and warps


def letterbox(
    image: np.ndarray, shape_hw: tuple[int, int], scaleup: bool = True, auto: bool = False, stride: int = 32
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to `shape_hw` (or, with auto, to the next stride multiple).

    Returns the image, the scale applied per axis (x, y) and the left/top padding in pixels.
    """
    h, w = image.shape[:2]
    ratio = min(shape_hw[0] / h, shape_hw[1] / w)
    if not scaleup:
        ratio = min(ratio, 1.0)  # only shrink: upscaling does not help validation mAP
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))  # a 1xN image keeps its one pixel row
    pad_w, pad_h = shape_hw[1] - new_w, shape_hw[0] - new_h
    if auto:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, left = pad_h // 2, pad_w // 2
    image = cv2.copyMakeBorder(image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, (new_w / w, new_h / h), (left, top)


def random_perspective(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, **warp_options: float | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One random affine (or perspective) warp of the image and its boxes (random_warp's options).

    A negative `border` crops: a mosaic canvas of 2s x 2s with border (-s/2, -s/2) comes out s x s.
    Boxes that become too small, too thin or lose most of their area are dropped.
    """
    return random_warp(rng, image.shape[:2], **warp_options).apply(image, labels)


@dataclass(frozen=True)
class Warp:
    """One drawn warp: its 3x3 matrix (input pixels -> output pixels), scale gain and output (height, width)."""

    matrix: np.ndarray
    gain: float
    out_hw: tuple[int, int]

    @property
    def projective(self) -> bool:
        return bool(self.matrix[2, 0] or self.matrix[2, 1])

    def source_region(self, in_hw: tuple[int, int], margin: int = 4) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the part of an in_hw input that the warp reads (every interpolation tap
        with `margin` pixels to spare); the whole input for a perspective warp."""
        if self.projective:
            return 0, 0, in_hw[1], in_hw[0]
        (out_h, out_w), inverse = self.out_hw, np.linalg.inv(self.matrix)
        corners = inverse[:2, :2] @ np.array([[0, out_w - 1, 0, out_w - 1], [0, 0, out_h - 1, out_h - 1]])
        corners += inverse[:2, 2:]
        (x0, y0), (x1, y1) = np.floor(corners.min(1)) - margin, np.floor(corners.max(1)) + margin + 1
        return int(max(x0, 0)), int(max(y0, 0)), int(min(max(x1, 0), in_hw[1])), int(min(max(y1, 0), in_hw[0]))

    def apply(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The warped image, and the labels' boxes warped (those left too small dropped)."""
        (out_h, out_w), matrix = self.out_hw, self.matrix
        if self.projective:
            image = cv2.warpPerspective(image, matrix, dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        else:
            image = cv2.warpAffine(image, matrix[:2], dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        if len(labels):
            corners = np.ones((len(labels) * 4, 3))
            corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(-1, 2)  # x1y1, x2y2, x1y2, x2y1
            corners = corners @ matrix.T
            corners = corners[:, :2] / corners[:, 2:3] if self.projective else corners[:, :2]
            corners = corners.reshape(-1, 8)
            xs, ys = corners[:, 0::2], corners[:, 1::2]
            boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
            keep = box_candidates(labels[:, 1:5] * self.gain, boxes)
            labels = np.concatenate((labels[keep, :1], boxes[keep]), axis=1).astype(np.float32)
        return image, labels


def random_warp(
    rng: np.random.Generator,
    in_hw: tuple[int, int],
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> Warp:
    """Draw the warp random_perspective applies to an in_hw image."""
    out_h, out_w = in_hw[0] + 2 * border[0], in_hw[1] + 2 * border[1]
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
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
    return Warp(move @ shear_m @ rotate @ persp @ centre, gain, (out_h, out_w))  # right to left: centre first


def box_candidates(
    before: np.ndarray, after: np.ndarray, min_size: float = 2.0, max_aspect: float = 100.0, min_area_ratio: float = 0.1
) -> np.ndarray:
    """Boolean mask of (N, 4) xyxy boxes worth keeping after a warp (before: scaled originals)."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    return (w2 > min_size) & (h2 > min_size) & (w2 * h2 / (w1 * h1 + 1e-16) > min_area_ratio) & (aspect < max_aspect)


def mosaic(
    images: list[np.ndarray], labels: list[np.ndarray], size: int, rng: np.random.Generator, **warp_options: float
) -> tuple[np.ndarray, np.ndarray]:
    """Four images (long side already `size`) around a random centre of a 2size x 2size grey
    canvas, cut to size x size by one random warp (random_perspective's `warp_options`).

    Each image touches the centre with one corner: top-left image with its bottom-right corner, and
    so on. Only the part of the canvas the warp reads is drawn (a third of it on average at the
    default scale): the same pixels for a third of the work.
    """
    canvas_hw = (2 * size, 2 * size)
    xc, yc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, size=2))
    warp = random_warp(rng, canvas_hw, border=(-size // 2, -size // 2), **warp_options)
    x0, y0, x1, y1 = warp.source_region(canvas_hw)
    canvas = np.empty((*canvas_hw, 3), np.uint8)  # outside the region: never read
    canvas[y0:y1, x0:x1] = PAD_VALUE
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
        # Canvas pixel (y, x) of the placement is image pixel (y - y1a + y1b, x - x1a + x1b).
        cx1, cy1, cx2, cy2 = max(x1a, x0), max(y1a, y0), min(x2a, x1), min(y2a, y1)
        if cx1 < cx2 and cy1 < cy2:
            dx, dy = x1b - x1a, y1b - y1a
            canvas[cy1:cy2, cx1:cx2] = image[cy1 + dy : cy2 + dy, cx1 + dx : cx2 + dx]
        shifted = boxes.copy()
        shifted[:, [1, 3]] += x1a - x1b
        shifted[:, [2, 4]] += y1a - y1b
        placed.append(shifted)
    all_labels = np.concatenate(placed, axis=0)
    all_labels[:, 1:] = all_labels[:, 1:].clip(0, 2 * size)
    return warp.apply(canvas, all_labels)


def mixup(
    image1: np.ndarray, labels1: np.ndarray, image2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) weight and keep both label sets."""
    weight = rng.beta(32.0, 32.0)
    image = (image1.astype(np.float32) * weight + image2.astype(np.float32) * (1 - weight)).astype(np.uint8)
    return image, np.concatenate((labels1, labels2), axis=0)


def augment_hsv(
    image_rgb: np.ndarray, rng: np.random.Generator, hue_gain: float, sat_gain: float, value_gain: float
) -> np.ndarray:
    """Random hue, saturation and value jitter through lookup tables."""
    if not (hue_gain or sat_gain or value_gain):
        return image_rgb
    gains = rng.uniform(-1, 1, 3) * (hue_gain, sat_gain, value_gain) + 1
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    lut = np.stack((lut_hue, lut_sat, lut_val), axis=1)[None]  # (1, 256, 3): one table per channel
    return cv2.cvtColor(cv2.LUT(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV), lut), cv2.COLOR_HSV2RGB)


def flip_left_right(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror horizontally; labels are xyxy pixels."""
    width = image.shape[1]
    labels = labels.copy()
    labels[:, [1, 3]] = width - labels[:, [3, 1]]
    return cv2.flip(image, 1), labels  # ~10x faster than copying numpy's reversed view


def flip_up_down(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror vertically; labels are xyxy pixels."""
    height = image.shape[0]
    labels = labels.copy()
    labels[:, [2, 4]] = height - labels[:, [4, 2]]
    return cv2.flip(image, 0), labels


def pixel_augmentations(hyp: dict) -> A.Compose:
    """Albumentations' photometric transforms at YOLOv5's small probabilities (hyp keys blur, ...)."""
    return A.Compose(
        [
            A.Blur(p=hyp["blur"]),
            A.MedianBlur(p=hyp["median_blur"]),
            A.ToGray(p=hyp["to_gray"]),
            A.CLAHE(p=hyp["clahe"]),
        ]
    )
