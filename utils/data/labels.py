"""Label verification: the scan of a split's images and YOLO label files.

Each image is checked once (readable, a supported format, at least 10 px, not truncated) with
its YOLO label file (`cls cx cy w h` per line, normalised; polygon rows are reduced to their
box). A problem either skips the image (corrupt) or is repaired in memory (duplicate rows
dropped, boxes overflowing the image by at most 1% clipped); the user's files are never
touched. The result is cached (utils/data/label_cache.py), so later runs skip the scan.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data.image_table import ImageTable, TableView
from utils.data.label_cache import cache_path_for, files_key, read_cache, write_cache
from utils.data.listing import label_path_for, label_paths, list_image_paths
from utils.errors import UserError
from utils.log import LOGGER, interactive
from utils.resources import usable_cpu_count

IMAGE_FORMATS = ("bmp", "jpeg", "png", "tiff", "webp", "mpo")
MIN_IMAGE_SIZE = 10
SCAN_CHUNK = 1024  # images verified per task; a split of more is shared out to a process per core
CLIP_TOLERANCE = 0.01  # boxes may overflow the image by this fraction and are clipped; beyond it, corrupt
ROUNDING_SLACK = 1e-5  # overflow from rounding labels to 6 decimals: accepted as written
CACHE_VERSION = 7  # bump whenever verification changes: old caches are then rescanned
# Status of an image after verification.
FOUND, MISSING, EMPTY, CORRUPT = 0, 1, 2, 3

# Problem kinds, as counted in LabelScan.problems. An image with one of the first kinds is skipped.
UNREADABLE_IMAGE, UNSUPPORTED_FORMAT, TOO_SMALL, TRUNCATED_IMAGE = (
    "unreadable image",
    "unsupported format",
    "image under 10 px",
    "truncated image",
)
UNDECODABLE_IMAGE = "undecodable image"  # passed the scan, but no decoder reads its pixels (found when loading)
# Formats whose verify() checks the structure without the pixel data: these are decoded in full.
DECODED_WHEN_SCANNED = ("bmp", "tiff")
UNREADABLE_LABEL, WRONG_COLUMNS, NON_NUMERIC, NON_FINITE = (
    "unreadable label file",
    "wrong number of columns",
    "non-numeric value",
    "NaN or infinite value",
)
BAD_CLASS, OUTSIDE_IMAGE, NON_POSITIVE_SIZE = (
    "class id out of range",
    "coordinates outside [0, 1]",
    "negative or zero size",
)
# Repaired in memory; the image is kept.
DUPLICATES, CLIPPED = "duplicate rows removed", "boxes clipped to the image"
REPAIRS = (DUPLICATES, CLIPPED)
# Not an image: a folder the scan could not enter.
UNREADABLE_FOLDER = "unreadable folder"


@dataclass
class LabelScan(TableView):
    """Verified images of one split: those kept, their labels and original sizes, and the counts."""

    table: ImageTable  # paths, labels (n, 5) float32 [class, cx, cy, w, h] normalised, original (height, width)
    num_found: int = 0
    num_missing: int = 0
    num_empty: int = 0
    num_corrupt: int = 0
    cache_key: str = ""  # hash of the files and settings scanned
    cache_path: Path | None = None  # where the scan is cached (None: not cached)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (problem kind, message) per affected file
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # FOUND, MISSING or EMPTY per kept image

    def skip(self, image_file: Path, kind: str, message: str) -> None:
        """Count a kept image as corrupt after all (it cannot be decoded when loaded)."""
        index = self.image_files.index(image_file)
        counts = {FOUND: "num_found", MISSING: "num_missing", EMPTY: "num_empty"}
        setattr(self, counts[int(self.status[index])], getattr(self, counts[int(self.status[index])]) - 1)
        self.num_corrupt += 1
        self.messages.append((kind, message))

    @property
    def problems(self) -> dict[str, int]:
        """Problem kind -> number of files (or folders) affected."""
        return dict(Counter(kind for kind, _ in self.messages))

    def summary(self) -> str:
        """'N images, N labels found, N missing, N empty, N corrupt (skipped)', then the count per problem."""
        total = self.num_found + self.num_missing + self.num_empty + self.num_corrupt
        line = (
            f"{total} images, {self.num_found} labels found, {self.num_missing} missing, "
            f"{self.num_empty} empty, {self.num_corrupt} corrupt (skipped)"
        )
        skipped = [f"{n} {kind}" for kind, n in sorted(self.problems.items()) if kind not in REPAIRS]
        repaired = [f"{n} {kind}" for kind, n in sorted(self.problems.items()) if kind in REPAIRS]
        return line + "".join(
            f"; {label}: {', '.join(items)}" for label, items in (("skipped", skipped), ("repaired", repaired)) if items
        )


@dataclass
class Verified:
    """Verification of one image and its label file."""

    status: int
    labels: np.ndarray  # (n, 5) float32 [class, cx, cy, w, h]
    shape: tuple[int, int]  # (height, width), EXIF orientation applied
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)


def verify_image_and_label(image_file: Path, label_file: Path | str, num_classes: int) -> Verified:
    """Check one image and its YOLO label file; repairs happen on the returned labels only."""
    label_file = Path(label_file)

    def corrupt(kind: str, message: str) -> Verified:
        return Verified(CORRUPT, np.zeros((0, 5), np.float32), (0, 0), [(kind, message)])

    try:
        with Image.open(image_file) as image:
            image.verify()
        with Image.open(image_file) as image:  # verify() leaves the object unusable
            width, height = image.size
            image_format = (image.format or "").lower()
            if image_format in DECODED_WHEN_SCANNED:  # a truncated BMP or TIFF passes verify()
                image.load()
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
                return corrupt(TRUNCATED_IMAGE, f"{image_file}: truncated JPEG (no end marker)")

    no_labels = np.zeros((0, 5), dtype=np.float32)
    if not label_file.is_file():
        return Verified(MISSING, no_labels, (height, width))
    try:
        rows = [line.split() for line in label_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        return corrupt(UNREADABLE_LABEL, f"{label_file}: unreadable label file ({error})")
    if not rows:
        return Verified(EMPTY, no_labels, (height, width))
    bad_row = next((r for r in rows if len(r) != 5 and not (len(r) >= 7 and len(r) % 2 == 1)), None)
    if bad_row is not None:
        return corrupt(
            WRONG_COLUMNS,
            f"{label_file}: row {' '.join(bad_row)!r} has {len(bad_row)} columns, expected 5 (cls cx cy w h)",
        )
    try:
        labels = np.array([_row_to_box([float(v) for v in row]) for row in rows], dtype=np.float64)
    except ValueError:
        return corrupt(NON_NUMERIC, f"{label_file}: a value is not a number")
    if not np.isfinite(labels).all():
        return corrupt(NON_FINITE, f"{label_file}: NaN or infinite value")
    classes = labels[:, 0]
    bad_class = (classes != np.round(classes)) | (classes < 0) | (classes >= num_classes)
    if bad_class.any():
        return corrupt(
            BAD_CLASS, f"{label_file}: class {classes[bad_class][0]:g} is not an integer in 0..{num_classes - 1}"
        )
    if (labels[:, 3:] <= 0).any():
        return corrupt(NON_POSITIVE_SIZE, f"{label_file}: a box has a negative or zero width or height")
    corners = np.concatenate((labels[:, 1:3] - labels[:, 3:] / 2, labels[:, 1:3] + labels[:, 3:] / 2), axis=1)
    if (corners < -CLIP_TOLERANCE).any() or (corners > 1 + CLIP_TOLERANCE).any():
        return corrupt(OUTSIDE_IMAGE, f"{label_file}: a box lies outside the image (coordinates outside [0, 1])")
    problems = []
    if (corners < -ROUNDING_SLACK).any() or (corners > 1 + ROUNDING_SLACK).any():
        corners = corners.clip(0, 1)
        labels[:, 1:3], labels[:, 3:] = (corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]
        problems.append((CLIPPED, f"{label_file}: boxes overflowing the image by up to {CLIP_TOLERANCE:.0%} clipped"))
    _, first_rows = np.unique(labels, axis=0, return_index=True)
    if len(first_rows) < len(labels):  # keep the file's order, without the later copies
        problems.append((DUPLICATES, f"{label_file}: {len(labels) - len(first_rows)} duplicate rows removed"))
        labels = labels[np.sort(first_rows)]
    return Verified(FOUND, labels.astype(np.float32), (height, width), problems)


def _row_to_box(values: list[float]) -> list[float]:
    """One label row -> [cls, cx, cy, w, h]; a polygon row (cls x1 y1 x2 y2 ...) becomes its box."""
    if len(values) == 5:
        return values
    xs, ys = values[1::2], values[2::2]
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
    return [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def _verify_chunk(job: tuple[list[Path] | list[str], list[str], int, int]) -> list[Verified]:
    image_files, label_files, num_classes, threads = job
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(verify_image_and_label, image_files, label_files, [num_classes] * len(image_files)))


def scan_labels(
    image_files: list[Path] | list[str], num_classes: int, cache_path: Path | None, prefix: str = "", threads: int = 8
) -> LabelScan:
    """Verify every image/label pair, reading and writing the cache at `cache_path` if given."""
    image_files = [os.fspath(p) for p in image_files]
    label_files = label_paths(image_files)
    key = files_key(image_files, label_files, num_classes, CACHE_VERSION)
    cached = read_cache(cache_path, key) if cache_path else None
    if cached is None:
        chunks = [
            (image_files[start : start + SCAN_CHUNK], label_files[start : start + SCAN_CHUNK], num_classes, threads)
            for start in range(0, len(image_files), SCAN_CHUNK)
        ]
        processes = min(usable_cpu_count(), len(chunks))
        # PIL's header parsing holds the GIL: a large split is shared out to a process per core
        # (each reading through threads, for files on a slow disk); a small one stays in this one.
        # forkserver: a fork of this process (torch's and gloo's threads) could deadlock.
        with (
            ProcessPoolExecutor(processes, mp_context=mp.get_context("forkserver"))
            if processes > 1
            else nullcontext() as pool
        ):
            verified = pool.map(_verify_chunk, chunks) if pool else map(_verify_chunk, chunks)
            results = [
                result
                for chunk in tqdm(
                    verified,
                    total=len(chunks),
                    desc=f"{prefix}scanning {len(image_files)} images",
                    leave=False,
                    disable=not interactive(),
                )
                for result in chunk
            ]
        cached = {
            "status": np.array([r.status for r in results], dtype=np.int8),
            "shapes": np.array([r.shape for r in results], dtype=np.int64).reshape(-1, 2),
            "counts": np.array([len(r.labels) for r in results], dtype=np.int64),
            "labels": np.concatenate([r.labels for r in results] + [np.zeros((0, 5), np.float32)], axis=0),
            "problem_kinds": np.array([kind for r in results for kind, _ in r.problems], dtype=str),
            "problem_messages": np.array([message for r in results for _, message in r.problems], dtype=str),
        }
        if cache_path:
            write_cache(cache_path, key, cached)
    status = cached["status"]
    keep = np.flatnonzero(status != CORRUPT)
    table = ImageTable.from_flat(image_files, cached["labels"], cached["counts"], cached["shapes"])
    return LabelScan(
        table=table if len(keep) == len(table) else table.take(keep),
        cache_path=cache_path,
        num_found=int((status == FOUND).sum()),
        num_missing=int((status == MISSING).sum()),
        num_empty=int((status == EMPTY).sum()),
        num_corrupt=int((status == CORRUPT).sum()),
        messages=list(zip(cached["problem_kinds"].tolist(), cached["problem_messages"].tolist())),
        cache_key=key,
        status=status[keep],
    )


def scan_split(
    sources: tuple[Path, ...],
    num_classes: int,
    prefix: str,
    reported: bool = False,
    max_messages: int = 10,
    needs_labels: bool = False,
) -> LabelScan:
    """List, verify (through the cache) and summarise one split: the summary line with a count per
    problem and the first messages (`reported`: all of them go to the run's data_report.txt, see
    write_data_report). A split without usable images is a UserError, and so is one without a
    single labelled box when `needs_labels` (training on it would learn nothing); a split to
    validate on without boxes is only warned about, as its mAP means nothing."""
    image_files, unreadable_folders = list_image_paths(sources)
    scan = scan_labels(image_files, num_classes, cache_path_for(sources), prefix=prefix)
    scan.messages = [(UNREADABLE_FOLDER, m) for m in unreadable_folders] + scan.messages
    LOGGER.info(f"{prefix}{scan.summary()}")
    for _, message in scan.messages[:max_messages]:
        LOGGER.warning(f"{prefix}  {message}")
    if len(scan.messages) > max_messages:
        LOGGER.warning(
            f"{prefix}  ... and {len(scan.messages) - max_messages} more"
            + (", listed in the run's data_report.txt" if reported else "")
        )
    if scan.problems.get(BAD_CLASS):
        LOGGER.warning(
            f"{prefix}WARNING: {scan.problems[BAD_CLASS]} label files use class ids outside 0..{num_classes - 1}; "
            "check that names in the dataset YAML lists every class"
        )
    if not len(scan.table):
        raise UserError(f"{prefix}no usable images in {', '.join(str(s) for s in sources)}")
    if not len(scan.table.boxes):
        where = missing_labels_hint(scan)
        if needs_labels:
            raise UserError(
                f"{prefix}no labelled boxes in {', '.join(str(s) for s in sources)}, so there is nothing "
                f"to learn. {where}"
            )
        LOGGER.warning(
            f"{prefix}WARNING: no labelled boxes in this split: its mAP is 0 whatever the model "
            f"detects, so it means nothing. {where}"
        )
    return scan


def missing_labels_hint(scan: LabelScan) -> str:
    """Where YOLO labels are looked for, and what was found instead (Darknet-style .txt files
    beside the images, say)."""
    image = scan.image_files[0]
    expected = label_path_for(image)
    hint = f"Labels are read from a labels/ folder beside images/ (for {image}: {expected})"
    if scan.num_found + scan.num_empty:
        return hint + f"; {scan.num_found + scan.num_empty} label files were found, all empty."
    beside = sum(
        1 for f in scan.image_files if f.with_suffix(".txt").is_file() and f.with_suffix(".txt") != label_path_for(f)
    )
    if beside:
        return hint + f"; {beside} .txt files lie beside the images instead: move them to the labels/ folder."
    return hint + "; none were found."


def write_data_report(path: Path, scans: list[tuple[str, LabelScan]]) -> None:
    """data_report.txt: one line per skipped or repaired file of each (split, scan): split, problem
    kind, message; nothing when there is nothing to report."""
    lines = [f"{split}\t{kind}\t{message}\n" for split, scan in scans for kind, message in scan.messages]
    if lines:
        path.write_text("".join(lines))
