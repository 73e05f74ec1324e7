"""The project's cache folder: what is worth keeping between runs but belongs to no run (label
scans, COCO ground truths, precision verdicts). It lies outside every dataset and run folder, so
no command writes into a folder of the user's inputs: `$EMA_YOLO_CACHE_DIR`, else
`$XDG_CACHE_HOME/ema-yolo`, else `~/.cache/ema-yolo`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The user's cache folder for this project."""
    if os.environ.get("EMA_YOLO_CACHE_DIR"):
        return Path(os.environ["EMA_YOLO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ema-yolo"


def cache_file_for(folder: Path, kind: str, suffix: str) -> Path:
    """The cache file of `kind` for `folder`: named after the folder's last parts (a YOLO label folder
    .../coco/labels/train2017 as coco-train2017), for a person reading the cache folder, and a digest
    of its absolute path, so two datasets never share one."""
    folder = folder.absolute()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    readable = "-".join(part for part in folder.parts[-3:] if part not in (kind, folder.anchor))
    return cache_dir() / kind / (f"{readable}-{digest}{suffix}" if readable else f"{digest}{suffix}")
