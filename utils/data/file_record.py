"""The images a run trained on, recorded in its folder (data_files.txt: split, sizes and modification
times of each image and its label file, path), so that a resumed run says when they changed."""

from __future__ import annotations

import os
from pathlib import Path

from utils.atomic_write import atomic_write
from utils.data.labels import LabelScan
from utils.data.listing import label_path_for
from utils.log import LOGGER

RECORD_NAME = "data_files.txt"


def _stamp(path: Path) -> str:
    """'size mtime_ns' of a file, '-' when it is absent."""
    try:
        stat = os.stat(path)
    except OSError:
        return "-"
    return f"{stat.st_size} {stat.st_mtime_ns}"


def file_stamps(scans: list[tuple[str, LabelScan]]) -> dict[tuple[str, str], str]:
    """(split, image path) -> the stamps of the image and its label file, for every image kept by each scan."""
    return {
        (split, str(image)): f"{_stamp(image)}\t{_stamp(label_path_for(image))}"
        for split, scan in scans
        for image in scan.image_files
    }


def read_record(path: Path) -> dict[tuple[str, str], str] | None:
    """A data_files.txt as file_stamps gives it; None when absent or unreadable (a run from before it existed)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    record = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 4:
            record[(parts[0], parts[3])] = f"{parts[1]}\t{parts[2]}"
    return record


def changes(before: dict, now: dict) -> dict[str, tuple[int, int, int]]:
    """Per split: (images changed, added, removed) from `before` to `now`; splits without a change left out."""
    counts: dict[str, list[int]] = {}
    for key in before.keys() | now.keys():
        split = key[0]
        kind = 1 if key not in before else 2 if key not in now else 0 if before[key] != now[key] else None
        if kind is not None:
            counts.setdefault(split, [0, 0, 0])[kind] += 1
    return {split: tuple(c) for split, c in sorted(counts.items())}


def record_data_files(run_dir: Path, scans: list[tuple[str, LabelScan]], resumed: bool) -> None:
    """Write the run's data_files.txt; on a resume first warn, with counts, when its images or labels
    changed since the run last started."""
    path = run_dir / RECORD_NAME
    now = file_stamps(scans)
    before = read_record(path) if resumed else None
    if before is not None and before != now:
        said = "; ".join(
            f"{split}: {changed} changed, {added} added, {removed} removed"
            for split, (changed, added, removed) in changes(before, now).items()
        )
        LOGGER.warning(
            f"WARNING: the dataset changed since this run last trained ({said} images, counting an image whose "
            "label file changed as changed); it continues on the files as they are now"
        )
    text = "".join(f"{split}\t{stamps}\t{image}\n" for (split, image), stamps in now.items())
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as error:
        LOGGER.warning(f"WARNING: could not write {path} ({error.strerror}); a resume cannot say if the data changed")
