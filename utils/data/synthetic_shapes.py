"""Procedural shapes dataset in YOLO layout: the framework's embedded default, made on first use.

Each image is a textured, cluttered background with 0-8 anti-aliased shapes, one class per
shape kind, at random size, colour, rotation and style (filled, bordered or hollow). A label is
the tight box of the pixels of its object that stay visible once all later objects are drawn.
Image `index` of split `split_id` depends only on `np.random.default_rng((seed, split_id, index))`,
so equal parameters give byte-identical files.

    python -m utils.data.synthetic_shapes --out datasets/shapes [--num-train N --num-val N --seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "triangle", "rectangle", "star", "hexagon", "cross")
FORMAT_VERSION: int = 1

_SPLITS = (("train", 0), ("val", 1))  # (folder, split_id in the RNG key)
_MARKER = "shapes.json"  # written last: its presence means the dataset is complete
_NUM_OBJECTS_P = (0.03, 0.07, 0.16, 0.19, 0.19, 0.15, 0.10, 0.07, 0.04)  # P(0 .. 8 objects)
_MIN_OBJECT_PX = 12  # smallest object diameter
_MAX_OBJECT_FRACTION = 0.45  # largest object diameter, as a fraction of the shorter image side
_MAX_HIDDEN_FRACTION = 0.4  # of an object's drawn pixels that later objects may cover
_MAX_BOX_IOU = 0.5
_MIN_VISIBLE_PX = 20  # an object with fewer visible pixels (or a side < 3 px) gets no label
_MIN_LUMA_CONTRAST = 40  # 0..255; 95% of an object's pixels must differ this much from what it covers
_SUBPIXEL_BITS = 4  # cv2 fixed point: vertices at 1/16 px
_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)

_BoxXYXY = tuple[int, int, int, int]  # pixel edges: pixel column x spans [x, x + 1)


@dataclass
class _Object:
    cls_id: int
    x0: int  # top-left of `visible` in the image
    y0: int
    visible: np.ndarray  # (h, w) bool, pixels of this object not covered by later objects
    visible_px: int
    drawn_px: int
    box_xyxy: _BoxXYXY  # box of all its drawn pixels


def _mask_box(mask: np.ndarray, x0: int, y0: int) -> _BoxXYXY | None:
    """Tight box in image coordinates of a (h, w) bool mask whose top-left pixel is (x0, y0)."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _box_iou(a: _BoxXYXY, b: _BoxXYXY) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


class _Scene:
    """Objects drawn back to front, with the visible pixels of each."""

    def __init__(self) -> None:
        self.objects: list[_Object] = []

    def try_add(self, cls_id: int, x0: int, y0: int, mask: np.ndarray) -> bool:
        """Add an object on top (mask (h, w) bool at x0, y0) unless it would hide more than
        _MAX_HIDDEN_FRACTION of an earlier object or overlap its box by IoU > _MAX_BOX_IOU."""
        box = _mask_box(mask, x0, y0)
        if box is None:
            return False
        covers = []
        for obj in self.objects:
            if _box_iou(box, obj.box_xyxy) > _MAX_BOX_IOU:
                return False
            ix0, iy0 = max(x0, obj.x0), max(y0, obj.y0)
            ix1 = min(x0 + mask.shape[1], obj.x0 + obj.visible.shape[1])
            iy1 = min(y0 + mask.shape[0], obj.y0 + obj.visible.shape[0])
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            old = (slice(iy0 - obj.y0, iy1 - obj.y0), slice(ix0 - obj.x0, ix1 - obj.x0))
            covered = obj.visible[old] & mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            hidden_px = int(covered.sum())
            if obj.visible_px - hidden_px < (1 - _MAX_HIDDEN_FRACTION) * obj.drawn_px:
                return False
            covers.append((obj, old, covered, hidden_px))
        for obj, old, covered, hidden_px in covers:
            obj.visible[old] &= ~covered
            obj.visible_px -= hidden_px
        drawn_px = int(mask.sum())
        self.objects.append(_Object(cls_id, x0, y0, mask.copy(), drawn_px, drawn_px, box))
        return True

    def labels(self) -> list[tuple[int, _BoxXYXY]]:
        """(cls_id, tight xyxy box of the visible pixels) per object that is still visible enough."""
        labels = []
        for obj in self.objects:
            box = _mask_box(obj.visible, obj.x0, obj.y0)
            if obj.visible_px >= _MIN_VISIBLE_PX and min(box[2] - box[0], box[3] - box[1]) >= 3:
                labels.append((obj.cls_id, box))
        return labels


