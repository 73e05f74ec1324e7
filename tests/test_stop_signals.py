"""A cluster's SIGTERM (or Slurm's SIGUSR1): the step under way finishes, every rank agrees, last.pt is
written, train.py exits 128 + the signal, and --resume continues to the same weights bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import REPO_ROOT, make_shapes_dataset, tiny_train_args
from tests.processes import load, torchrun
from utils.checkpoint.format import load_checkpoint
from utils.train import loop as loop_module

DETERMINISTIC = ("--epochs", "2", "--deterministic")


def assert_same_training(resumed: dict, straight: dict) -> None:
    """The same weights, EMA, optimizer state and update count, bit for bit."""
    assert resumed["updates"] == straight["updates"] and resumed["loop"]["epoch"] == straight["loop"]["epoch"]
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    for a, b in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def straight_run(tiny_dataset, tmp_path_factory) -> dict:
    project = tmp_path_factory.mktemp("straight")
    assert train.main(tiny_train_args(tiny_dataset, project, *DETERMINISTIC)) == 0
    return load(project / "exp" / "weights" / "last.pt")


def signal_on_call(monkeypatch, name: str, call: int, signum: int) -> None:
    """Send `signum` to this process on the call-th call of loop.`name` (counted from 1), just before it runs."""
    original, calls = getattr(loop_module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, name, wrapper)


# 16 images in micro-batches of 4: 4 per epoch; to_model_input runs once per micro-batch, evaluate once per epoch.
# The two moments a random signal rarely hits; the random test below lands inside epochs.
@pytest.mark.parametrize(
    ("moment", "name", "call", "signum", "stopped_at"),
    [
        ("inside an epoch's last micro-batch", "to_model_input", 4, signal.SIGUSR1, (0, 4)),
        ("while validating", "evaluate", 1, signal.SIGTERM, (1, 0)),
    ],
)
def test_a_stop_signal_writes_last_pt_there_and_resume_equals_straight(
    tiny_dataset, tmp_path, monkeypatch, capsys, straight_run, moment, name, call, signum, stopped_at
):
    signal_on_call(monkeypatch, name, call, signum)
    status = train.main(tiny_train_args(tiny_dataset, tmp_path, *DETERMINISTIC))
    log = capsys.readouterr().out
    assert status == 128 + signum, log
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    last = tmp_path / "exp" / "weights" / "last.pt"
    position = load_checkpoint(last)["loop"]
    assert (position["epoch"], position["batch"]) == stopped_at and position["window"] == 0
    name = signal.Signals(signum).name
    assert f"{name} received: finishing this optimizer step, then writing last.pt" in log
    assert f"{name}: training stopped at epoch {position['epoch']}" in log
    assert f"continue with: python train.py --resume {last}" in log

    monkeypatch.undo()
    assert train.main(["--resume", str(last)]) == 0
    assert_same_training(load(last), straight_run)


# Random moments under torchrun, which passes SIGTERM on to its workers (one process, its workers
# signalled too, as Slurm signals every process of a job: test_fault_injection.py, among SIGKILLs).


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """48 train / 8 val images: 6 micro-batches of 8 (4 per process) an epoch."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data"), num_train=48, num_val=8, seed=4)


class Run:
    """A torchrun launch of train.py whose output is read as it comes, to signal it once it trains."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            torchrun(*args),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for_training(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not any("Epoch" in line for line in self.lines) and self.process.poll() is None:
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to torchrun's agent, which passes it on; returns once all have ended."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.wait()

    def wait(self) -> int:
        status = self.process.wait(timeout=600)
        self.reader.join(timeout=10)
        return status

    @property
    def output(self) -> str:
        return "".join(self.lines)


def new_run(data: Path, project: Path, name: str) -> tuple[str, ...]:
    return (
        *("--data", str(data), "--epochs", "3", "--imgsz", "64", "--workers", "1", "--deterministic", "--no-plots"),
        *("--batch-size", "8", "--project", str(project), "--name", name, "--exist-ok"),
    )


@pytest.mark.slow
def test_sigterm_at_random_moments_under_torchrun_then_resume_equals_an_uninterrupted_run(small_dataset, tmp_path):
    straight = Run(*new_run(small_dataset, tmp_path, "straight"))
    assert straight.wait() == 0, straight.output

    rng, last = random.Random(3), tmp_path / "killed" / "weights" / "last.pt"
    run, stops = Run(*new_run(small_dataset, tmp_path, "killed")), []
    for _ in range(2):
        run.wait_for_training()
        time.sleep(rng.uniform(0.0, 2.0))
        run.stop()
        if not last.exists():  # stopped before the first step: nothing to resume
            run = Run(*new_run(small_dataset, tmp_path, "killed"))
            continue
        position = load_checkpoint(last)["loop"]
        stopped = "training stopped at epoch" in run.output
        stops.append((position["epoch"], position["batch"], stopped))
        if stopped:
            assert f"SIGTERM: training stopped at epoch {position['epoch']}" in run.output
        run = Run("--resume", str(last))
    assert run.wait() == 0, run.output
    print(f"stopped at (epoch, batch, by the signal): {stops}")
    assert any(by_signal for *_, by_signal in stops), f"no signal landed while training: {stops}"
    assert_same_training(load(last), load(tmp_path / "straight" / "weights" / "last.pt"))
    results = [(tmp_path / name / "results.csv").read_text() for name in ("killed", "straight")]
    assert results[0] == results[1]
