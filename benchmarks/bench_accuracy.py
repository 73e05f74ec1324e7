"""Time to accuracy: ours against Ultralytics (and YOLOv5), one run after the other on the same data.

    python benchmarks/bench_accuracy.py --ultralytics-venv VENV1 --yolov5-venv VENV2 \\
        --models yolo11n:30 yolov5nu:15 --seeds 0 1 --yolov5n-epochs 30

For each MODEL:EPOCHS, `python train.py --cfg MODEL.yaml` (our default recipe for its head) once
per seed, and `yolo train model=MODEL.yaml` (Ultralytics' defaults) once; with --yolov5n-epochs,
also our YOLOv5n and the `yolov5` package's. Every run: the embedded dataset (the references get
a copy), --imgsz, --batch, --workers, --device and the epochs given, from scratch, images cached in RAM.
results.csv is watched, so every epoch's mAP gets the wall-clock time since launch. The table
gives mAP@0.5 and mAP@0.5:0.95 at epochs 10/20/30 (or the last), wall time, training images/s
(epochs x training images / wall time, validation included) and the share of the reference's
time ours needed to reach the reference's final mAP@0.5:0.95; the plot, mAP@0.5:0.95 against
wall time. Finished runs are kept in WORKDIR/runs.json: a later call with --resume-bench skips
them, so a long race can be run in parts (it then says so under the table).

The reference venvs (never this project's; their packages are only run, never imported here):

    python -m venv ~/ultra && ~/ultra/bin/pip install "ultralytics>=8.4,<8.5"
    python -m venv ~/v5 && ~/v5/bin/pip install yolov5==7.0.14 "setuptools<81" "numpy<2.3"
    # offline quirks, handled here: YOLO_OFFLINE=1, fonts in $YOLO_CONFIG_DIR (and its Ultralytics/
    # subfolder), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and $YOLOV5_CONFIG_DIR/Arial.ttf for YOLOv5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.references import reference_dataset, reference_environment, timed_run  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.listing import list_image_paths  # noqa: E402

MILESTONES = (10, 20, 30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["yolo11n:30", "yolov5nu:15"], help="MODEL:EPOCHS races")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of our runs")
    parser.add_argument("--ultralytics-venv", type=Path, default=None)
    parser.add_argument("--yolov5-venv", type=Path, default=None)
    parser.add_argument("--yolov5n-epochs", type=int, default=0, help="also race YOLOv5n: ours and the yolov5 package")
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="every run's device: cpu, or a CUDA index such as 0")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_accuracy")
    parser.add_argument("--resume-bench", action="store_true", help="keep the finished runs in WORKDIR/runs.json")
    return parser.parse_args()


def planned_runs(args: argparse.Namespace, ref_data: Path | None) -> dict[str, tuple[list[str], str, bool]]:
    """Run name -> (command, run folder name, needs the reference environment)."""
    common = ["--imgsz", str(args.imgsz), "--batch-size", str(args.batch), "--workers", str(args.workers)]
    common += ["--device", args.device]
    runs_dir = args.workdir / "runs"

    def ours(cfg: str, epochs: int, seed: int) -> tuple[list[str], str, bool]:
        name = f"ours_{cfg}_e{epochs}_s{seed}"
        command = [sys.executable, "train.py", "--data", args.data, "--cfg", f"{cfg}.yaml", "--epochs", str(epochs)]
        command += [*common, "--seed", str(seed), "--project", str(runs_dir), "--name", name, "--exist-ok"]
        return [*command, "--no-plots", "--cache", "ram"], name, False

    runs = {}
    for spec in args.models:
        cfg, epochs = spec.split(":")[0], int(spec.split(":")[1])
        for seed in args.seeds:
            runs[f"ours {cfg} seed {seed}"] = ours(cfg, epochs, seed)
        if args.ultralytics_venv is not None:
            name = f"ultralytics_{cfg}_e{epochs}"
            runs[f"ultralytics {cfg}"] = (
                [
                    str(args.ultralytics_venv / "bin" / "yolo"),
                    "train",
                    f"model={cfg}.yaml",
                    f"data={ref_data}",
                    f"epochs={epochs}",
                    f"imgsz={args.imgsz}",
                    f"batch={args.batch}",
                    f"workers={args.workers}",
                    f"device={args.device}",
                    "pretrained=False",
                    "cache=ram",
                    f"project={runs_dir}",
                    f"name={name}",
                    "exist_ok=True",
                    "plots=False",
                ],
                name,
                True,
            )
    if args.yolov5n_epochs:
        runs["ours yolov5n seed 0"] = ours("yolov5n", args.yolov5n_epochs, 0)
        if args.yolov5_venv is not None:
            name = f"yolov5_yolov5n_e{args.yolov5n_epochs}"
            runs["yolov5 yolov5n"] = (
                [
                    str(args.yolov5_venv / "bin" / "yolov5"),
                    "train",
                    "--data",
                    str(ref_data),
                    "--cfg",
                    "yolov5n.yaml",
                    "--weights",
                    "",
                    "--epochs",
                    str(args.yolov5n_epochs),
                    *common,
                    "--cache",
                    "ram",
                    "--project",
                    str(runs_dir),
                    "--name",
                    name,
                    "--exist-ok",
                    "--noplots",
                ],
                name,
                True,
            )
    return runs


def at_epoch(values: list[float], epoch: int) -> str:
    return f"{values[epoch - 1]:.3f}" if len(values) >= epoch else "-"


def print_table(results: dict[str, dict], train_images: int, args: argparse.Namespace) -> None:
    print(
        f"\n{args.data}, {train_images} training images, {args.imgsz} px, batch {args.batch}, {args.workers} "
        f"workers, from scratch; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); wall clock "
        "since launch\n"
    )
    header = " | ".join(f"mAP50 / 50-95 @{e}" for e in MILESTONES)
    print(f"| run | epochs | {header} | final mAP50 / 50-95 | wall s | train img/s | reference's final reached at |")
    print("|---|--:|" + "--:|" * len(MILESTONES) + "--:|--:|--:|--:|")
    for name, r in results.items():
        cells = [f"{at_epoch(r['map50'], e)} / {at_epoch(r['map50_95'], e)}" for e in MILESTONES]
        framework, model = name.split()[:2]
        reference = results.get(f"ultralytics {model}") or results.get(f"yolov5 {model}")
        reach = "-"
        if reference is not None and framework == "ours":
            target = reference["map50_95"][-1]
            reached = [(t, i + 1) for i, (t, m) in enumerate(zip(r["times"], r["map50_95"])) if m >= target]
            if reached:
                (seconds, epoch) = reached[0]
                reach = f"{seconds:.0f} s, epoch {epoch} ({seconds / reference['times'][-1]:.2f} of its time)"
            else:
                reach = "not reached"
        epochs = len(r["times"])
        print(
            f"| {name} | {epochs} | {' | '.join(cells)} | {r['map50'][-1]:.3f} / {r['map50_95'][-1]:.3f} | "
            f"{r['times'][-1]:.0f} | "
            f"{epochs * train_images / r['times'][-1]:.1f} | {reach} |"
        )


def plot(results: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5), tight_layout=True)
    for name, r in results.items():
        ax.plot([t / 60 for t in r["times"]], r["map50_95"], marker=".", label=name, ls="-" if "ours" in name else "--")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("mAP@0.5:0.95 (validation, each epoch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = reference_environment(args.workdir)
    ref_data = None
    if args.ultralytics_venv is not None or args.yolov5_venv is not None:
        ref_data, _ = reference_dataset(args.data, args.workdir)
    store = args.workdir / "runs.json"
    results = json.loads(store.read_text()) if args.resume_bench and store.exists() else {}
    runs_dir = args.workdir / "runs"
    for name, (command, folder, needs_env) in planned_runs(args, ref_data).items():
        if name in results:
            print(f"  {name}: kept from {store}", flush=True)
            continue
        shutil.rmtree(runs_dir / folder, ignore_errors=True)
        (runs_dir / folder).mkdir(parents=True)
        results[name] = timed_run(name, command, runs_dir / folder, env if needs_env else None)
        store.write_text(json.dumps(results))
    train_images = len(list_image_paths(load_dataset_config(args.data).train)[0])
    print_table(results, train_images, args)
    plot(results, args.workdir / "accuracy_vs_time.png")
    print(f"\nplot: {args.workdir / 'accuracy_vs_time.png'}; runs: {runs_dir}")


if __name__ == "__main__":
    main()
