"""Seconds from `python train.py` to its first optimizer step, and from `--resume` of a checkpoint
taken at 90% of an epoch to its first step (the batches already taken are skipped by index).

train.py runs as a user starts it, under a pseudo-terminal so that its progress bar is live: the
bar's description (epoch, memory, losses) is first written at the first optimizer step, and that
line stops the clock. The fresh run is then stopped with SIGTERM, which writes last.pt after the
step under way; that checkpoint, moved to 90% of the epoch (its loop position: the weights do not
change the time), is what the resume starts from.
"""

from __future__ import annotations

import fcntl
import math
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.checkpoint.format import load_checkpoint, save_checkpoint  # noqa: E402

# The progress bar's description, written at optimizer steps only: "0/0  cpu  0.1157  0.0423 ...".
FIRST_STEP = re.compile(r"\b\d+/\d+\s+(?:cpu|[0-9.]+G)\s+(?:[0-9.]+(?:e[-+]?\d+)?|nan|inf)\s")


def _until_first_step(command: list[str], env: dict, timeout_s: float) -> tuple[float, subprocess.Popen, int]:
    """Start `command` on a pseudo-terminal: the seconds until its first optimizer step's progress
    line, the process (a session of its own) and the terminal's end to hand to _stop."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # a new one is 0 columns wide
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, start_new_session=True
    )
    os.close(secondary)
    output = ""
    try:
        while time.perf_counter() - started < timeout_s:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    output += os.read(primary, 65536).decode(errors="replace")
                except OSError:  # the terminal closed: the process ended
                    break
                if FIRST_STEP.search(output):
                    return time.perf_counter() - started, process, primary
            elif process.poll() is not None:
                break
        raise SystemExit(f"no optimizer step of {' '.join(command)} within {timeout_s:.0f} s:\n{output[-3000:]}")
    except BaseException:
        _stop(process, primary, signal.SIGKILL)
        raise


def _stop(process: subprocess.Popen, terminal: int, signum: int) -> None:
    """Send `signum` to the process's session, read its terminal until it exits (a closed terminal
    would fail its next write), and close it."""
    try:
        os.killpg(process.pid, signum)
        while process.poll() is None:
            if select.select([terminal], [], [], 1.0)[0]:
                try:
                    os.read(terminal, 65536)
                except OSError:
                    break
        process.wait(timeout=600)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        os.close(terminal)


def first_steps(data_yaml: Path, workdir: Path, env: dict, *, cfg: str, imgsz: int, batch: int) -> dict:
    """{'fresh_s', 'resume_90_s', 'resume_batch', 'batches_per_epoch'}: a fresh run's start to its
    first step (the label caches already written by a first, unmeasured run), and a resume's."""
    project = workdir / "first_step"
    shutil.rmtree(project, ignore_errors=True)
    common = ["--data", str(data_yaml), "--cfg", cfg, "--imgsz", str(imgsz), "--batch-size", str(batch)]
    common += ["--epochs", "1", "--cache", "off", "--project", str(project), "--no-plots"]
    train = [sys.executable, "train.py", *common]
    figures = {}
    for name in ("warm_up", "fresh"):  # the first writes the label caches of both splits
        seconds, process, terminal = _until_first_step([*train, "--name", name], env, timeout_s=3600)
        _stop(process, terminal, signal.SIGTERM)  # last.pt after the step under way
        figures[f"{name}_s"] = seconds
    run_dir = project / "fresh"
    checkpoint = load_checkpoint(run_dir / "weights" / "last.pt")
    images = sum(1 for _ in (Path(data_yaml).parent / "images" / "train2017").iterdir())
    batches = math.ceil(images / batch)
    checkpoint["loop"]["batch"] = int(0.9 * batches)
    save_checkpoint(run_dir / "weights" / "last.pt", checkpoint)
    seconds, process, terminal = _until_first_step(
        [sys.executable, "train.py", "--resume", str(run_dir / "weights" / "last.pt")], env, timeout_s=3600
    )
    _stop(process, terminal, signal.SIGKILL)
    del figures["warm_up_s"]
    return {**figures, "resume_90_s": seconds, "resume_batch": int(0.9 * batches), "batches_per_epoch": batches}
