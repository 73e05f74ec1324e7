"""Writing a file so that a crash leaves either the old version or the new one, never a mix."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: in the same folder, by a name no
    other writer picks (not the pid: processes in identical containers share theirs)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function writing to the open file: torch.save streams a checkpoint
    so, never holding its bytes in memory) to a temporary file in the same folder, flush + fsync,
    then os.replace; the folder is fsynced too, so the rename itself survives a power cut. On any
    failure the temporary is removed. Writers of one path at once (on one machine or several
    sharing a filesystem) each leave a whole file; the last to rename wins."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:  # exclusive: never another writer's temporary
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this: keep the error that matters
            tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the file itself is already on disk


def copy_of(source: Path) -> Callable[[BinaryIO], object]:
    """For atomic_write: the bytes of the file at `source`, copied in chunks."""

    def write(f: BinaryIO) -> None:
        with open(source, "rb") as read:
            shutil.copyfileobj(read, f, 2**24)

    return write
