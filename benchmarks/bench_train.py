"""Training speed and accuracy side by side with the reference packages, on the same data and settings.

    python benchmarks/bench_train.py --ref-venv /path/to/refvenv                 # timed steps, A/B alternated
    python benchmarks/bench_train.py --ref-venv /path/to/refvenv --epochs 30     # + whole runs, mAP, val speed

Steps: `--steps` micro-batches (after `--warmup` untimed ones) of ours (train.py's default
`--amp auto`, and each of `--ours-variants`: fp32, no RAM cache), and of the `yolov5` package,
each in a fresh process, alternating the order every repeat.
The table gives training images/s and the time per micro-batch split into data wait,
forward + loss, backward, optimizer and EMA (the last two per optimizer step, spread over its
micro-batches), and the main process's peak RSS.

Epochs (`--epochs N`): the real command lines, `python train.py` (our default recipe) and
`yolov5 train` (and `yolo train` when the ultralytics package is in the reference venv, unless
`--skip-ultralytics`), from scratch, one after the other. results.csv is watched, so every
epoch's mAP gets a wall-clock time since launch: the table gives final mAP, and when ours
reached yolov5's final mAP@0.5:0.95. Then validation speed (load, inference, NMS, metrics):
our val on our best.pt and on yolov5's best.pt, and yolov5's val on its best.pt.

The reference venv (never this project's; its packages are only run, never imported here):

    python -m venv ~/refvenv
    ~/refvenv/bin/pip install yolov5==7.0.14 "setuptools<81" "numpy<2.3"    # optional: ultralytics
    # offline quirks, handled by this script: YOLOv5 needs TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and a
    # font at $YOLOV5_CONFIG_DIR/Arial.ttf; ultralytics needs YOLO_OFFLINE=1 and fonts in
    # $YOLO_CONFIG_DIR. Matplotlib's DejaVuSans.ttf is copied to both under --workdir.

The references get a copy of the dataset under --workdir, so their label caches never touch
(or clash with) ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.references import reference_dataset, reference_environment, timed_run  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402

PHASES = ("data", "forward_loss", "backward", "optimizer", "ema")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--ref-venv", type=Path, default=None, help="venv with the yolov5 (and ultralytics) packages")
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--cfg", default="yolov5n.yaml", help="model YAML (the same name in both frameworks)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="timed micro-batches per run (0: skip the step bench)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed micro-batches before them")
    parser.add_argument("--repeats", type=int, default=3, help="alternating A/B rounds of the step bench")
    parser.add_argument(
        "--ours-variants",
        nargs="*",
        default=["amp=off", "cache=off"],
        help="more step-bench rows of ours, each harness_ours.py flags without the dashes, joined by "
        "commas: amp=off|bf16|auto, no-channels-last, compile, cache=off, threads=N, workers=N",
    )
    parser.add_argument("--epochs", type=int, default=0, help="also train whole runs of this many epochs")
    parser.add_argument("--fp32-run", action="store_true", help="with --epochs: also a whole run of ours in fp32")
    parser.add_argument("--skip-ultralytics", action="store_true")
    parser.add_argument("--ultralytics-model", default="yolo11n.yaml")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "runs" / "bench_train",
        help="dataset copies, fonts and the runs (cleared of old runs first)",
    )
    return parser.parse_args()


def run_json(command: list[str], env: dict | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def variant_flags(variant: str) -> list[str]:
    """'amp=off,compile' -> ['--amp', 'off', '--compile']."""
    flags = []
    for item in variant.split(","):
        name, _, value = item.partition("=")
        flags += [f"--{name}", value] if value else [f"--{name}"]
    return flags


def step_bench(args: argparse.Namespace, ref_python: Path | None, ref_data: Path | None, nc: int, env: dict) -> None:
    common = [
        "--cfg",
        args.cfg,
        "--imgsz",
        str(args.imgsz),
        "--batch",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    ours = [sys.executable, "benchmarks/harness_ours.py", "steps", "--data", args.data, *common]
    configs = {"ours": ours, **{f"ours {variant}": [*ours, *variant_flags(variant)] for variant in args.ours_variants}}
    if ref_python is not None:
        configs["yolov5"] = [
            str(ref_python),
            str(REPO / "benchmarks" / "harness_yolov5.py"),
            "steps",
            "--data-dir",
            str(ref_data.parent),
            "--nc",
            str(nc),
            *common,
        ]
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
        for name in order:
            results[name].append(run_json(configs[name], env if name == "yolov5" else None))
            images_per_s = results[name][-1]["images"] / sum(results[name][-1]["phases"].values())
            print(f"  round {repeat + 1}/{args.repeats}: {name:24s} {images_per_s:6.1f} img/s", flush=True)

    print(
        f"\n{args.cfg[:-5]}, {args.imgsz} px, batch {args.batch}, {args.workers} workers; {args.steps} timed "
        f"micro-batches per run, median of {args.repeats} alternating runs; ms per micro-batch\n"
    )
    print(
        "| framework | precision | torch threads | img/s | vs yolov5 | data wait | forward+loss | backward "
        "| optimizer | EMA | data share | peak RSS (MiB) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    speeds = {
        name: statistics.median(r["images"] / sum(r["phases"].values()) for r in runs) for name, runs in results.items()
    }
    for name, runs in results.items():
        median_run = sorted(runs, key=lambda r: r["images"] / sum(r["phases"].values()))[len(runs) // 2]
        per_batch_ms = {p: 1e3 * median_run["phases"][p] / args.steps for p in PHASES}
        total = sum(per_batch_ms.values())
        versus = f"{speeds[name] / speeds['yolov5']:.2f}x" if "yolov5" in speeds else "-"
        print(
            f"| {name} | {median_run['precision']} | {median_run['threads']} | {speeds[name]:.1f} | {versus} | "
            + " | ".join(f"{per_batch_ms[p]:.1f}" for p in PHASES)
            + f" | {100 * per_batch_ms['data'] / total:.1f}% | {median_run['peak_rss_mib']:.0f} |"
        )


def epoch_bench(args: argparse.Namespace, ref_venv: Path | None, ref_data: Path | None, env: dict) -> None:
    runs_dir = args.workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    common = [
        "--epochs",
        str(args.epochs),
        "--imgsz",
        str(args.imgsz),
        "--batch-size",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--project",
        str(runs_dir),
        "--exist-ok",
    ]
    commands = {
        "ours": (
            [
                sys.executable,
                "train.py",
                "--data",
                args.data,
                "--cfg",
                args.cfg,
                "--name",
                "ours",
                "--no-plots",
                *common,
            ],
            runs_dir / "ours",
            None,
        )
    }
    if args.fp32_run:
        commands["ours fp32"] = (
            [
                sys.executable,
                "train.py",
                "--data",
                args.data,
                "--cfg",
                args.cfg,
                "--name",
                "ours_fp32",
                "--no-plots",
                "--amp",
                "off",
                *common,
            ],
            runs_dir / "ours_fp32",
            None,
        )
    if ref_venv is not None:
        commands["yolov5"] = (
            [
                str(ref_venv / "bin" / "yolov5"),
                "train",
                "--data",
                str(ref_data),
                "--cfg",
                args.cfg,
                "--weights",
                "",
                "--name",
                "yolov5",
                "--noplots",
                *common,
            ],
            runs_dir / "yolov5",
            env,
        )
        if (ref_venv / "bin" / "yolo").exists() and not args.skip_ultralytics:
            commands["ultralytics"] = (
                [
                    str(ref_venv / "bin" / "yolo"),
                    "train",
                    f"model={args.ultralytics_model}",
                    f"data={ref_data}",
                    f"epochs={args.epochs}",
                    f"imgsz={args.imgsz}",
                    f"batch={args.batch}",
                    f"workers={args.workers}",
                    "device=cpu",
                    "pretrained=False",
                    f"project={runs_dir}",
                    "name=ultralytics",
                    "exist_ok=True",
                    "plots=False",
                ],
                runs_dir / "ultralytics",
                env,
            )
    results = {}
    for name, (command, run_dir, run_env) in commands.items():
        results[name] = timed_run(name, command, run_dir, run_env)

    target = results["yolov5"]["map50_95"][-1] if "yolov5" in results else None
    print(
        f"\n{args.epochs} epochs from scratch, {args.cfg[:-5]} (ultralytics: {args.ultralytics_model}), "
        f"{args.imgsz} px, batch {args.batch}, {args.workers} workers; times are wall clock since launch\n"
    )
    print(
        "| run | s to last epoch | s per epoch | final mAP@0.5 | final mAP@0.5:0.95 | best mAP@0.5:0.95 "
        "| s to reach yolov5's final mAP@0.5:0.95 | share of yolov5's time |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, r in results.items():
        reach, share = "-", "-"
        if target is not None:
            reached = [t for t, m in zip(r["times"], r["map50_95"]) if m >= target]
            if reached:
                reach = f"{reached[0]:.0f} (epoch {r['times'].index(reached[0])})"
                share = f"{reached[0] / results['yolov5']['times'][-1]:.2f}"
            else:
                reach = "not reached"
        print(
            f"| {name} | {r['times'][-1]:.0f} | {r['times'][-1] / len(r['times']):.1f} | {r['map50'][-1]:.3f} | "
            f"{r['map50_95'][-1]:.3f} | {max(r['map50_95']):.3f} | {reach} | {share} |"
        )

    print(f"\nValidation speed: load, loader, inference, NMS and metrics, {args.batch * 2} images per batch\n")
    print("| validator | weights | images/s | mAP@0.5 | mAP@0.5:0.95 |")
    print("|---|---|--:|--:|--:|")
    common = ["--imgsz", str(args.imgsz), "--batch", str(args.batch * 2), "--workers", str(args.workers)]
    rows = [
        (
            "ours",
            "ours best.pt",
            [
                sys.executable,
                "benchmarks/harness_ours.py",
                "val",
                "--data",
                args.data,
                "--weights",
                str(runs_dir / "ours" / "weights" / "best.pt"),
                *common,
            ],
            None,
        )
    ]
    if "yolov5" in results:
        v5_best = str(runs_dir / "yolov5" / "weights" / "best.pt")
        rows += [
            (
                "ours",
                "yolov5 best.pt",
                [
                    sys.executable,
                    "benchmarks/harness_ours.py",
                    "val",
                    "--data",
                    args.data,
                    "--weights",
                    v5_best,
                    "--trust-pickle",
                    *common,
                ],
                None,
            ),
            (
                "yolov5",
                "yolov5 best.pt",
                [
                    str(ref_venv / "bin" / "python"),
                    str(REPO / "benchmarks" / "harness_yolov5.py"),
                    "val",
                    "--data-yaml",
                    str(ref_data),
                    "--weights",
                    v5_best,
                    *common,
                ],
                env,
            ),
        ]
    for validator, weights, command, run_env in rows:
        r = run_json(command, run_env)
        print(
            f"| {validator} ({r['precision']}) | {weights} | {r['images'] / r['seconds']:.1f} | {r['map50']:.3f} | "
            f"{r['map50_95']:.3f} |"
        )


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = reference_environment(args.workdir)
    ref_python = ref_data = None
    nc = load_dataset_config(args.data).nc
    if args.ref_venv is not None:
        ref_python = args.ref_venv / "bin" / "python"
        if not ref_python.exists():
            raise SystemExit(f"--ref-venv {args.ref_venv}: no bin/python there (see this script's docstring)")
        ref_data, nc = reference_dataset(args.data, args.workdir)
    print(f"{os.cpu_count()} CPUs; {args.workdir}", flush=True)
    if args.steps > 0:
        step_bench(args, ref_python, ref_data, nc, env)
    if args.epochs > 0:
        epoch_bench(args, args.ref_venv, ref_data, env)


if __name__ == "__main__":
    main()
