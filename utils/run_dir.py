"""Run folders: runs/train/exp, exp2, ..., held by one live run at a time, and the checkpoint to resume."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from utils.dist import World
from utils.errors import UserError
from utils.log import LOGGER

try:
    import fcntl
except ImportError:  # POSIX only: on Windows run folders are not locked
    fcntl = None

LOCK_NAME = ".lock"


def next_run_dir(project: Path, name: str, exist_ok: bool = False) -> Path:
    """project/name, or the first free project/name2, name3, ...; created here, so two runs
    started together never share a folder."""
    project.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        (project / name).mkdir(exist_ok=True)
        return project / name
    n = 1
    while True:
        path = project / (name if n == 1 else f"{name}{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


class RunDirLock:
    """An exclusive lock on a run folder, held while the process lives (the kernel drops it when
    the process ends, however it ends), so two live runs never write into one folder. A POSIX
    record lock: it belongs to this process alone, so DataLoader workers forked from it, which
    may outlive a killed run for a moment, do not hold it against the --resume that follows.
    On a filesystem that cannot lock (some network and FUSE filesystems) the run goes on
    unlocked, with a warning."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = run_dir, None
        if fcntl is None:
            return
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks here
                os.close(fd)
                LOGGER.warning(
                    f"WARNING: {run_dir} is on a filesystem that cannot lock files ({error.strerror}): "
                    "nothing stops a second run from writing into this folder at the same time"
                )
                return
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{run_dir} is in use by another live training run (process {holder}); give another "
                "--name, or leave out --exist-ok"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to: <run> for <run>/weights/<name>.pt where <run> holds
    the run's opt.yaml; None for a checkpoint copied anywhere else."""
    folder = checkpoint.resolve().parent
    if folder.name == "weights" and (folder.parent / "opt.yaml").is_file():
        return folder.parent
    return None


def newest_last_checkpoint(search_dir: Path) -> Path:
    """The most recently written last.pt below search_dir (for a bare --resume)."""
    candidates = list(search_dir.glob("**/last.pt"))
    if not candidates:
        raise UserError(f"--resume: no last.pt found under {search_dir}; pass the checkpoint path")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resumable_file(path: Path) -> Path:
    """--resume PATH: the file, or for a run folder (or its weights/ folder) the last.pt in it."""
    if not path.is_dir():
        return path
    for candidate in (path / "weights" / "last.pt", path / "last.pt"):
        if candidate.is_file():
            LOGGER.info(f"--resume {path} is a folder: resuming its {candidate.relative_to(path)}")
            return candidate
    raise UserError(f"--resume {path} is a folder without weights/last.pt: give a run folder or the checkpoint's path")


def checkpoint_to_resume(resume: str | bool, project: Path, world: World) -> Path:
    """--resume's checkpoint: the path given, or for a bare --resume the newest last.pt under
    --project as global rank 0 finds it (it writes the checkpoints; the other machines' disks may
    hold none, or older ones). Every rank must be able to read it."""
    if not isinstance(resume, bool):
        return resumable_file(Path(resume))
    path = world.decided_by_main(lambda: newest_last_checkpoint(project))
    readable = world.gathered(path.is_file())
    lacking = [rank for rank, found in enumerate(readable) if not found]
    if lacking:
        raise UserError(
            f"--resume: rank 0 resumes {path}, which rank(s) {', '.join(map(str, lacking))} cannot find on their "
            "machine: keep --project on a filesystem all machines share (or copy the run folder to the same "
            "path on each), or pass the checkpoint's path"
        )
    return path


def add_run_dir_arguments(parser: argparse.ArgumentParser, default_project: str) -> None:
    """YOLOv5's --project / --name / --exist-ok, shared by train.py, val.py and detect.py."""
    parser.add_argument("--project", default=default_project, help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name")
