"""Memory and CPUs within a container's limits, read from fake cgroup (v1, v2) and /proc files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from utils import device as device_module
from utils import resources
from utils.resources import available_memory_bytes, usable_cpu_count

GiB = 2**30
HOST_AVAILABLE = 20 * GiB


def fake_system(tmp_path: Path, cgroup_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /sys/fs/cgroup tree holding `files` (relative path -> content) and a /proc with meminfo
    (20 GiB available) and self/cgroup; returns (cgroup_root, proc)."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    root.mkdir(parents=True)
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {64 * GiB // 1024} kB\nMemAvailable: {HOST_AVAILABLE // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root, proc


def test_v2_limit_less_usage_without_reclaimable_cache(tmp_path):
    root, proc = fake_system(
        tmp_path,
        "0::/\n",
        {
            "cgroup.controllers": "cpu memory\n",
            "memory.max": f"{8 * GiB}\n",
            "memory.current": f"{5 * GiB}\n",
            "memory.stat": f"anon {3 * GiB}\nactive_file {GiB}\ninactive_file {GiB}\n",
        },
    )
    assert available_memory_bytes(root, proc) == 8 * GiB - (5 * GiB - GiB)


def test_v2_without_limit_is_the_host(tmp_path):
    root, proc = fake_system(
        tmp_path, "0::/\n", {"cgroup.controllers": "memory\n", "memory.max": "max\n", "memory.current": "123\n"}
    )
    assert available_memory_bytes(root, proc) == HOST_AVAILABLE


def test_v2_the_tightest_limit_above_the_process_wins(tmp_path):
    """A job's cgroup limits its steps: the step has no limit of its own, the job has 2 GiB."""
    root, proc = fake_system(
        tmp_path,
        "0::/job/step\n",
        {
            "cgroup.controllers": "memory\n",
            "job/memory.max": f"{2 * GiB}\n",
            "job/memory.current": f"{GiB // 2}\n",
            "job/step/memory.max": "max\n",
            "job/step/memory.current": f"{GiB // 2}\n",
        },
    )
    assert available_memory_bytes(root, proc) == 2 * GiB - GiB // 2


def test_v1_huge_sentinel_is_no_limit_and_a_real_limit_counts(tmp_path):
    lines = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n"  # the container's path, not mounted inside it
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1000\n"}
    root, proc = fake_system(tmp_path / "a", lines, unlimited)
    assert available_memory_bytes(root, proc) == HOST_AVAILABLE
    limited = {
        "memory/memory.limit_in_bytes": f"{4 * GiB}\n",
        "memory/memory.usage_in_bytes": f"{3 * GiB}\n",
        "memory/memory.stat": f"inactive_file 5\ntotal_inactive_file {GiB}\n",
    }
    root, proc = fake_system(tmp_path / "b", lines, limited)
    assert available_memory_bytes(root, proc) == 4 * GiB - 2 * GiB


def test_nothing_readable(tmp_path):
    root, proc = fake_system(tmp_path, "", {})
    assert available_memory_bytes(root, proc) == HOST_AVAILABLE
    (proc / "meminfo").unlink()
    assert available_memory_bytes(root, proc) is None


def test_the_device_entry_reads_the_container_on_the_cpu(tmp_path, monkeypatch):
    root, proc = fake_system(
        tmp_path, "0::/\n", {"cgroup.controllers": "", "memory.max": f"{GiB}\n", "memory.current": "0\n"}
    )
    monkeypatch.setattr(resources, "available_memory_bytes", partial(available_memory_bytes, root, proc))
    assert device_module.available_memory_bytes(torch.device("cpu")) == GiB


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cgroup.controllers": "cpu\n", "cpu.max": "200000 100000\n"}, 2),
        ({"cgroup.controllers": "cpu\n", "cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
        ({"cgroup.controllers": "cpu\n", "cpu.max": "max 100000\n"}, 8),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),  # v1: no quota
        ({"cgroup.controllers": "cpu\n", "cpu.max": "5000000 100000\n"}, 8),  # a quota above the CPUs
        ({}, 8),
    ],
)
def test_cpus_within_the_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(8)))
    root, proc = fake_system(tmp_path, "2:cpu,cpuacct:/\n0::/\n", files)
    assert usable_cpu_count(root, proc) == expected


def test_cpus_are_those_of_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr(resources.os, "cpu_count", lambda: 64)
    root, proc = fake_system(tmp_path, "", {})
    assert usable_cpu_count(root, proc) == 3
