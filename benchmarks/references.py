"""What the side-by-side benchmarks share: the reference packages' environment and dataset copy,
and whole training runs timed epoch by epoch through their results.csv."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import matplotlib
import yaml

from utils.data.config import load_dataset_config

REPO = Path(__file__).resolve().parents[1]
MAP_COLUMNS = {"ours": "metrics/mAP_0.5:0.95", "yolov5": "metrics/mAP_0.5:0.95", "ultralytics": "metrics/mAP50-95(B)"}
MAP50_COLUMNS = {"ours": "metrics/mAP_0.5", "yolov5": "metrics/mAP_0.5", "ultralytics": "metrics/mAP50(B)"}


def reference_environment(workdir: Path) -> dict:
    """Environment for the reference CLIs: offline, fonts in place, pickled checkpoints allowed."""
    config_dir = workdir / "ref_config"
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in (config_dir, config_dir / "Ultralytics"):  # Ultralytics 8.4 reads its fonts from the subfolder
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (folder / name).exists():
                shutil.copy(font, folder / name)
    return {
        **os.environ,
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        "YOLOV5_CONFIG_DIR": str(config_dir),
        "YOLO_CONFIG_DIR": str(config_dir),
        "YOLO_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }


def reference_dataset(data_yaml: str, workdir: Path) -> tuple[Path, int]:
    """A copy of the dataset's train and val images and labels for the references, and its YAML."""
    data = load_dataset_config(data_yaml)
    root = workdir / "ref_data"
    for split, sources in (("train", data.train), ("val", data.val)):
        if len(sources) != 1 or not sources[0].is_dir():
            raise SystemExit(f"{data_yaml}: the bench needs one image folder per split")
        for kind, source in (("images", sources[0]), ("labels", sources[0].parent.parent / "labels" / split)):
            target = root / kind / split
            if not target.exists():
                shutil.copytree(source, target)
    yaml_path = root / "data.yaml"
    yaml_path.write_text(
        yaml.safe_dump(
            {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(data.names))},
            sort_keys=False,
        )
    )
    return yaml_path, data.nc


class CsvWatcher(threading.Thread):
    """Records the wall-clock time (since launch) at which each results.csv row appears."""

    def __init__(self, csv_path: Path, started: float):
        super().__init__(daemon=True)
        self.csv_path, self.started, self.times, self.done = csv_path, started, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if self.csv_path.exists():
                rows = self.csv_path.read_text().count("\n") - 1
                while len(self.times) < rows:
                    self.times.append(time.perf_counter() - self.started)
            time.sleep(0.2)


def timed_run(name: str, command: list[str], run_dir: Path, env: dict | None) -> dict:
    """Run a training command; return its results.csv rows with the time each appeared.
    `name` starts with the framework: ours, yolov5 or ultralytics."""
    framework = name.split()[0]
    log = run_dir.parent / f"{run_dir.name}.log"
    started = time.perf_counter()
    watcher = CsvWatcher(run_dir / "results.csv", started)
    watcher.start()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    total = time.perf_counter() - started
    watcher.done.set()
    watcher.join()
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    with open(run_dir / "results.csv") as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    map50_95 = [float(r[MAP_COLUMNS[framework]]) for r in rows]
    map50 = [float(r[MAP50_COLUMNS[framework]]) for r in rows]
    times = watcher.times + [total] * (len(rows) - len(watcher.times))
    print(
        f"  {name}: {len(rows)} epochs, {times[-1]:.0f} s to the last epoch's row, {total:.0f} s in all; "
        f"mAP@0.5:0.95 per epoch: {' '.join(f'{m:.3f}' for m in map50_95)}",
        flush=True,
    )
    return {"map50": map50, "map50_95": map50_95, "times": times, "total": total}