def _unit_shape(cls_id: int, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a shape of class `cls_id`, centred at 0, longest half-extent about 1."""
    name = CLASS_NAMES[cls_id]
    if name == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    elif name == "triangle":  # roughly equilateral, corners jittered
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12, 12, 3))
    elif name == "hexagon":
        angles = np.arange(6) * np.pi / 3
    elif name == "rectangle":
        aspect = rng.uniform(0.3, 1.0)
        return np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], np.float64)
    elif name == "star":  # 5 points, alternating outer radius 1 and a random inner radius
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    elif name == "cross":  # plus sign with arm half-width a: one arm end, turned 4 times by 90 degrees
        a = rng.uniform(0.25, 0.38)
        arm_end = np.array([[1, -a], [1, a], [a, a]])
        turn = np.array([[0, -1], [1, 0]])
        return np.concatenate([arm_end @ np.linalg.matrix_power(turn, k).T for k in range(4)])
    else:
        raise ValueError(f"no shape for class {name!r}")
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def _rasterize(
    polygon_xy: np.ndarray, line_px: int, filled: bool, width: int, height: int
) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
    """Anti-aliased coverage of a polygon (N, 2) given in image px: (x0, y0, inside, outline),
    each (h, w) uint8 0..255 over the region at (x0, y0); `inside` is None unless `filled`,
    `outline` (`line_px` wide) is None when line_px is 0."""
    pad = line_px // 2 + 2
    x0, y0 = np.maximum(np.floor(polygon_xy.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(polygon_xy.max(0)).astype(int) + pad + 1, (width, height))
    points = [np.round((polygon_xy - (x0, y0)) * (1 << _SUBPIXEL_BITS)).astype(np.int32)]
    inside = outline = None
    if filled:
        inside = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(inside, points, 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    if line_px:
        outline = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.polylines(outline, points, True, 255, line_px, cv2.LINE_AA, _SUBPIXEL_BITS)
    return int(x0), int(y0), inside, outline


def _paint(
    image: np.ndarray,
    x0: int,
    y0: int,
    inside: np.ndarray | None,
    outline: np.ndarray | None,
    coverage: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Blend an object into `image` (in place) in colours whose luminance stands out from the
    pixels it covers (`coverage`: inside and outline together); a bordered object gets a darker
    or lighter shade of its fill as border."""
    roi = image[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]]
    covered_luma = roi[coverage >= 128].astype(np.float32) @ _LUMA_BGR  # (P,)
    colours = np.concatenate([rng.integers(0, 256, (24, 3)), [[0, 0, 0], [255, 255, 255]]]).astype(np.float32)
    shades = np.where((colours @ _LUMA_BGR)[:, None] > 128, colours * 0.4, colours + (255 - colours) * 0.6)

    def stand_out(candidates: np.ndarray) -> np.ndarray:  # (K, 3) -> (K,) fraction of pixels in contrast
        return (np.abs((candidates @ _LUMA_BGR)[:, None] - covered_luma) >= _MIN_LUMA_CONTRAST).mean(1)

    score = stand_out(colours)
    if inside is not None and outline is not None:
        score = np.minimum(score, stand_out(shades))
    best = int(np.argmax(score >= 0.95)) if (score >= 0.95).any() else int(np.argmax(score))
    line_colour = colours[best] if inside is None else shades[best]
    for cov, colour in ((inside, colours[best]), (outline, line_colour)):
        if cov is not None:
            alpha = cov[..., None].astype(np.float32) / 255
            roi[:] = (roi * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)


