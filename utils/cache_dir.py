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


def cache_file_for(sources: list[Path], kind: str, suffix: str, generic: tuple[str, ...] = ()) -> Path:
    """The cache file of `kind` for what `sources` name (a split's image folders or lists): named after
    the first one's last parts, less `generic` folder names (.../coco/images/train2017 as
    coco-train2017), for a person reading the cache folder, and a digest of all their absolute paths,
    so two splits or datasets never share one."""
    absolute = [os.path.normpath(Path(s).absolute()) for s in sources]
    digest = hashlib.sha256(b"\0".join(os.fsencode(s) for s in absolute)).hexdigest()[:12]
    parts = Path(absolute[0]).parts[-3:] if absolute else ()
    readable = "-".join(p for p in parts if p not in (*generic, os.sep)).replace(".", "_")[:100]
    return cache_dir() / kind / (f"{readable}-{digest}{suffix}" if readable else f"{digest}{suffix}")
