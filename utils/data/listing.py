"""A split's image files, listed from its sources, and the YOLO label file of each.

Paths are plain strings: a split of 118k images lists in well under a second this way, where a
Path object per file costs ten times more.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.errors import UserError

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def _suffix_at(name: str) -> int:
    """Where os.path.splitext would cut a file name (len(name): no suffix), without its cost: the last
    dot, unless only dots come before it."""
    dot = name.rfind(".")
    if dot > 0 and name[0] != ".":
        return dot
    return len(os.path.splitext(name)[0])


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and _suffix_at(name) < len(name)


def list_image_paths(sources: tuple[Path, ...] | list[Path]) -> tuple[list[str], list[str]]:
    """Image files from folders (searched recursively), image-list .txt files or single images,
    as path strings in Path order, and a message for each folder that could not be read
    (skipped, not fatal)."""
    files: list[str] = []
    unreadable: list[str] = []
    for source in sources:
        if source.is_dir():

            def note(error: OSError) -> None:
                unreadable.append(f"{error.filename}: unreadable folder ({error.strerror})")

            for folder, _, names in os.walk(str(source), onerror=note, followlinks=True):  # str(Path): normalised
                folder = "" if folder == os.curdir else folder.removeprefix(os.curdir + os.sep)  # as Path('.') / n
                start = os.path.join(folder, "")
                files += [start + name for name in names if _is_image_name(name)]
        elif source.suffix == ".txt" and source.is_file():
            for line in source.read_text().splitlines():
                line = line.strip()
                if line:
                    entry = Path(line)
                    files.append(str(entry if entry.is_absolute() else (source.parent / entry).resolve()))
        elif source.suffix.lower() in IMAGE_SUFFIXES and source.is_file():
            files.append(str(source))
        else:
            raise UserError(f"{source} is not a folder, an image-list .txt or an image")
    files = sorted(set(files), key=_path_order)
    if not files:
        raise UserError(f"no images found in {', '.join(str(s) for s in sources)}")
    return files, unreadable


def _path_order(path: str) -> str:
    """Path's own order (part by part: '/a-b/x' after '/a/b') for normalised path strings: the
    separator made the smallest character, so plain string order compares part by part."""
    return path.replace(os.sep, "\0")


def label_path_for(image_file: Path) -> Path:
    """YOLO layout: .../images/x/name.jpg -> .../labels/x/name.txt (the last 'images' folder)."""
    return Path(label_paths([os.fspath(image_file)])[0])


def label_paths(image_files: list[str]) -> list[str]:
    """label_path_for on strings, each folder worked out once (a split holds 100k images in a few folders)."""
    folders: dict[str, str] = {}
    labels = []
    for image_file in image_files:
        cut = image_file.rfind(os.sep) + 1
        folder, name = image_file[:cut], image_file[cut:]
        if folder not in folders:
            folders[folder] = _label_folder(folder)
        labels.append(folders[folder] + name[: _suffix_at(name)] + ".txt")
    return labels


def _label_folder(folder: str) -> str:
    """The label folder of an image folder, both "" or ending with a separator."""
    marked = os.sep + folder  # every folder name between separators, the first one too
    at = marked.rfind(f"{os.sep}images{os.sep}")
    if at >= 0:
        marked = f"{marked[:at]}{os.sep}labels{os.sep}{marked[at + 8 :]}"
    return marked[1:]
