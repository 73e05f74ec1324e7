"""Fault injection: SIGKILL and SIGTERM at random moments during training, SIGKILL during checkpoint writes."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.yolo import build_model
from tests.conftest import REPO_ROOT, make_shapes_dataset
from utils.checkpoint.format import load_checkpoint, save_checkpoint, training_checkpoint
from utils.hyp import load_hyp
from utils.train.ema import ModelEMA
from utils.train.optim import build_optimizer
from utils.train.run import state_of
from utils.train.saver import CheckpointWriter

pytestmark = pytest.mark.slow
POSTHOC = {"power-0.05", "power-0.1"}  # the power EMAs --posthoc-ema tracks


# The anchor-free YOLOv5u case also trains with Lookahead (a 3-step cycle: kills land inside cycles).
EXTRA_ARGS = {"yolov5nu.yaml": ["--lookahead", "3", "0.5"]}


def train_command(data: Path, project: Path, name: str, cfg: str) -> list[str]:
    # 16 images in batches of 4 for 3 epochs; a last.pt at nearly every optimizer step.
    return [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "--data",
        str(data),
        "--epochs",
        "3",
        "--imgsz",
        "64",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--cfg",
        cfg,
        "--deterministic",
        # Every kind of tracked average, and post-hoc snapshots, must survive the kills too.
        "--ema",
        "images",
        "--average",
        "ema-steps",
        "power-0.07",
        "--posthoc-ema",
        "2",
        "--save-interval",
        "0.001",
        "--no-plots",
        "--project",
        str(project),
        "--name",
        name,
        "--exist-ok",
        *EXTRA_ARGS.get(cfg, []),
    ]


def wait_for_new_checkpoints(process: subprocess.Popen, path: Path, count: int, timeout: float = 120) -> None:
    """Block until `path` has been replaced `count` times (or the process ends)."""

    def stamp():
        return path.stat().st_mtime_ns if path.exists() else None

    seen, previous, deadline = 0, stamp(), time.time() + timeout
    while seen < count and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
        current = stamp()
        if current != previous:
            seen, previous = seen + 1, current


def read_rows(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """48 train / 8 val images: 12 micro-batches an epoch, enough steps to be killed between."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data"), num_train=48, num_val=8, seed=4)


