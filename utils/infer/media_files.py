"""Media files and output names: which image and video files a --source names (a file, a folder, a glob
pattern, a list file's line), and the name each input's result gets in the run folder, none shared."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from utils.data.listing import IMAGE_SUFFIXES
from utils.errors import UserError

# The one list of video suffixes (image suffixes are utils/data/listing.IMAGE_SUFFIXES).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts", ".gif")
OUTPUT_VIDEO_SUFFIX = ".mp4"  # every video result is written as mp4v in .mp4, whatever the input's container
MAX_NAME_CHARS = 80


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def has_glob_pattern(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def media_files(entry: str, where: str) -> list[Path]:
    """The images and videos `entry` names, sorted: a file, a folder (its files, not its subfolders)
    or a glob pattern (** recurses). `where` prefixes the error: "--source x" or a list file's line."""
    path = Path(entry)
    try:
        if has_glob_pattern(entry):
            files = [Path(p) for p in glob.glob(entry, recursive=True)]
        elif path.is_dir():
            files = list(path.iterdir())
        elif path.is_file():
            if not (is_image(path) or is_video(path)):
                raise UserError(
                    f"{where} is neither an image ({' '.join(IMAGE_SUFFIXES)}) nor a video ({' '.join(VIDEO_SUFFIXES)})"
                )
            return [path]
        else:
            raise UserError(
                f"{where} does not exist (expected an image, a video, a folder, a glob pattern, "
                "a webcam index, a stream URL or a .streams file)"
            )
        found = sorted(p for p in files if (is_image(p) or is_video(p)) and p.is_file())
    except OSError as error:  # a folder without read or search permission, a dead network mount
        raise UserError(f"{where}: cannot list it ({error.strerror or error})") from None
    if not found:
        raise UserError(f"{where}: no images or videos in it ({' '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
    return found


def read_folders(entry: str) -> list[Path]:
    """The folders `entry` reads whole: a folder it names, or the folder a glob pattern searches up to its
    first pattern character when the pattern reaches into subfolders (a/**/*.jpg, a/*/b.jpg: a)."""
    if not has_glob_pattern(entry):
        return [Path(entry)] if Path(entry).is_dir() else []
    parts = Path(entry).parts
    first = next(i for i, part in enumerate(parts) if has_glob_pattern(part))
    return [Path(*parts[:first]) if first else Path(".")] if first < len(parts) - 1 else []


def _collision_key(name: Path) -> str:
    """Names compared case-insensitively; images without their suffix, as a.jpg and a.png would share
    the label file a.txt."""
    return (name.with_suffix("") if is_image(name) else name).as_posix().casefold()


def unique_names(names: list[Path], renamed: list[bool] | None = None) -> list[Path]:
    """The names with `_2`, `_3`, ... added to the stem of any that another already has (see _collision_key).
    Names that are their input's own (renamed[i] False) are served first: clip.mp4 keeps its name and a
    clip.avi beside it, which becomes a .mp4 too, gets clip_2.mp4."""
    order = sorted(range(len(names)), key=lambda i: renamed is not None and renamed[i])
    taken: set[str] = set()
    unique = list(names)
    for i in order:
        unique[i] = numbered(names[i], lambda candidate: _collision_key(candidate) in taken)
        taken.add(_collision_key(unique[i]))
    return unique


def numbered(path: Path, taken: Callable[[Path], bool]) -> Path:
    """`path`, or the first of path_2, path_3, ... (the number before the suffix) that is not `taken`."""
    candidate, n = path, 1
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def file_output_names(files: list[Path]) -> list[Path]:
    """Where each file's result goes, relative to the run folder: its path below the folder the files
    have in common (two a.jpg in different folders both keep theirs; files of one folder keep their
    names), videos with the suffix .mp4."""
    absolute = [Path(os.path.abspath(p)) for p in files]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    names = [p.relative_to(root) for p in absolute]
    outputs = [n.with_suffix(OUTPUT_VIDEO_SUFFIX) if is_video(n) else n for n in names]
    return unique_names(outputs, [output != name for output, name in zip(outputs, names)])


def batch_output_names(paths: list[str | None]) -> list[Path]:
    """The names the results of one batch are saved as, none shared: a file's as detect.py names it
    (file_output_names), an array's or PIL image's image0.jpg, image1.jpg, ... by its place in the batch."""
    file_names = iter(file_output_names([Path(p) for p in paths if p is not None]) if any(paths) else [])
    names = [Path(f"image{i}.jpg") if p is None else next(file_names) for i, p in enumerate(paths)]
    return unique_names(names, [p is None for p in paths])


def stream_output_name(entry: str) -> Path:
    """A readable video name for a stream: webcam0.mp4; the URL's host and path without credentials, query
    or video suffix (rtsp://cam.local:554/live/1 -> cam_local_554_live_1.mp4, http://h/a.mp4 -> h_a.mp4);
    a listed video file's stem."""
    if entry.isdigit():
        text = f"webcam{int(entry)}"
    elif "://" in entry:
        parts = urlsplit(entry)
        path = parts.path[: -len(Path(parts.path).suffix)] if is_video(Path(parts.path)) else parts.path
        text = parts.netloc.rsplit("@", 1)[-1] + path
    else:
        text = Path(entry).stem
    # no dots: a label file named stem_12.txt must not lose part of the stem to with_suffix
    text = re.sub(r"[^A-Za-z0-9-]+", "_", text).strip("_")[:MAX_NAME_CHARS] or "stream"
    return Path(text + OUTPUT_VIDEO_SUFFIX)
