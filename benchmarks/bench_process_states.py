"""What processes training separately (SWAP's second phase, grafting) cost at a checkpoint, by
process count: last.pt's size, the other processes' files beside it, and rank 0's memory.

    python benchmarks/bench_process_states.py [--before /path/to/older/checkout] [--cfg yolov5n.yaml]

Each case is a real `torchrun --nproc_per_node N train.py` run of gloo CPU processes on a
generated 16-image dataset at 64 px, for 2 epochs: SWAP with --swap-epoch 1 (both checkpoints
in the second phase) and --graft. Rank 0's train.py runs under a wrapper that measures, around
each checkpoint (TrainingRun.save_epoch / save_last), the growth of its resident memory: the
kernel's peak RSS (VmHWM) is reset before the save (/proc/self/clear_refs) and read after it,
less the RSS before. --before runs the same cases in an older checkout of this repository (the
layout where rank 0 gathered every process's state into last.pt) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def kilobytes(field: str) -> int:
    """A Vm* line of /proc/self/status, in kB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measured(save):
    """`save` (a TrainingRun method), recording the peak growth of resident memory while it runs."""

    def wrapper(run, *args, **kwargs):
        before = kilobytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        result = save(run, *args, **kwargs)
        GROWTHS.append((kilobytes("VmHWM") - before) * 1024)
        return result

    return wrapper


GROWTHS: list[int] = []


def worker(repo: Path, out: Path, train_args: list[str]) -> None:
    """One torchrun process: train.py of `repo`, rank 0's checkpoints measured; writes out/rank0.json."""
    sys.path.insert(0, str(repo))
    from utils.train import run as run_module

    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        for name in ("save_epoch", "save_last"):
            setattr(run_module.TrainingRun, name, measured(getattr(run_module.TrainingRun, name)))
    sys.argv = [str(repo / "train.py"), *train_args]
    code = 0
    try:
        runpy.run_path(str(repo / "train.py"), run_name="__main__")
    except SystemExit as exit:
        code = exit.code or 0
    if rank == 0:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (out / "rank0.json").write_text(json.dumps({"growths": GROWTHS, "peak_rss": peak}))
    sys.exit(code)


def run_case(repo: Path, data: Path, work: Path, method: str, processes: int, cfg: str) -> dict:
    """One torchrun run; returns the sizes in its weights/ folder (the files last.pt names: its
    epoch has no epochN.pt) and rank 0's measurements."""
    project = work / f"{repo.name}-{method}-{processes}"
    project.mkdir(parents=True)
    extra = ["--swap-epoch", "1"] if method == "swap" else ["--graft"]
    train_args = [
        "--data", str(data), "--cfg", cfg, "--imgsz", "64", "--batch-size", "4", "--epochs", "2",
        "--workers", "0", "--no-plots", "--noval", "--optimizer", "SGD", "--project", str(project), *extra,
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        __file__, "--worker", "--repo", str(repo), "--out", str(project), "--", *train_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    weights = project / "exp" / "weights"
    rank0 = json.loads((project / "rank0.json").read_text())
    return {
        "last": (weights / "last.pt").stat().st_size,
        "best": (weights / "best.pt").stat().st_size,
        "rank_files": [p.stat().st_size for p in weights.glob("last.rank*.pt")],
        "growth": max(rank0["growths"]),
        "peak": rank0["peak_rss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None, help="an older checkout to measure as well")
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.repo, args.out, args.train_args)

    sys.path.insert(0, str(REPO))
    from utils.data.synthetic_shapes import CLASS_NAMES, generate_shapes_dataset

    repos = [("this checkout", REPO)] + ([("before", args.before.resolve())] if args.before else [])
    print(f"{args.cfg}, 64 px, 2 epochs, gloo CPU processes; sizes and memory in MB")
    print(
        "| code | method | processes | last.pt | best.pt | last.rank*.pt files | rank 0 save growth | rank 0 peak RSS |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_shapes_dataset(work / "shapes", num_train=16, num_val=8, seed=1, image_size=(64, 128))
        data = work / "shapes.yaml"
        data.write_text(
            yaml.safe_dump({"path": str(work / "shapes"), "train": "images/train", "val": "images/val",
                            "names": list(CLASS_NAMES)})
        )  # fmt: skip
        for label, repo in repos:
            for method in ("swap", "graft"):
                for processes in args.processes:
                    r = run_case(repo, data, work / "runs", method, processes, args.cfg)
                    files = f"{len(r['rank_files'])} x {max(r['rank_files']) / MB:.1f}" if r["rank_files"] else "none"
                    print(
                        f"| {label} | {method} | {processes} | {r['last'] / MB:.1f} | {r['best'] / MB:.1f} | "
                        f"{files} | {r['growth'] / MB:.1f} | {r['peak'] / MB:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
