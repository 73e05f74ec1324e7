"""The memory and CPUs this process may use: the machine's, within its container's limits.

Inside a container /proc/meminfo and os.cpu_count() describe the host. The container's own
limits are in its cgroup (v2: memory.max, cpu.max; v1: memory.limit_in_bytes,
cpu.cfs_quota_us / cpu.cfs_period_us), read for the process's cgroup and every one above it
(a Slurm job's step inside its job, say): the tightest wins. What the cgroup has in use counts
without its inactive file cache, which the kernel reclaims before it kills anything (the
container's working set, as Docker and Kubernetes count it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def available_memory_bytes(cgroup_root: Path = CGROUP_ROOT, proc: Path = PROC) -> int | None:
    """Memory a new allocation can take: the host's MemAvailable, or less where the container's
    memory limit leaves less (None where neither can be read)."""
    known = [m for m in (_host_available(proc), _cgroup_available(cgroup_root, proc)) if m is not None]
    return min(known) if known else None


def usable_cpu_count(cgroup_root: Path = CGROUP_ROOT, proc: Path = PROC) -> int:
    """CPUs this process may run on (its affinity) and, in a container with a CPU quota, the
    quota rounded up (cpu.max "200000 100000" -> 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root, proc)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def proc_field_bytes(path: Path, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file (meminfo, self/status) in bytes; None where unreadable."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _host_available(proc: Path) -> int | None:
    return proc_field_bytes(proc / "meminfo", "MemAvailable")


def _cgroup_available(cgroup_root: Path, proc: Path) -> int | None:
    """The least any memory limit over this process leaves free (None: no limit)."""
    if _is_v2(cgroup_root):
        names = ("memory.max", "memory.current", "inactive_file")
    else:
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    limit_name, usage_name, inactive_name = names
    free = []
    for folder in _cgroup_folders(cgroup_root, proc, "memory"):
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= UNLIMITED:
            continue
        in_use = (_read_int(folder / usage_name) or 0) - (_memory_stat(folder, inactive_name) or 0)
        free.append(max(limit - max(in_use, 0), 0))
    return min(free) if free else None


def _cgroup_cpu_quota(cgroup_root: Path, proc: Path) -> float | None:
    """The tightest CPU quota over this process, in CPUs (None: no quota)."""
    quotas = []
    for folder in _cgroup_folders(cgroup_root, proc, "cpu"):
        if _is_v2(cgroup_root):
            try:
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            quota, period = (None if quota == "max" else int(quota)), int(period)
        else:
            quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
        if quota is not None and quota > 0 and period:  # v1 writes "no quota" as -1
            quotas.append(quota / period)
    return min(quotas) if quotas else None


def _is_v2(cgroup_root: Path) -> bool:
    """A unified (v2) hierarchy at the root; v1, and v1 beside v2 ("hybrid"), have a folder per controller."""
    return (cgroup_root / "cgroup.controllers").is_file()


def _cgroup_folders(cgroup_root: Path, proc: Path, controller: str) -> list[Path]:
    """This process's cgroup folder for `controller` and those above it, as far as they are
    visible here (in a container, its cgroup is often the root of what is mounted)."""
    v2 = _is_v2(cgroup_root)
    mount = cgroup_root if v2 else cgroup_root / controller
    own = PurePosixPath()
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "") if v2 else (controller in controllers.split(",")):
                own = PurePosixPath(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    return [mount / folder for folder in (own, *own.parents) if (mount / folder).is_dir()]


def _read_int(path: Path) -> int | None:
    """The integer in a one-value cgroup file; None where it is absent, unreadable or "max"."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _memory_stat(folder: Path, name: str) -> int | None:
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None