def test_killed_at_random_moments_and_resumed_equals_uninterrupted(small_dataset, tmp_path):
    """YOLOv5u (the anchor-free head) with Lookahead and every kind of average, ended at random moments,
    by turns with SIGKILL (nothing is written: the last periodic checkpoint counts) and with SIGTERM to
    the process and its DataLoader workers (the step under way finishes and last.pt is written), and
    resumed each time. The anchor-based head and YOLO11 are killed and resumed in test_end_to_end.py,
    and stopped under torchrun in test_stop_signals.py."""
    cfg = "yolov5nu.yaml"
    reference = subprocess.run(
        train_command(small_dataset, tmp_path, "straight", cfg),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr

    rng = random.Random(7)
    last = tmp_path / "killed" / "weights" / "last.pt"
    positions, statuses = [], []

    def start(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    process = start(train_command(small_dataset, tmp_path, "killed", cfg))
    for kill in range(3):  # SIGKILL, SIGTERM, SIGKILL
        # Mostly let the run write one or two new checkpoints first, so that it advances between kills;
        # sometimes kill blind (start-up, data loading). Then a random extra delay: inside a forward pass,
        # a validation or a checkpoint write.
        if rng.random() < 0.8:
            wait_for_new_checkpoints(process, last, count=rng.choice([1, 2]))
        time.sleep(rng.uniform(0.0, 0.5))
        assert process.poll() is None, f"the run finished after only {kill} kills"
        if kill % 2:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGKILL)
        statuses.append(process.wait(timeout=300))
        if last.exists():
            position = load_checkpoint(last)["loop"]
            positions.append((position["epoch"], position["batch"]))
            command = [sys.executable, str(REPO_ROOT / "train.py"), "--resume", str(last)]
        else:  # killed before its first checkpoint: start again
            command = train_command(small_dataset, tmp_path, "killed", cfg)
        process = start(command)
    # SIGKILL: -9; SIGTERM: 143 once training runs (-15 before it starts, when the default handler ends it)
    assert statuses[0::2] == [-signal.SIGKILL] * 2 and all(s in (143, -signal.SIGTERM) for s in statuses[1::2])
    assert 143 in statuses, f"no SIGTERM landed while training: {statuses}"
    assert process.wait(timeout=600) == 0
    assert any(batch > 0 for _, batch in positions), f"never resumed inside an epoch: {positions}"
    print(f"resumed at (epoch, batch): {positions}")

    straight = torch.load(tmp_path / "straight" / "weights" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["updates"] == straight["updates"]
    assert resumed["ema_state"] == straight["ema_state"] and straight["ema_state"]["images"] == 3 * 48
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    assert resumed["averages"].keys() == straight["averages"].keys() == {"ema-steps", "power-0.07", *POSTHOC}
    for average, state in straight["averages"].items():
        assert {k: v for k, v in resumed["averages"][average].items() if k != "module"} == {
            k: v for k, v in state.items() if k != "module"
        }
        for name, tensor in state["module"].items():
            assert torch.equal(resumed["averages"][average]["module"][name], tensor), (average, name)
    snapshots = sorted(p.name for p in (tmp_path / "straight" / "weights" / "posthoc").iterdir())
    assert snapshots == ["epoch0001.pt", "epoch0002.pt"]  # 2 over 3 epochs: evenly spaced, the last at the end
    for snapshot in snapshots:
        a, b = (
            torch.load(tmp_path / run / "weights" / "posthoc" / snapshot, weights_only=True)
            for run in ("killed", "straight")
        )
        for average in POSTHOC:
            assert a["averages"][average]["updates"] == b["averages"][average]["updates"]
            for name, tensor in b["averages"][average]["module"].items():
                assert torch.equal(a["averages"][average]["module"][name], tensor), (snapshot, average, name)
    for a, b in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    if cfg in EXTRA_ARGS:  # Lookahead's slow weights and cycle position
        a, b = resumed["optimizer"]["lookahead"], straight["optimizer"]["lookahead"]
        assert a["steps"] == b["steps"] and all(torch.equal(x, y) for x, y in zip(a["slow"], b["slow"]))
    assert read_rows(tmp_path / "killed") == read_rows(tmp_path / "straight")


def small_checkpoint() -> dict:
    model = build_model("yolov5n.yaml", nc=3)
    ema = ModelEMA(model)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.9, 5e-4)
    return training_checkpoint(
        state_of(model, ema, optimizer),
        finished=False,
        model_yaml=model.yaml,
        names=["a", "b", "c"],
        hyp=load_hyp("scratch-low.yaml"),
        opt={},
        world_size=1,
    )


def test_kill_during_checkpoint_writes_always_leaves_a_loadable_file(tmp_path):
    checkpoint = small_checkpoint()
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint)
    started = time.perf_counter()
    save_checkpoint(path, checkpoint)
    write_seconds = time.perf_counter() - started
    rng = random.Random(3)
    for attempt in range(50):
        pid = os.fork()
        if pid == 0:  # child: write the checkpoint over and over until killed
            try:
                while True:
                    checkpoint["epoch"] = attempt
                    save_checkpoint(path, checkpoint)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 2.5 * write_seconds))  # lands anywhere inside a write
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = load_checkpoint(path)  # old or new, never partial
        assert loaded["epoch"] in (-1, *range(attempt + 1))
    # A writer killed inside its write leaves its temporary behind (made certain here: this one
    # blocks in fsync, after the data is in the temporary); the next run's writer removes it.
    pid = os.fork()
    if pid == 0:
        try:
            os.fsync = lambda fd: time.sleep(3600)
            save_checkpoint(path, checkpoint)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert list(tmp_path.glob(".last.pt.*.tmp"))
    CheckpointWriter(tmp_path, interval_minutes=0)
    assert not list(tmp_path.glob(".last.pt.*.tmp")) and load_checkpoint(path)
