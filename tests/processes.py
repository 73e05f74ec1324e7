"""Running code in several processes for the tests: gloo process groups on 127.0.0.1, torchrun launches
of train.py, and the checkpoints they leave."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import REPO_ROOT
from utils.train.separate_processes import process_file_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_two_processes(fn, *args) -> None:
    """Run fn(rank, world_size, *args) in two gloo processes; a failed assertion fails the test."""
    in_processes(2, fn, *args)


def in_processes(count: int, fn, *args) -> None:
    """Run fn(rank, world_size, *args) in `count` gloo processes; a failed assertion fails the test."""
    port = free_port()
    mp.start_processes(_join_and_run, args=(port, count, fn, args), nprocs=count, join=True, start_method="spawn")


def _join_and_run(rank: int, port: int, count: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=count)
    try:
        fn(rank, count, *args)
    finally:
        dist.destroy_process_group()


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO_ROOT / "train.py"),
        *args,
    ]


def run_command(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def relative_differences(a: dict, b: dict) -> dict[str, float]:
    """Per floating-point tensor: |a - b| / max(|b|, 1e-6) (Frobenius norms). The floor is for the
    few tensors that stay zero up to rounding: YOLO11's attention projection has a BatchNorm bias
    whose gradient is zero (the BatchNorms after it remove its shift), so it only gathers noise."""
    return {
        k: float((a[k].double() - v.double()).norm() / v.double().norm().clamp(min=1e-6))
        for k, v in b.items()
        if v.dtype.is_floating_point
    }


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def interrupted_checkpoint(command: list[str], last: Path, wanted) -> dict[str, bytes]:
    """Run `command` (torchrun) until `last` holds a checkpoint whose loop state satisfies
    `wanted`, end the run there and return that checkpoint's bytes and those of the files of
    the other processes it names (processes training separately), by file name, as if killed
    right after writing them (put_back() writes them back). torchrun starts its workers in
    sessions of their own: it is told to end them (SIGTERM, which it passes on; they stop after
    their step under way, writing a later last.pt that put_back() replaces) and returns once
    they are gone."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline, found = time.time() + 300, None
    while found is None and process.poll() is None and time.time() < deadline:
        if last.exists():  # written atomically: always a whole file
            data = last.read_bytes()
            checkpoint = torch.load(io.BytesIO(data), weights_only=True)
            if wanted(checkpoint["loop"]):
                with contextlib.suppress(FileNotFoundError):  # a later checkpoint replaced them: look again
                    found = {last.name: data, **{p.name: p.read_bytes() for p in process_files(checkpoint, last)}}
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert found is not None, "the checkpoint waited for was not seen before the run ended"
    return found


def process_files(checkpoint: dict, path: Path) -> list[Path]:
    """The files beside `path` holding `checkpoint`'s other processes' states (none when they trained as one)."""
    record = checkpoint.get("process_files")
    if record is None:
        return []
    names = [process_file_name(record["stem"], rank, record["token"]) for rank in range(1, record["processes"])]
    return [path.parent / name for name in names]


def put_back(files: dict[str, bytes], folder: Path) -> None:
    """Write interrupted_checkpoint()'s files back into `folder`."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
