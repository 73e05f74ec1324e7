"""What each averaging method buys at the default budget on the embedded dataset (yolov5n, 30
epochs, the default recipe): the default run (YOLOv5's EMA ramp), TensorFlow's EMA ramp,
Lookahead (the EMA folding in its slow or its fast weights), SWAP and filter grafting with 2 CPU
processes; over seeds, the mAP@0.5:0.95 of the weights each method ships, and the training wall
time against the default run. Prints a table.

    python benchmarks/averaging_methods.py --seeds 0 1

Smallest run (the CI smoke test: a generated dataset, 64 px, the default run and SWAP, 2 epochs):

    python benchmarks/averaging_methods.py --data shapes.yaml --imgsz 64 --batch-size 4 --workers 0 \
        --methods default swap --seeds 0 --epochs 2 --timing-epochs 2 --project /tmp/methods

Shipped weights: the last epoch's EMA (rank 0's for SWAP and grafting, whose results.csv row
is its validation), and SWAP's weights/swap.pt (the processes' average, BatchNorm recomputed),
evaluated as train.py validates. The accuracy runs are kept (an interrupted one resumes from its
last.pt) and their numbers cached in result.json, so they may be trained over several sittings
and the script run again to add seeds. Wall time comes from separate timing runs instead, one
per method, --timing-epochs long, run one after the other in this script run on a machine left
otherwise idle (rerun them with --retime). One process runs with the machine's threads; the
2-process methods run under torchrun with one thread each, so every run uses the same cores
(grafting's 2 processes are 2 runs of their own: twice the compute of one). Every run trains on
--device (default cpu).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_options import add_training_arguments, training_options  # noqa: E402
from utils.checkpoint.format import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.train.as_trained import evaluate_as_trained, val_loader_as_trained  # noqa: E402

TF_HYP = "hyp-tensorflow-ramp.yaml"  # written into the project: the default hyp with ema_warmup: tensorflow
METHODS = {  # name -> (label, processes, train.py options)
    "default": ("default run (YOLOv5's EMA ramp)", 1, []),
    "tf-ramp": ("TensorFlow's EMA ramp (hyp ema_warmup: tensorflow)", 1, ["--hyp", TF_HYP]),
    "lookahead": ("Lookahead 5 0.5, EMA of the slow weights", 1, ["--lookahead"]),
    "lookahead-fast": ("Lookahead 5 0.5, EMA of the fast weights", 1, ["--lookahead", "--lookahead-ema", "fast"]),
    "swap": ("SWAP, 2 processes alone for the last third: rank 0's EMA", 2, ["--swap-epoch", "SWAP_EPOCH"]),
    "graft": ("filter grafting, 2 processes (2 networks): rank 0's EMA", 2, ["--graft"]),
}
SWAP_AVERAGE = "swap.pt"  # the extra row SWAP ships


def swap_epoch(epochs: int) -> int:
    """SWAP's processes train alone for the last third of the run (at least its last epoch)."""
    return min(epochs - epochs // 3, epochs - 1)


def command(method: str, run_dir: Path, epochs: int, seed: int, args: argparse.Namespace) -> list[str]:
    """train.py's command line for a new run or for resuming an interrupted one."""
    _, processes, options = METHODS[method]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    last = run_dir / "weights" / "last.pt"
    if last.exists():
        return [*launcher, "train.py", "--resume", str(last), "--device", args.device]
    placeholders = {TF_HYP: str(Path(args.project) / TF_HYP), "SWAP_EPOCH": str(swap_epoch(epochs))}
    options = [placeholders.get(option, option) for option in options]
    return [
        *launcher,
        "train.py",
        "--data",
        args.data,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        *options,
        *training_options(args),
        "--project",
        str(run_dir.parent),
        "--name",
        run_dir.name,
        "--exist-ok",
        "--device",
        args.device,
    ]


def train(method: str, run_dir: Path, epochs: int, seed: int, args: argparse.Namespace) -> float:
    """Train the run (or finish an interrupted one) unless it is done; the seconds this call took."""
    last = run_dir / "weights" / "last.pt"
    if last.exists() and load_checkpoint(last)["finished"]:
        return 0.0
    processes = METHODS[method][1]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(os.cpu_count() // processes, 1))}
    print(f"training {run_dir.name}...", flush=True)
    started = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        result = subprocess.run(
            command(method, run_dir, epochs, seed, args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    if result.returncode:
        sys.exit(f"training {run_dir.name} failed: see {run_dir.parent / f'{run_dir.name}.log'}")
    return time.time() - started


def last_validation(run_dir: Path) -> float:
    """mAP@0.5:0.95 of the EMA at the last epoch, as train.py validated it (results.csv)."""
    with open(run_dir / "results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return float(next(v for k, v in row.items() if k.strip() == "metrics/mAP_0.5:0.95"))


def evaluate_file(path: Path, args: argparse.Namespace) -> float:
    """mAP@0.5:0.95 of a checkpoint's weights on args.device, evaluated as train.py validates."""
    checkpoint = load_checkpoint(path)
    device = select_device(args.device)
    model = model_from_checkpoint(checkpoint, "ema").to(device)
    loader = val_loader_as_trained(checkpoint, model, load_dataset_config(args.data), workers=2)
    return evaluate_as_trained(model, checkpoint, loader, device).metrics.map50_95


def run_result(method: str, epochs: int, seed: int, args: argparse.Namespace, project: Path) -> dict:
    """The run's numbers (cached in its result.json)."""
    run_dir = project / f"{method}_e{epochs}_s{seed}"
    cache = run_dir / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    train(method, run_dir, epochs, seed, args)
    result = {"map": last_validation(run_dir)}
    if method == "swap":
        result[SWAP_AVERAGE] = evaluate_file(run_dir / "weights" / SWAP_AVERAGE, args)
    cache.write_text(json.dumps(result, indent=1))
    return result


def timed(method: str, args: argparse.Namespace, project: Path) -> float:
    """Seconds of a fresh --timing-epochs run of the method (seed 0; cached in timing.json unless --retime)."""
    cache = project / "timing.json"
    times = json.loads(cache.read_text()) if cache.exists() and not args.retime else {}
    key = f"{method}_e{args.timing_epochs}"
    if key not in times:
        run_dir = project / "timing" / key
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        times[key] = train(method, run_dir, args.timing_epochs, 0, args)
        cache.write_text(json.dumps(times, indent=1))
    return times[key]


def write_tf_hyp(project: Path) -> None:
    """The default hyp (yolov5n's) with TensorFlow's EMA ramp."""
    hyp = yaml.safe_load((REPO / "hyp" / "scratch-low.yaml").read_text())
    (project / TF_HYP).write_text(yaml.safe_dump({**hyp, "ema_warmup": "tensorflow"}, sort_keys=False))


def report(results: dict[str, list[dict]], walls: dict[str, float], seeds: list[int], args: argparse.Namespace) -> None:
    """The table: each method's mAP per seed, its paired gain on the default run, its wall time."""
    print(
        f"\n### {args.epochs} epochs, seeds {', '.join(map(str, seeds))}: mAP@0.5:0.95 on val; "
        f"wall time of {args.timing_epochs} training epochs\n"
    )
    print(
        "| method | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | vs default, paired mean (worst seed) | wall, s | wall vs default |"
    )
    print("|---|" + "--:|" * (len(seeds) + 4))
    base = [r["map"] for r in results["default"]]
    rows = [(METHODS[m][0], m, "map") for m in results]
    if "swap" in results:
        swap_row = ("SWAP: the average of the 2 processes (swap.pt)", "swap", SWAP_AVERAGE)
        rows.insert(list(results).index("swap") + 1, swap_row)
    for label, method, key in rows:
        values = [r[key] for r in results[method]]
        gains = [v - b for v, b in zip(values, base)]
        versus = "" if method == "default" else f"{mean(gains):+.4f} ({min(gains):+.4f})"
        print(
            f"| {label} | "
            + " | ".join(f"{v:.4f}" for v in values)
            + f" | {mean(values):.4f} | {versus} | {walls[method]:.0f} | {walls[method] / walls['default']:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", default="data/shapes.yaml")
    add_training_arguments(parser)
    parser.add_argument("--project", default="runs/averaging_methods")
    parser.add_argument("--device", default="cpu", help="device of every run (a 2-process run needs 2 GPUs)")
    parser.add_argument("--timing-epochs", type=int, default=3, help="length of each method's timing run")
    parser.add_argument("--retime", action="store_true", help="run the timing runs again")
    args = parser.parse_args()
    if "swap" in args.methods and (args.epochs < 2 or args.timing_epochs < 2):
        parser.error("SWAP needs 2 epochs at least, in the accuracy and in the timing runs")
    if "default" not in args.methods:
        parser.error("the table compares against the default run: keep 'default' in --methods")
    project = (REPO / args.project).resolve()
    args.project = str(project)
    project.mkdir(parents=True, exist_ok=True)
    write_tf_hyp(project)
    results = {m: [run_result(m, args.epochs, s, args, project) for s in args.seeds] for m in args.methods}
    walls = {m: timed(m, args, project) for m in args.methods}
    report(results, walls, args.seeds, args)


if __name__ == "__main__":
    main()
