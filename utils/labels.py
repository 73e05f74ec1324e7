"""Image listing, label verification and the label cache.

Each image is checked once (readable, a supported format, at least 10 px, JPEG not
truncated) with its YOLO label file (`cls cx cy w h` per line, normalised; polygon rows
are reduced to their box). The result is cached beside the labels folder, keyed by a hash
of the file list, sizes, modification times and the class count, so later runs skip the scan.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.errors import UserError
from utils.log import LOGGER, interactive

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = ("bmp", "jpeg", "png", "tiff", "webp", "mpo")
MIN_IMAGE_SIZE = 10
CACHE_VERSION = 2
# Status of an image after verification.
FOUND, MISSING, EMPTY, CORRUPT = 0, 1, 2, 3


def list_image_files(sources: tuple[Path, ...] | list[Path]) -> list[Path]:
    """Image files from folders (searched recursively), image-list .txt files or single images."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif source.suffix == ".txt" and source.is_file():
            for line in source.read_text().splitlines():
                line = line.strip()
                if line:
                    entry = Path(line)
                    files.append(entry if entry.is_absolute() else (source.parent / entry).resolve())
        elif source.suffix.lower() in IMAGE_SUFFIXES and source.is_file():
            files.append(source)
        else:
            raise UserError(f"{source} is not a folder, an image-list .txt or an image")
    files = sorted(set(files))
    if not files:
        raise UserError(f"no images found in {', '.join(str(s) for s in sources)}")
    return files