def _draw_objects(image: np.ndarray, rng: np.random.Generator) -> list[tuple[int, _BoxXYXY]]:
    """Draw 0-8 objects into `image` (in place) -> (cls_id, xyxy box of its visible pixels) each."""
    height, width = image.shape[:2]
    num_objects = int(rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P))
    log_diameters = np.log([_MIN_OBJECT_PX, _MAX_OBJECT_FRACTION * min(width, height)])
    scene = _Scene()
    for _ in range(8 * num_objects):  # placement attempts; rejected ones are retried elsewhere
        if len(scene.objects) == num_objects:
            break
        cls_id = int(rng.integers(len(CLASS_NAMES)))
        diameter = np.exp(rng.uniform(*log_diameters))  # log-uniform: small objects are common
        style = rng.choice(3, p=(0.55, 0.25, 0.2))  # filled, bordered, hollow outline
        line_px = 0 if style == 0 else max(2, round(diameter * rng.uniform(0.06, 0.12)))
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shape = _unit_shape(cls_id, rng) @ rotation.T * (diameter / 2)
        low, high = shape.min(0) - line_px / 2 - 1, shape.max(0) + line_px / 2 + 1
        centre = rng.uniform(-low, np.array([width, height]) - high)  # whole object inside the image
        x0, y0, inside, outline = _rasterize(shape + centre, line_px, style != 2, width, height)
        coverage = np.max([layer for layer in (inside, outline) if layer is not None], axis=0)
        if scene.try_add(cls_id, x0, y0, coverage >= 128):
            _paint(image, x0, y0, inside, outline, coverage, rng)
    return scene.labels()


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: colour gradient, smooth colour blobs, sometimes faint stripes,
    and faint lines and scribbles (clutter that is never a closed shape)."""
    # gradient and colour blobs on a coarse grid, upsampled smoothly: one cheap full-size op
    grid_h, grid_w = rng.integers(3, 8, 2)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.linspace(0, 1, grid_w) + np.sin(angle) * np.linspace(0, 1, grid_h)[:, None]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    colour0, colour1 = rng.uniform(20, 235, (2, 3))
    grid = colour0 + ramp[..., None] * (colour1 - colour0)
    grid += rng.normal(0, rng.uniform(6, 25), (grid_h, grid_w, 3))
    image = cv2.resize(np.clip(grid, 0, 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.3:  # faint stripes, a texture
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        xs, ys = np.arange(width, dtype=np.float32)[None], np.arange(height, dtype=np.float32)[:, None]
        phase = np.cos(angle) * xs + np.sin(angle) * ys
        stripes = (rng.uniform(3, 10) * np.sin(phase * np.float32(2 * np.pi / period))).astype(np.int16)
        image = np.clip(image + stripes[..., None], 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 9)):  # straight lines (bend 0) and gentle curves that never close
        num_steps, bend = int(rng.integers(1, 10)), rng.choice([0.0, 0.3])
        headings = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, bend, num_steps))
        steps = rng.uniform(10, 40) * np.stack([np.cos(headings), np.sin(headings)], 1)
        start = rng.uniform((0, 0), (width, height))
        points = np.round((start + np.cumsum(np.vstack([[0, 0], steps]), 0)) * (1 << _SUBPIXEL_BITS))
        colour = np.clip(image[int(start[1]), int(start[0])] + rng.uniform(-25, 25, 3), 0, 255)
        cv2.polylines(
            image,
            [points.astype(np.int32)],
            False,
            colour.tolist(),
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
            _SUBPIXEL_BITS,
        )
    return image


def _render_image(
    rng: np.random.Generator, image_size: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[int, _BoxXYXY]]]:
    """One BGR uint8 image with its side lengths drawn from `image_size` (min, max), and its
    labels as (cls_id, xyxy box in pixel edges)."""
    width, height = (int(side) for side in rng.integers(image_size[0], image_size[1] + 1, 2))
    image = _background(rng, width, height)
    labels = _draw_objects(image, rng)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.1))
    amplitude = int(rng.integers(2, 8))  # sensor-like noise over everything, objects included
    noise = rng.integers(0, 2 * amplitude + 1, image.shape, dtype=np.uint8)
    return cv2.subtract(cv2.add(image, noise), amplitude), labels  # saturating: image + noise - amplitude


def _params(num_train: int, num_val: int, seed: int, image_size: tuple[int, int]) -> dict:
    """The marker's content, as it reads back from JSON; checks the parameters."""
    if num_train < 0 or num_val < 0 or seed < 0:
        raise ValueError(f"num_train, num_val and seed must be >= 0, got {num_train}, {num_val}, {seed}")
    if not 64 <= image_size[0] <= image_size[1]:
        raise ValueError(f"image_size must be (min, max) side lengths, 64 <= min <= max, got {image_size}")
    return {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "class_names": list(CLASS_NAMES),
    }


