"""The data path at COCO's scale, ours against the `yolov5` and `ultralytics` packages' own loaders.

    python benchmarks/bench_scale.py --root /data/coco_like --ref-venv ~/refvenv            # 118,287 images
    python benchmarks/bench_scale.py --root /tmp/coco_small --images 2000 --ref-venv ~/refvenv

Generates a COCO-shaped dataset into --root once (benchmarks/coco_like.py; reused when present),
then measures, each implementation in fresh processes (benchmarks/harness_loader.py; the
references run by the reference venv's python, never imported here), on the same files:

- the label scan: cold (no label cache, the files dropped from the page cache) and warm (cache
  present), and the cache file's size;
- the dataset's own memory per image (tracemalloc: what every DataLoader worker inherits);
- the training loader, 640 px, each package's default augmentation (mosaic on), no image cache,
  the files dropped from the page cache first (posix_fadvise DONTNEED after a sync: no root
  needed): images/s with 1 worker over --items images, and the worker's memory after its
  warm-up and at the end (VmRSS, and private bytes: the copy-on-read growth of the dataset's
  Python objects shows there); then images/s with 2 workers; and ours with 1 worker and the hyp's
  mosaic_pool 16 (mosaic partners drawn from a pool of 16 images in the batch, each decoded once);
- ours only: the seconds from `python train.py` to its first optimizer step (label caches warm),
  and from `--resume` of a checkpoint at 90% of an epoch to its first step
  (benchmarks/first_step.py; --first-step-cfg, at --imgsz with a batch of 16, no image cache).

The references read the dataset through symlinks from a folder of their own under --workdir, so
their label caches (which both name labels/train2017.cache) neither clash nor enter --root.
Prints a table and writes every figure, with the CPU, to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.coco_like import COCO_TRAIN, generate  # noqa: E402
from benchmarks.first_step import first_steps  # noqa: E402
from benchmarks.references import reference_environment  # noqa: E402
from utils.resources import usable_cpu_count  # noqa: E402

HARNESS = REPO / "benchmarks" / "harness_loader.py"
POOL = 16  # the mosaic_pool of ours' extra loader row
REFERENCES = ("yolov5", "ultralytics")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="where the COCO-shaped dataset is (or is generated)")
    p.add_argument("--images", type=int, default=COCO_TRAIN, help="train images (val: COCO's share of them)")
    p.add_argument("--ref-venv", type=Path, default=None, help="venv with yolov5 and ultralytics (else ours only)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_scale"))
    p.add_argument("--items", type=int, default=10_000, help="images through the 1-worker loader")
    p.add_argument("--items-2-workers", type=int, default=2_000, help="images through the 2-worker loader (0: none)")
    p.add_argument("--items-pooled", type=int, default=2_000, help=f"ours with mosaic_pool {POOL}, 1 worker (0: none)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--first-step-cfg", default="yolov5n.yaml", help="the model train.py's first-step times use")
    p.add_argument("--no-first-step", action="store_true", help="leave out train.py's first-step times")
    p.add_argument("--json", type=Path, default=None, help="default: WORKDIR/bench_scale.json")
    return p.parse_args()


def cpu() -> dict:
    """The CPU's model name, its SIMD flags that matter to decoding and warping, and the cores usable."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        label, _, value = line.partition(":")
        fields.setdefault(label.strip(), value.strip())
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "sse4", "f16c", "fma")))
    return {"model": fields.get("model name", platform.processor()), "flags": flags, "cores": usable_cpu_count()}


def drop_from_page_cache(folders: list[Path]) -> float:
    """Drop every file below `folders` from the page cache (written back first: dirty pages stay);
    returns the seconds it took."""
    started = time.perf_counter()
    os.sync()
    for folder in folders:
        for dirpath, _, files in os.walk(folder, followlinks=True):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return time.perf_counter() - started


def reference_mirror(root: Path, workdir: Path, impl: str) -> Path:
    """A folder for one reference: images/ and labels/ of each split symlinked to --root's, its own
    data.yaml; the reference's label cache lands in the mirror's own labels/ folder."""
    mirror = workdir / f"data_{impl}"
    for kind in ("images", "labels"):
        (mirror / kind).mkdir(parents=True, exist_ok=True)
        for split in ("train2017", "val2017"):
            link = mirror / kind / split
            if not link.is_symlink():
                link.symlink_to(root / kind / split, target_is_directory=True)
    data = yaml.safe_load((root / "data.yaml").read_text())
    (mirror / "data.yaml").write_text(yaml.safe_dump({**data, "path": str(mirror)}))
    return mirror / "data.yaml"