def label_path_for(image_file: Path) -> Path:
    """YOLO layout: .../images/x/name.jpg -> .../labels/x/name.txt (the last 'images' folder)."""
    parts = list(image_file.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


@dataclass
class LabelScan:
    """Verified images of one split: those kept, their labels and original sizes, and the counts."""

    image_files: list[Path]
    labels: list[np.ndarray]     # per image (n, 5) float32 [class, cx, cy, w, h], normalised
    shapes: np.ndarray           # (N, 2) int original (height, width), EXIF orientation applied
    num_found: int = 0
    num_missing: int = 0
    num_empty: int = 0
    num_corrupt: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # problem kind -> number of images
    cache_key: str = ""                                     # hash of the files and settings scanned
    messages: list[str] = field(default_factory=list)       # one line per affected file

    def summary(self) -> str:
        total = self.num_found + self.num_missing + self.num_empty + self.num_corrupt
        return (f"{total} images, {self.num_found} labels found, {self.num_missing} missing, "
                f"{self.num_empty} empty, {self.num_corrupt} corrupt (skipped)")


# Problem kinds, as counted in LabelScan.problems. All but DUPLICATES make the image unusable.
UNREADABLE_IMAGE, UNSUPPORTED_FORMAT, TOO_SMALL, TRUNCATED_JPEG = ("unreadable image", "unsupported format",
                                                                   "image under 10 px", "truncated JPEG")
UNREADABLE_LABEL, MALFORMED_ROW, NON_FINITE = "unreadable label file", "malformed label row", "non-finite value"
BAD_CLASS, BAD_COORDINATES, DUPLICATES = "class id out of range", "coordinates outside [0, 1]", "duplicate rows removed"


@dataclass
class Verified:
    """Verification of one image and its label file."""

    status: int
    labels: np.ndarray            # (n, 5) float32 [class, cx, cy, w, h]
    shape: tuple[int, int]        # (height, width), EXIF orientation applied
    problem: str = ""             # one of the kinds above, "" when none
    message: str = ""


def verify_image_and_label(image_file: Path, label_file: Path, num_classes: int) -> Verified:
    """Check one image and its YOLO label file."""
    def corrupt(problem: str, message: str) -> Verified:
        return Verified(CORRUPT, np.zeros((0, 5), np.float32), (0, 0), problem, message)

    try:
        with Image.open(image_file) as image:
            image.verify()
        with Image.open(image_file) as image:  # verify() leaves the object unusable
            width, height = image.size
            image_format = (image.format or "").lower()
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                width, height = height, width
    except Exception as error:  # PIL raises many types for a bad file; all mean "unreadable"
        return corrupt(UNREADABLE_IMAGE, f"{image_file}: unreadable image ({type(error).__name__}: {error})")
    if image_format not in IMAGE_FORMATS:
        return corrupt(UNSUPPORTED_FORMAT, f"{image_file}: unsupported image format {image_format!r}")
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        return corrupt(TOO_SMALL, f"{image_file}: image is {width}x{height}, under {MIN_IMAGE_SIZE} px")
    if image_format in ("jpeg", "mpo"):
        with open(image_file, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read() != b"\xff\xd9":
                return corrupt(TRUNCATED_JPEG, f"{image_file}: truncated JPEG (no end marker)")

    no_labels = np.zeros((0, 5), dtype=np.float32)
    if not label_file.is_file():
        return Verified(MISSING, no_labels, (height, width))
    try:
        rows = [line.split() for line in label_file.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        return corrupt(UNREADABLE_LABEL, f"{label_file}: unreadable label file ({error})")
    if not rows:
        return Verified(EMPTY, no_labels, (height, width))
    try:
        labels = np.array([_row_to_box(row) for row in rows], dtype=np.float64)
    except ValueError as error:
        return corrupt(MALFORMED_ROW, f"{label_file}: {error}")
    if not np.isfinite(labels).all():
        return corrupt(NON_FINITE, f"{label_file}: non-finite values")
    classes = labels[:, 0]
    bad_class = (classes != np.round(classes)) | (classes < 0) | (classes >= num_classes)
    if bad_class.any():
        return corrupt(BAD_CLASS, f"{label_file}: class {classes[bad_class][0]:g} is not an integer in 0..{num_classes - 1}")
    if (labels[:, 1:] < 0).any() or (labels[:, 1:] > 1).any() or (labels[:, 3:] <= 0).any():
        return corrupt(BAD_COORDINATES, f"{label_file}: coordinates must be normalised to [0, 1] with w, h > 0")
    unique = np.unique(labels, axis=0)
    if len(unique) < len(labels):
        return Verified(FOUND, unique.astype(np.float32), (height, width), DUPLICATES,
                        f"{label_file}: {len(labels) - len(unique)} duplicate rows removed")
    return Verified(FOUND, labels.astype(np.float32), (height, width))


def _row_to_box(row: list[str]) -> list[float]:
    """One label row -> [cls, cx, cy, w, h]; a polygon row (cls x1 y1 x2 y2 ...) becomes its box."""
    try:
        values = [float(v) for v in row]
    except ValueError:
        raise ValueError(f"non-numeric value in row {' '.join(row)!r}") from None
    if len(values) == 5:
        return values
    if len(values) >= 7 and len(values) % 2 == 1:
        xs, ys = values[1::2], values[2::2]
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        return [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    raise ValueError(f"row {' '.join(row)!r} has {len(values)} columns, expected 5 (cls cx cy w h)")


def _files_hash(image_files: list[Path], label_files: list[Path], num_classes: int) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION} {num_classes}".encode())
    for path in image_files + label_files:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def scan_labels(image_files: list[Path], num_classes: int, cache_path: Path | None, prefix: str = "",
                threads: int = 8) -> LabelScan:
    """Verify every image/label pair, reading and writing the cache at `cache_path` if given."""
    label_files = [label_path_for(p) for p in image_files]
    key = _files_hash(image_files, label_files, num_classes)
    cached = _read_cache(cache_path, key) if cache_path else None
    if cached is None:
        with ThreadPoolExecutor(threads) as pool:
            results = list(tqdm(pool.map(verify_image_and_label, image_files, label_files, [num_classes] * len(image_files)),
                                total=len(image_files), desc=f"{prefix}scanning {len(image_files)} images", leave=False,
                                disable=not interactive()))
        cached = {
            "status": np.array([r.status for r in results], dtype=np.int8),
            "shapes": np.array([r.shape for r in results], dtype=np.int64).reshape(-1, 2),
            "counts": np.array([len(r.labels) for r in results], dtype=np.int64),
            "labels": np.concatenate([r.labels for r in results] + [np.zeros((0, 5), np.float32)], axis=0),
            "problems": np.array([r.problem for r in results], dtype=str),
            "messages": np.array([r.message for r in results if r.message], dtype=str),
        }
        if cache_path:
            _write_cache(cache_path, key, cached)
    status, offsets = cached["status"], np.concatenate(([0], np.cumsum(cached["counts"])))
    keep = np.flatnonzero(status != CORRUPT)
    return LabelScan(
        image_files=[image_files[i] for i in keep],
        labels=[cached["labels"][offsets[i]:offsets[i + 1]] for i in keep],
        shapes=cached["shapes"][keep],
        num_found=int((status == FOUND).sum()), num_missing=int((status == MISSING).sum()),
        num_empty=int((status == EMPTY).sum()), num_corrupt=int((status == CORRUPT).sum()),
        problems={str(kind): int(n) for kind, n in zip(*np.unique(cached["problems"], return_counts=True)) if kind},
        messages=[str(m) for m in cached["messages"]],
        cache_key=key,
    )


def _read_cache(cache_path: Path, key: str) -> dict | None:
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in ("status", "shapes", "counts", "labels", "problems", "messages")}
    except (OSError, KeyError, ValueError):
        return None  # absent, stale format or damaged: scan again


def _write_cache(cache_path: Path, key: str, cached: dict) -> None:
    """Atomic write beside the labels; a read-only dataset folder only costs a rescan next time."""
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **cached)
        os.replace(tmp, cache_path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        LOGGER.info(f"Note: label cache not written to {cache_path} ({error.strerror}); the scan will run again next time")


def cache_path_for(image_files: list[Path]) -> Path:
    """YOLOv5's place for the cache: labels/<split>.cache beside the split's label folder."""
    label_dir = label_path_for(image_files[0]).parent
    return label_dir.with_suffix(".cache")


def scan_split(sources: tuple[Path, ...], num_classes: int, prefix: str, max_messages: int = 10) -> LabelScan:
    """List, verify (through the cache) and report one split; a split without usable images is a UserError."""
    image_files = list_image_files(sources)
    scan = scan_labels(image_files, num_classes, cache_path_for(image_files), prefix=prefix)
    LOGGER.info(f"{prefix}{scan.summary()}")
    if scan.problems:
        LOGGER.warning(f"{prefix}problems: " + ", ".join(f"{n} {kind}" for kind, n in sorted(scan.problems.items())))
    for message in scan.messages[:max_messages]:
        LOGGER.warning(f"{prefix}  {message}")
    if len(scan.messages) > max_messages:
        LOGGER.warning(f"{prefix}  ... and {len(scan.messages) - max_messages} more")
    if scan.problems.get(BAD_CLASS):
        LOGGER.warning(f"{prefix}WARNING: {scan.problems[BAD_CLASS]} label files use class ids outside 0..{num_classes - 1}; "
                       "check that names in the dataset YAML lists every class")
    if not scan.image_files:
        raise UserError(f"{prefix}no usable images in {', '.join(str(s) for s in sources)}")
    return scan
