"""Where a command may write, checked before any work: a folder that can be created and written in, that
holds none of the files the command reads and lies in none of the folders it reads whole. One rule for
train.py, val.py, detect.py, export.py, average.py and the Python API's Results.save."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from utils.errors import UserError


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Refuse (UserError) a folder that is a file, lies below a file, or cannot be created or written in:
    probed by creating and removing a temporary file in it, or in the nearest folder above it that
    exists (root ignores permission bits; a probe does not). Creates nothing that stays. `what` names
    the option: "--project runs/train"."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        place = "is a file" if existing == folder else f"lies below {existing}, a file"
        raise UserError(f"{what} {place}, not a folder: give a folder to write in")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise UserError(
            f"{what}: cannot write in {existing} ({error.strerror or error}); give a folder you can write in"
        ) from None


def check_holds_no_inputs(
    folder: str | Path, what: str, files: Iterable[str | Path] = (), trees: Iterable[str | Path] = ()
) -> None:
    """Refuse (UserError) an output folder that is or holds one of `files` (what the command reads), or is,
    holds or lies in one of `trees` (folders it reads whole: a second run would read this one's outputs)."""
    out = Path(folder).resolve()
    for path in files:
        resolved = Path(path).resolve()
        if out == resolved or out in resolved.parents:
            raise UserError(
                f"{what} holds the input {path}: its results would be written over or beside the inputs; "
                "write them elsewhere"
            )
    for tree in trees:
        root = Path(tree).resolve()
        if out == root or out in root.parents or root in out.parents:
            raise UserError(
                f"{what} lies in or holds {tree}, which is read as an input: a later run would read these "
                "results as inputs; write them elsewhere"
            )


def check_run_dir(
    project: str | Path,
    name: str,
    exist_ok: bool,
    files: Iterable[str | Path] = (),
    trees: Iterable[str | Path] = (),
) -> None:
    """The checks for the run folder --project/--name/--exist-ok name (run_dir.next_run_dir). Without
    --exist-ok the run gets a new folder (project/name2 when project/name exists), which holds nothing yet:
    then only `project` must be writable and `trees` apply."""
    folder = Path(project) / name
    if exist_ok:
        check_writable_folder(folder, f"--project/--name {folder}")
        check_holds_no_inputs(folder, f"--project/--name {folder}", files, trees)
    else:
        check_writable_folder(project, f"--project {project}")
        check_holds_no_inputs(folder, f"--project/--name {folder}", (), trees)


def check_output_file(
    path: str | Path, what: str, files: Iterable[str | Path] = (), trees: Iterable[str | Path] = ()
) -> None:
    """Refuse (UserError) an output file that is a folder, whose folder cannot be made or written in, that
    is one of `files` (what the command reads) or lies in one of `trees` (folders it reads whole)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} is a folder: name the file to write")
    check_writable_folder(path.parent, f"{what}: its folder {path.parent}")
    resolved = path.resolve()
    for read in files:
        if resolved == Path(read).resolve():
            raise UserError(f"{what} is the input {read}: write to a new file")
    for tree in trees:
        if Path(tree).resolve() in resolved.parents:
            raise UserError(f"{what} lies in {tree}, which is read as an input: write it elsewhere")
