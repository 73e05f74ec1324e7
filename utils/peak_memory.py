"""Memory a block of work really takes on a device: CUDA's allocator statistics, or on the CPU the
process's resident set (peak RSS), and the out-of-memory errors of both.

On the CPU the peak is the kernel's high-water mark of the resident set (VmHWM), reset through
/proc/self/clear_refs; glibc's freed-but-kept memory is handed back first (malloc_trim), so
memory freed before the block is not counted again inside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache
from pathlib import Path

import torch

from utils.resources import proc_field_bytes

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """In-use and peak memory of this process on `device` (CUDA: the caching allocator's tensors;
    CPU: the resident set), in bytes. `reset()` starts a new peak from what is in use now."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu" and not cpu_peak_measurable():
            raise OSError("the resident-set peak cannot be read or reset here (/proc/self/clear_refs)")

    def in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        release_cached_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            CLEAR_REFS.write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM")


@cache
def cpu_peak_measurable() -> bool:
    """Whether this system lets a process read and reset its resident-set peak (Linux)."""
    try:
        _status_bytes("VmHWM")
        with CLEAR_REFS.open("w") as f:
            f.write("5")
    except (OSError, ValueError):
        return False
    return True


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming it)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def release_cached_memory(device: torch.device) -> None:
    """Give freed memory back (CUDA's cache, glibc's free lists) so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _status_bytes(field: str) -> int:
    value = proc_field_bytes(STATUS, field)
    if value is None:
        raise OSError(f"{field} cannot be read from {STATUS}")
    return value


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound on 64-bit


def steady_malloc(large_bytes: int) -> None:
    """Keep a process that allocates image buffers over and over (a DataLoader worker) at a steady
    size: its threads share the malloc arenas there are, and blocks of `large_bytes` or more are
    mapped and unmapped whole, below it kept for reuse. glibc's default raises that threshold to
    the largest block freed so far, so one mosaic canvas moves every buffer into a heap that then
    fragments. Measured on one worker, 640 px mosaics, 10,000 samples of COCO-size JPEGs: RSS
    +71% by default, +8% with the shared arenas alone, +2.4% with both, at the same speed (a
    threshold under a sample's own size costs 10-20% in page faults)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, min(large_bytes, MMAP_THRESHOLD_MAX))


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
