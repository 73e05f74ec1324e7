"""A COCO-shaped dataset on disk, generated once, for measuring the data path at COCO's scale.

COCO train2017's shape, not its content: 118,287 train and 5,000 val JPEGs (quality 90) of COCO's
sizes (most 640x480 or 480x640, the rest with a long side of 640), 80 classes with a long-tailed
frequency (the first, like COCO's person, in about 30% of boxes), a long-tailed number of boxes
per image (mean about 7.3, a tail past 50; about 1% of images without any) and COCO's mix of box
sizes by area (41% small < 32^2 px, 34% medium, 24% large > 96^2 px). The content is textured,
not flat colour: a smooth colour field under fine noise, and each object a patch of its own
texture, so a decoder and the augmentations have real work (the files average about 150 KB,
as COCO's do).

Image `index` of a split depends only on (seed, split, index), so a partial folder is completed
by a second call; `coco_like.json`, written last, marks a finished dataset, which is reused.

    python benchmarks/coco_like.py --out /data/coco_like [--images N]   # N train images (val: N/24)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.resources import usable_cpu_count  # noqa: E402

COCO_TRAIN, COCO_VAL = 118_287, 5_000
NUM_CLASSES = 80
FORMAT_VERSION = 1
MARKER = "coco_like.json"
SPLITS = (("train2017", 0), ("val2017", 1))
JPEG_QUALITY = 90
NOISE_TILES = 8  # per process: full-size noise textures, reused shifted and flipped
# (height, width) and share: COCO's two common shapes; the rest get a random short side
SHAPES = (((480, 640), 0.52), ((640, 480), 0.22))
SIZE_CLASSES = ((0.41, 6**2, 32**2), (0.34, 32**2, 96**2), (0.25, 96**2, 400**2))  # share, area range (px^2)
_CLASS_P = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 0.9  # Zipf-like: class 0 about 30% of the boxes
_CLASS_P[0] *= 2.5
_CLASS_P /= _CLASS_P.sum()


def num_boxes(rng: np.random.Generator) -> int:
    """Boxes in one image: 0 in about 1%, else 1 + a negative binomial of mean 6.4 (a tail past 50)."""
    if rng.random() < 0.01:
        return 0
    return 1 + int(rng.negative_binomial(0.9, 0.9 / (0.9 + 6.4)))


def image_shape(rng: np.random.Generator) -> tuple[int, int]:
    draw = rng.random()
    for shape, share in SHAPES:
        if draw < share:
            return shape
        draw -= share
    short = int(rng.integers(240, 641))
    return (short, 640) if rng.random() < 0.7 else (640, short)


def sample_boxes(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """(count, 5) [class, x1, y1, x2, y2] in pixels, inside the image."""
    shares = np.array([share for share, _, _ in SIZE_CLASSES])
    kinds = rng.choice(len(SIZE_CLASSES), size=count, p=shares / shares.sum())
    low = np.array([SIZE_CLASSES[k][1] for k in kinds], float)
    high = np.minimum([SIZE_CLASSES[k][2] for k in kinds], 0.9 * height * width)
    area = np.exp(rng.uniform(np.log(low), np.log(np.maximum(high, low + 1))))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=count))  # w / h
    w = np.clip(np.sqrt(area * aspect), 2, width)
    h = np.clip(np.sqrt(area / aspect), 2, height)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    classes = rng.choice(NUM_CLASSES, size=count, p=_CLASS_P)
    return np.stack((classes, x1, y1, x1 + w, y1 + h), axis=1)


def noise_tiles(seed: int) -> list[np.ndarray]:
    """Fine texture: 640x640 colour noise, blurred a little so JPEG keeps about as much as a photo."""
    rng = np.random.default_rng((seed, 99))
    tiles = []
    for _ in range(NOISE_TILES):
        noise = rng.normal(0, 46, size=(640, 640, 3)).astype(np.float32)
        tiles.append(cv2.GaussianBlur(noise, (0, 0), 0.7))
    return tiles


def render(rng: np.random.Generator, height: int, width: int, boxes: np.ndarray, tiles: list[np.ndarray]) -> np.ndarray:
    """A smooth colour field under fine noise, each object a patch of its own colour and texture."""
    coarse = rng.uniform(30, 225, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    tile = tiles[int(rng.integers(len(tiles)))]
    dy, dx = int(rng.integers(0, 641 - height)), int(rng.integers(0, 641 - width))
    image += tile[dy : dy + height, dx : dx + width]
    for _, x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = int(x1), int(y1), max(int(x2), int(x1) + 1), max(int(y2), int(y1) + 1)
        patch = tiles[int(rng.integers(len(tiles)))][: y2 - y1, : x2 - x1] * rng.uniform(0.5, 2.0)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        region = image[y1:y2, x1:x2]
        if rng.random() < 0.5:  # an ellipse inside the box, else the whole box
            mask = np.zeros(region.shape[:2], np.uint8)
            half = ((x2 - x1) // 2, (y2 - y1) // 2)
            cv2.ellipse(mask, half, half, 0, 0, 360, 1, -1)
            region[mask > 0] = (colour + patch)[mask > 0]
        else:
            region[:] = colour + patch
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(root: Path, split: str, split_id: int, index: int, seed: int, tiles: list[np.ndarray]) -> None:
    rng = np.random.default_rng((seed, split_id, index))
    height, width = image_shape(rng)
    boxes = sample_boxes(rng, height, width, num_boxes(rng))
    image = render(rng, height, width, boxes, tiles)
    stem = f"{index:012d}"
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    label = root / "labels" / split / f"{stem}.txt"
    cx, cy = (boxes[:, 1] + boxes[:, 3]) / 2 / width, (boxes[:, 2] + boxes[:, 4]) / 2 / height
    bw, bh = (boxes[:, 3] - boxes[:, 1]) / width, (boxes[:, 4] - boxes[:, 2]) / height
    rows = zip(boxes[:, 0], cx, cy, bw, bh)
    label.write_text("".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))
    # the image last, so an image on disk always has its label; renamed into place, so a killed run
    # leaves no half-written JPEG
    image_path = root / "images" / split / f"{stem}.jpg"
    partial = image_path.with_suffix(".partial")
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, image_path)


def _write_chunk(root: Path, split: str, split_id: int, indices: list[int], seed: int) -> int:
    tiles = noise_tiles(seed)
    cv2.setNumThreads(1)
    for index in indices:
        if not (root / "images" / split / f"{index:012d}.jpg").exists():
            write_image(root, split, split_id, index, seed, tiles)
    return len(indices)


def generate(root: Path, num_train: int = COCO_TRAIN, num_val: int | None = None, seed: int = 0) -> Path:
    """Write the dataset into `root` (or reuse it, when finished with the same parameters) and
    return its dataset YAML."""
    num_val = num_val if num_val is not None else max(num_train * COCO_VAL // COCO_TRAIN, 1)
    wanted = {"format": FORMAT_VERSION, "train": num_train, "val": num_val, "seed": seed}
    marker = root / MARKER
    data_yaml = root / "data.yaml"
    if marker.exists():
        if json.loads(marker.read_text()) == wanted:
            return data_yaml
        raise SystemExit(
            f"{root} holds a generated dataset of other parameters ({marker.read_text()}): give another folder"
        )
    counts = dict(zip((s for s, _ in SPLITS), (num_train, num_val)))
    workers = usable_cpu_count()
    # forkserver: a fork of a process with threads (a test run's, say) can deadlock in the child
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver")) as pool:
        jobs = []
        for split, split_id in SPLITS:
            for kind in ("images", "labels"):
                (root / kind / split).mkdir(parents=True, exist_ok=True)
            chunks = np.array_split(np.arange(counts[split]), max(counts[split] // 500, 1))
            jobs += [pool.submit(_write_chunk, root, split, split_id, c.tolist(), seed) for c in chunks]
        done = 0
        for job in jobs:
            done += job.result()
            print(f"\rgenerated {done}/{num_train + num_val} images", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    names = {k: f"class{k}" for k in range(NUM_CLASSES)}
    data_yaml.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train2017", "val": "images/val2017", "names": names})
    )
    marker.write_text(json.dumps(wanted))
    return data_yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--images", type=int, default=COCO_TRAIN, help="train images (val: the same share as COCO's)")
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args()
    print(generate(opt.out, opt.images, seed=opt.seed))


if __name__ == "__main__":
    main()
