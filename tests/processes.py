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


def torchrun_on_node(node_rank: int, port: int, *args: str) -> list[str]:
    """Machine `node_rank`'s launch of train.py on two machines of one process each: torchrun's
    static rendezvous at 127.0.0.1:`port`, which makes node rank 0 global rank 0 (c10d's would
    number the machines itself, here by process id)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        str(REPO_ROOT / "train.py"),
        *args,
    ]


class Node:
    """A machine of a torchrun launch over several, simulated on this one: its own working folder,
    HOME, temporary and cache folders under `root`; each launch's output in a file beside `root`."""

    def __init__(self, root: Path):
        self.root, self.launches = root, 0
        self.work, self.home, self.tmp, self.cache = (root / name for name in ("work", "home", "tmp", "cache"))
        for folder in (self.work, self.home, self.tmp, self.cache):
            folder.mkdir(parents=True)
        self.process: subprocess.Popen | None = None

    def start(self, command: list[str]) -> None:
        self.launches += 1
        with open(self.log, "w") as log:  # the child holds its own copy of the file
            self.process = subprocess.Popen(
                command,
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, to kill
                env={
                    **os.environ,
                    "HOME": str(self.home),
                    "TMPDIR": str(self.tmp),
                    "EMA_YOLO_CACHE_DIR": str(self.cache),
                    "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1",
                },
            )

    @property
    def log(self) -> Path:
        return self.root.parent / f"{self.root.name}-launch{self.launches}.log"

    @property
    def output(self) -> str:
        """The latest launch's output (torchrun's and its workers')."""
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        return self.process.wait(timeout=timeout)

    def running(self) -> list[int]:
        """The ids of the machine's processes still running (all carry its HOME in their environment)."""
        return processes_with(f"HOME={self.home}")

    def left_running(self, grace: float = 30) -> list[int]:
        """The machine's processes still running `grace` seconds from now, or none sooner."""
        deadline = time.time() + grace
        while (running := self.running()) and time.time() < deadline:
            time.sleep(0.1)
        return running

    def kill(self) -> None:
        """SIGKILL to the machine's processes, as when it dies: the process groups of torchrun's agent
        and of the workers it starts in sessions of their own (their DataLoader workers with them).
        Returns once the agent is gone."""
        for _ in range(3):  # again, for a process started while the others were being found
            groups = set()
            for pid in self.running():
                with contextlib.suppress(ProcessLookupError):
                    groups.add(os.getpgid(pid))
            groups.discard(os.getpgrp())  # never the test's own
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=60)

    def files(self) -> list[Path]:
        """The files in the machine's working folder, HOME and cache folder."""
        return sorted(p for folder in (self.work, self.home, self.cache) for p in folder.rglob("*") if p.is_file())


def processes_with(entry: str) -> list[int]:
    """The ids of this user's processes whose environment holds `entry` ("NAME=value"; Linux's /proc)."""
    found, wanted = [], entry.encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):  # ended meanwhile, or another user's
            if wanted in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def wait_for_checkpoint(last: Path, wanted, running: subprocess.Popen, timeout: float = 300) -> dict:
    """The checkpoint in `last` once its loop state satisfies `wanted`, while `running` runs."""
    deadline = time.time() + timeout
    while running.poll() is None and time.time() < deadline:
        if last.exists():  # written atomically: always a whole file
            checkpoint = torch.load(io.BytesIO(last.read_bytes()), weights_only=True)
            if wanted(checkpoint["loop"]):
                return checkpoint
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint in {last} as waited for (the run has ended: {running.poll() is not None})")


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
