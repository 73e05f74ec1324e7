"""The label cache: one split's verified scan, kept in the project's cache folder
(utils/cache_dir.py) and keyed by a hash of the file list, sizes, modification times and the
class count, so later runs skip the scan and any change to a file is seen."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from utils.atomic_write import atomic_write
from utils.cache_dir import cache_file_for
from utils.log import LOGGER

FIELDS = ("status", "shapes", "counts", "labels", "problem_kinds", "problem_messages")


def files_key(image_files: list[str], label_files: list[str], num_classes: int, version: int) -> str:
    """The cache key: a hash of the verification's `version`, the class count, and every path with
    its size and modification time (-1, -1 when absent)."""
    stats = []
    for path in image_files + label_files:
        try:
            stat = os.stat(path)
            stats.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    digest = hashlib.sha256(f"{version} {num_classes} {len(image_files)}\0".encode())
    digest.update("\0".join(image_files + label_files).encode(errors="surrogateescape"))
    digest.update(np.array(stats, np.int64).tobytes())
    return digest.hexdigest()


def read_cache(cache_path: Path, key: str) -> dict | None:
    """The cached scan for `key`; None (scan again) when the cache is absent, stale, or damaged,
    which is said in one warning (a write cut short by a full disk or a killed copy)."""
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in FIELDS}
    except (FileNotFoundError, KeyError):
        return None  # absent, or written by a version that stored other fields: stale
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        LOGGER.warning(f"WARNING: label cache {cache_path} is damaged or unreadable ({reason}); scanning again")
        return None


def write_cache(cache_path: Path, key: str, cached: dict) -> None:
    """Atomic write; a cache folder that cannot be written only costs a rescan next time."""
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), **cached)
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_path, buffer.getvalue())
    except OSError as error:
        LOGGER.info(
            f"Note: label cache not written to {cache_path} ({error.strerror}); the scan will run again next time"
        )


def cache_path_for(sources: tuple[Path, ...] | list[Path]) -> Path:
    """The label cache of a split listed from `sources` (its image folders, image-list files or
    images), in the project's cache folder: not beside the labels, as YOLOv5 keeps it, since no
    command writes into a dataset folder; keyed by the sources, so two lists of one folder of
    images (YOLOv5's autosplit) keep a cache each."""
    return cache_file_for(list(sources), "labels", ".cache", generic=("images", "labels"))
