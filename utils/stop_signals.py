"""A cluster's request to stop: SIGTERM (docker stop, Kubernetes, Slurm's preemption and scancel,
spot instances) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS` before a time limit). While training,
either is noted instead of ending the process; the loop finishes the optimizer step under way,
every rank agrees, last.pt is written and train.py exits with 128 + the signal's number (143 for
SIGTERM, 138 for SIGUSR1), the status of a process ended by that signal, for a scheduler to
requeue on. DataLoader workers ignore both: Slurm signals every process of a job, and a worker
ended mid-batch would end the epoch's iterator before the step could finish. Since they ignore
SIGTERM, which multiprocessing ends them with at exit, the process ends them itself (SIGKILL)
first, however it exits."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import threading
from types import FrameType

from utils.log import LOGGER

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Preempted(Exception):
    """Training stopped on a signal, after writing last.pt; train.py exits with `status`."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.status = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While entered (in the main thread; elsewhere it does nothing), SIGTERM and SIGUSR1 set
    `received` (the first one's number) instead of ending the process; the handlers that were
    there before are put back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            LOGGER.info(f"\n{signal_name(signum)} received: finishing this optimizer step, then writing last.pt")


def ignore_stop_signals() -> None:
    """In a DataLoader worker: leave stopping to the main process, which ends its workers itself
    (see end_workers_at_exit)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@functools.cache  # registered once
def end_workers_at_exit() -> None:
    """Have this process end its daemonic child processes (DataLoader workers) with SIGKILL when it
    exits, before multiprocessing's own exit handler ends them with SIGTERM, which they ignore, and
    waits for them (atexit runs the handlers registered last first)."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