class Runner:
    """Runs harness_loader.py for one implementation with its python, data and environment."""

    def __init__(self, impl: str, python: str, data_yaml: Path, env: dict, workdir: Path):
        self.impl, self.python, self.data_yaml, self.env, self.workdir = impl, python, data_yaml, env, workdir

    def __call__(self, measure: str, *extra: str) -> dict:
        command = [self.python, str(HARNESS), self.impl, measure, "--data", str(self.data_yaml), *extra]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, cwd=self.workdir)
        if done.returncode != 0:
            raise SystemExit(f"{self.impl} {measure} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def cache_files(self) -> list[Path]:
        if self.impl == "ours":
            return list((Path(self.env["EMA_YOLO_CACHE_DIR"]) / "labels").glob("*"))
        return list((self.data_yaml.parent / "labels").glob("*.cache"))


def measure(runner: Runner, root: Path, opt: argparse.Namespace) -> dict:
    folders = [root / "images" / "train2017", root / "labels" / "train2017"]
    for cache in runner.cache_files():
        cache.unlink()
    figures = {"drop_seconds": drop_from_page_cache(folders)}
    figures["scan_cold"] = runner("scan")
    figures["scan_warm"] = runner("scan")
    figures["memory"] = runner("memory")
    log = runner.workdir / f"memory_{runner.impl}.jsonl"
    for workers, items in [(1, opt.items)] + ([(2, opt.items_2_workers)] if opt.items_2_workers else []):
        log.unlink(missing_ok=True)
        drop_from_page_cache(folders)
        options = ("--workers", str(workers), "--items", str(items), "--imgsz", str(opt.imgsz))
        figures[f"loader_{workers}"] = runner("loader", *options, "--memory-log", str(log))
    if runner.impl == "ours" and opt.items_pooled:  # with mosaic pools (each image decoded once a batch)
        drop_from_page_cache(folders)
        options = ("--workers", "1", "--items", str(opt.items_pooled), "--imgsz", str(opt.imgsz))
        figures["loader_1_pooled"] = runner("loader", *options, "--mosaic-pool", str(POOL))
    return figures


def table(results: dict[str, dict]) -> str:
    def growth(loader: dict, key: str) -> str:
        (worker,) = loader["memory"][:1] or [None]
        if worker is None:
            return "-"
        first, last = worker["first"][key], worker["last"][key]
        return f"{first / 2**20:.0f} -> {last / 2**20:.0f} MiB ({100 * (last - first) / first:+.1f}%)"

    base = results.get("yolov5")
    rows = [
        "| measure | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
        "| label scan, cold (s) | " + " | ".join(f"{r['scan_cold']['seconds']:.1f}" for r in results.values()) + " |",
        "| label scan, warm (s) | " + " | ".join(f"{r['scan_warm']['seconds']:.2f}" for r in results.values()) + " |",
        "| label cache (MB) | "
        + " | ".join(f"{r['scan_warm']['cache_bytes'] / 1e6:.3g}" for r in results.values())
        + " |",
        "| dataset bytes per image | "
        + " | ".join(f"{r['memory']['bytes_per_image']:.0f}" for r in results.values())
        + " |",
    ]
    for workers in (1, 2):
        key = f"loader_{workers}"
        if key not in next(iter(results.values())):  # --items-2-workers 0
            continue
        cells = []
        for r in results.values():
            speed = r[key]["images_per_s"]
            ratio = f" ({speed / base[key]['images_per_s']:.2f}x)" if base else ""
            cells.append(f"{speed:.1f}{ratio}")
        rows.append(f"| loader images/s, {workers} worker{'s' * (workers > 1)} | " + " | ".join(cells) + " |")
        if workers == 1 and "loader_1_pooled" in results["ours"]:
            speed, others = results["ours"]["loader_1_pooled"]["images_per_s"], " | -" * (len(results) - 1)
            ratio = f" ({speed / base[key]['images_per_s']:.2f}x)" if base else ""
            rows.append(f"| loader images/s, 1 worker, ours with mosaic_pool {POOL} | {speed:.1f}{ratio}{others} |")
    first = results["ours"].get("first_step")
    if first:
        others = " | -" * (len(results) - 1)
        rows.append(f"| train.py to its first optimizer step (s) | {first['fresh_s']:.1f}{others} |")
        rows.append(f"| --resume at 90% of an epoch to its first step (s) | {first['resume_90_s']:.1f}{others} |")
    for key, name in (("rss", "VmRSS"), ("private", "private")):
        rows.append(
            f"| worker {name}, warm-up -> end of 1-worker run | "
            + " | ".join(growth(r["loader_1"], key) for r in results.values())
            + " |"
        )
    return "\n".join(rows)


def main() -> None:
    opt = parse_args()
    opt.workdir.mkdir(parents=True, exist_ok=True)
    workdir = opt.workdir.resolve()
    started = time.perf_counter()
    data_yaml = generate(opt.root.resolve(), opt.images)
    print(f"dataset: {data_yaml} ({time.perf_counter() - started:.0f} s to generate or find)", flush=True)
    root = data_yaml.parent
    ours_env = {**os.environ, "EMA_YOLO_CACHE_DIR": str(workdir / "cache_ours"), "PYTHONWARNINGS": "ignore"}
    runners = [Runner("ours", sys.executable, data_yaml, ours_env, workdir)]
    if opt.ref_venv:
        env = reference_environment(workdir)
        python = str(opt.ref_venv / "bin" / "python")
        runners += [Runner(impl, python, reference_mirror(root, workdir, impl), env, workdir) for impl in REFERENCES]
    results = {}
    for runner in runners:
        print(f"measuring {runner.impl} ...", flush=True)
        results[runner.impl] = measure(runner, root, opt)
    if not opt.no_first_step:
        print("measuring train.py's first steps ...", flush=True)
        results["ours"]["first_step"] = first_steps(
            data_yaml, workdir, ours_env, cfg=opt.first_step_cfg, imgsz=opt.imgsz, batch=16
        )
    report = {
        "cpu": cpu(),
        "platform": platform.platform(),
        "images": opt.images,
        "imgsz": opt.imgsz,
        "items": opt.items,
        "page_cache": "files dropped with posix_fadvise(DONTNEED) before each cold scan and each loader run",
        "results": results,
    }
    out = opt.json or workdir / "bench_scale.json"
    out.write_text(json.dumps(report, indent=1))
    machine = report["cpu"]
    print(f"\nCPU: {machine['model']}, {machine['cores']} cores ({' '.join(machine['flags'])})")
    print(f"{opt.images} train images at {opt.imgsz} px, files dropped from the page cache before each run\n")
    print(table(results))
    print(f"\nfigures: {out}")


if __name__ == "__main__":
    main()
