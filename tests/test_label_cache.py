"""The label cache (utils/data/label_cache.py): writers of one cache at once leave one whole file."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from utils.data import label_cache


def _write_cache_at_once(cache: Path, writer: int, start) -> None:
    cached = {
        "status": np.full(1000 * (writer + 1), writer, np.int8),
        "labels": np.full((200_000 * (writer + 1), 5), writer, np.float32),  # 4-8 MB: the writes overlap
    }

    def not_written(message: str) -> None:  # the only way write_cache reports a failed write
        raise AssertionError(message)

    label_cache.LOGGER.info = not_written
    start.wait()
    for _ in range(3):
        label_cache.write_cache(cache, f"key{writer}", cached)
    (cache.parent / f"written by {writer}").touch()


def test_writers_of_one_cache_at_once_leave_one_whole_cache(tmp_path, monkeypatch):
    """Two processes write one cache at once, with one pid between them (as in identical containers
    on a shared filesystem): the cache left is one writer's, whole, and no temporary remains."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    cache = tmp_path / "labels" / "train.cache"
    cache.parent.mkdir(parents=True)
    context = mp.get_context("fork")  # the children keep the patched getpid
    start = context.Barrier(2)
    writers = [context.Process(target=_write_cache_at_once, args=(cache, i, start)) for i in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
    assert [process.exitcode for process in writers] == [0, 0]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["train.cache", "written by 0", "written by 1"]
    with np.load(cache, allow_pickle=False) as data:
        writer = int(str(data["key"]).removeprefix("key"))
        assert np.array_equal(data["labels"], np.full((200_000 * (writer + 1), 5), writer, np.float32))
        assert np.array_equal(data["status"], np.full(1000 * (writer + 1), writer, np.int8))
