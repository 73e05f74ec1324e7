"""Run folders: the lock (held, or a filesystem that cannot lock) and the checkpoint a bare --resume picks."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from utils import run_dir as run_dir_module
from utils.dist import World
from utils.errors import UserError
from utils.run_dir import LOCK_NAME, RunDirLock, checkpoint_to_resume


def _hold_lock(folder: Path, held, done) -> None:
    lock = RunDirLock(folder)
    held.set()
    done.wait(30)
    lock.release()


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    context = mp.get_context("fork")
    held, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, held, done))
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(UserError, match=f"in use by another live training run \\(process {holder.pid}\\)"):
            RunDirLock(tmp_path)
    finally:
        done.set()
        holder.join(30)
    RunDirLock(tmp_path).release()  # free again once the holder let go


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EACCES])
def test_the_errors_of_a_held_lock_refuse(tmp_path, monkeypatch, code):
    def held(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_dir_module.fcntl, "lockf", held)
    with pytest.raises(UserError, match="in use by another live training run"):
        RunDirLock(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_filesystem_that_cannot_lock_warns_and_goes_on(tmp_path, monkeypatch, caplog, code):
    def cannot_lock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_dir_module.fcntl, "lockf", cannot_lock)
    lock = RunDirLock(tmp_path)
    assert lock.fd is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{tmp_path} is on a filesystem that cannot lock files" in warnings[0]
    assert os.strerror(code) in warnings[0]
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # no pid claims a lock that is not held


def write_last(project: Path, run: str, age_s: float) -> Path:
    last = project / run / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"checkpoint")
    os.utime(last, (time.time() - age_s, time.time() - age_s))
    return last


@dataclass(frozen=True)
class RankOne(World):
    """Rank 1 of 2: `sent` holds what rank 0 broadcasts and what the gathers of every rank return, in order."""

    rank: int = 1
    size: int = 2
    sent: list = field(default_factory=list)

    def from_main(self, value: object) -> object:
        return self.sent.pop(0)

    def gathered(self, value: object) -> list[object]:
        return self.sent.pop(0)


def test_a_bare_resume_takes_rank_0s_checkpoint_not_the_newest_on_this_disk(tmp_path, monkeypatch):
    rank_0s = write_last(tmp_path / "shared", "exp", age_s=100)
    write_last(tmp_path / "own", "exp7", age_s=0)  # newer, on this machine's own disk: not the run
    world = RankOne(sent=[(rank_0s, None), [True, True]])
    assert checkpoint_to_resume(True, tmp_path / "own", world) == rank_0s
    assert checkpoint_to_resume(str(tmp_path / "given.pt"), tmp_path, RankOne()) == tmp_path / "given.pt"


def test_a_bare_resume_fails_on_every_rank_as_on_rank_0(tmp_path):
    write_last(tmp_path / "own", "exp", age_s=0)
    refused = UserError(f"--resume: no last.pt found under {tmp_path / 'runs'}; pass the checkpoint path")
    with pytest.raises(UserError, match="no last.pt found under"):
        checkpoint_to_resume(True, tmp_path / "own", RankOne(sent=[(None, refused)]))


def test_a_checkpoint_that_a_rank_cannot_read_is_one_error_on_all(tmp_path):
    rank_0s = write_last(tmp_path, "exp", age_s=0)
    world = RankOne(sent=[(rank_0s, None), [True, False]])
    with pytest.raises(UserError, match=r"rank\(s\) 1 cannot find on their machine"):
        checkpoint_to_resume(True, tmp_path, world)


def test_the_newest_last_checkpoint_alone(tmp_path):
    write_last(tmp_path, "exp", age_s=100)
    newest = write_last(tmp_path, "exp2", age_s=0)
    assert checkpoint_to_resume(True, tmp_path, World()) == newest
    with pytest.raises(UserError, match="no last.pt found"):
        checkpoint_to_resume(True, tmp_path / "elsewhere", World())