def generate_shapes_dataset(
    root: Path, num_train: int = 512, num_val: int = 128, seed: int = 0, image_size: tuple[int, int] = (256, 416)
) -> None:
    """Write the dataset into `root` (must not exist yet): images/{train,val}/000000.jpg,
    labels/{train,val}/000000.txt (`cls cx cy w h`, normalised) and shapes.json.
    `image_size` is the (min, max) range from which each image's width and height are drawn."""
    root = Path(root)
    params = _params(num_train, num_val, seed, image_size)
    if root.exists():
        raise FileExistsError(f"{root} already exists; the shapes dataset is only written to a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    try:
        for split, split_id in _SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for index in range(params[f"num_{split}"]):
                image, labels = _render_image(np.random.default_rng((seed, split_id, index)), image_size)
                height, width = image.shape[:2]
                _, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
                (tmp / "images" / split / f"{index:06d}.jpg").write_bytes(jpeg.tobytes())
                lines = [
                    f"{cls_id} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                    f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}\n"
                    for cls_id, (x0, y0, x1, y1) in labels
                ]
                (tmp / "labels" / split / f"{index:06d}.txt").write_text("".join(lines))
        (tmp / _MARKER).write_text(json.dumps(params, indent=2) + "\n")
        appeared = f"{root} appeared while the shapes dataset was being generated"
        if root.exists():  # checked again: os.rename would replace an empty folder made meanwhile
            raise FileExistsError(appeared)
        try:
            os.rename(tmp, root)
        except OSError as error:  # fails when another process renamed its copy first
            if not root.exists():
                raise
            raise FileExistsError(appeared) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_shapes_dataset(
    root: Path, num_train: int = 512, num_val: int = 128, seed: int = 0, image_size: tuple[int, int] = (256, 416)
) -> bool:
    """Generate into `root` unless a complete dataset with the same parameters is already there.
    Returns True when it generated. Raises FileExistsError when `root` holds anything else."""
    root = Path(root)
    params = _params(num_train, num_val, seed, image_size)
    if not root.exists():
        try:
            generate_shapes_dataset(root, num_train, num_val, seed, image_size)
            return True
        except FileExistsError:
            pass  # lost a race with another process: use its result if it is the same dataset
    try:
        found = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        found = None
    if found != params:
        raise FileExistsError(
            f"{root} exists but is not a shapes dataset made with these parameters ({params}); "
            f"its {_MARKER}: {found}. Remove it or choose another folder; it is never overwritten."
        )
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes detection dataset.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (created)")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(256, 416),
        metavar=("MIN", "MAX"),
        help="range of image widths and heights in px",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if ensure_shapes_dataset(args.out, args.num_train, args.num_val, args.seed, tuple(args.image_size)):
        seconds = time.perf_counter() - start
        print(f"wrote {args.num_train} + {args.num_val} images to {args.out} in {seconds:.1f} s")
    else:
        print(f"{args.out} already holds this dataset")


if __name__ == "__main__":
    main()
