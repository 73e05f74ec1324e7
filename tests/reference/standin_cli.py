"""Stand-ins for the reference packages' training commands, `yolov5 train ...` and `yolo train key=value ...`,
as benchmarks/bench_accuracy.py and bench_train.py run them: the options those pass are parsed (any other
is an error), and the run folder gets a results.csv with the package's mAP column names, one row per
epoch. Nothing is trained; the mAPs rise with the epoch. tests/test_benchmarks.py puts them in a
stand-in venv's bin/ as `yolov5` and `yolo`:

    python tests/reference/standin_cli.py yolov5 train --data D --cfg yolov5n.yaml --epochs 2 ...
    python tests/reference/standin_cli.py yolo train model=yolo11n.yaml data=D epochs=2 ...

Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# results.csv's mAP columns, as each package names them (benchmarks/references.py reads them)
COLUMNS = {
    "yolov5": ("metrics/mAP_0.5", "metrics/mAP_0.5:0.95"),
    "yolo": ("metrics/mAP50(B)", "metrics/mAP50-95(B)"),
}
YOLO_KEYS = {"model", "data", "epochs", "imgsz", "batch", "workers", "device", "pretrained", "cache", "project"}
YOLO_KEYS |= {"name", "exist_ok", "plots"}


def yolov5_run(args: list[str]) -> tuple[Path, int]:
    parser = argparse.ArgumentParser(prog="yolov5 train")
    for option in ("--data", "--cfg", "--weights", "--epochs", "--imgsz", "--batch-size", "--workers", "--device"):
        parser.add_argument(option)
    for option in ("--cache", "--project", "--name"):
        parser.add_argument(option)
    parser.add_argument("--exist-ok", action="store_true")
    parser.add_argument("--noplots", action="store_true")
    opt = parser.parse_args(args)
    return Path(opt.project) / opt.name, int(opt.epochs)


def yolo_run(args: list[str]) -> tuple[Path, int]:
    settings = dict(arg.split("=", 1) for arg in args)
    if unknown := set(settings) - YOLO_KEYS:
        raise SystemExit(f"yolo train: unknown keys {sorted(unknown)}")
    return Path(settings["project"]) / settings["name"], int(settings["epochs"])


def main(argv: list[str]) -> None:
    command, mode, *args = argv
    if mode != "train":
        raise SystemExit(f"{command} {mode}: the stand-in trains only")
    run_dir, epochs = yolov5_run(args) if command == "yolov5" else yolo_run(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *COLUMNS[command]])
        for epoch in range(epochs):
            progress = (epoch + 1) / epochs
            writer.writerow([epoch, 0.5 * progress, 0.3 * progress])


if __name__ == "__main__":
    main(sys.argv[1:])
