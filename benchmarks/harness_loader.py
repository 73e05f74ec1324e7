"""One loader, one measure, in a fresh process: bench_scale.py's side of each implementation. Run by
this project's python for `ours` and by the reference venv's python for `yolov5` and `ultralytics`
(their packages are only imported there, never into ours); prints one JSON line.

    python harness_loader.py ours scan --data DIR/data.yaml              # label scan (cold or warm: the caller
    python harness_loader.py yolov5 memory --data DIR/data.yaml          #   decides by the caches present)
    python harness_loader.py ultralytics loader --data DIR/data.yaml --workers 1 --items 10000

scan: seconds to list and verify the train split (through the cache when one is there) and the
cache's size. memory: bytes the dataset object holds per image (tracemalloc, numpy included),
built from a warm cache. loader: the training loader at `--imgsz` with each package's default
augmentation (mosaic on, no image cache, shuffled): images/s after the first `--warmup` batches,
and each worker's memory (VmRSS and private bytes, from /proc) after its first `--warmup`
batches and at the end, read inside the worker.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=("ours", "yolov5", "ultralytics"))
    p.add_argument("measure", choices=("scan", "memory", "loader"))
    p.add_argument("--data", type=Path, required=True, help="dataset YAML (train: images/train2017)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--items", type=int, default=2000, help="loader: images to load after the warm-up")
    p.add_argument("--warmup", type=int, default=4, help="loader: batches before timing starts")
    p.add_argument("--memory-log", type=Path, help="loader: where workers append their memory readings")
    p.add_argument("--mosaic-pool", type=int, default=None, help="ours: the hyp's mosaic_pool instead of its default")
    return p.parse_args()


def train_images(data_yaml: Path) -> Path:
    import yaml

    data = yaml.safe_load(data_yaml.read_text())
    return Path(data["path"]) / data["train"]


def memory_of_this_process() -> dict:
    """VmRSS and private (not shared with the parent) bytes of this process."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {"rss": fields["Rss"], "private": fields["Private_Clean"] + fields["Private_Dirty"]}


# --- the three implementations: (dataset, loader) --------------------------------------------


def ours(args: argparse.Namespace, loader: bool):
    from utils.data.config import load_dataset_config
    from utils.data.dataset import DetectionDataset
    from utils.data.labels import scan_split
    from utils.data.loader import build_train_loader
    from utils.hyp import load_hyp

    data = load_dataset_config(str(args.data))
    scan = scan_split(data.train, data.nc, prefix="train: ")
    hyp = load_hyp(None)
    if args.mosaic_pool is not None:
        hyp["mosaic_pool"] = args.mosaic_pool
    dataset = DetectionDataset(scan, args.imgsz, hyp, augment=True, seed=0)
    if not loader:
        return dataset, None
    return dataset, build_train_loader(dataset, batch_size=args.batch, workers=args.workers, seed=0, pin_memory=False)


def yolov5(args: argparse.Namespace, loader: bool):
    import yaml
    from yolov5.utils.dataloaders import LoadImagesAndLabels, create_dataloader

    hyp_file = Path(sys.modules["yolov5"].__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml"
    hyp = yaml.safe_load(hyp_file.read_text())
    images = str(train_images(args.data))
    if not loader:
        return LoadImagesAndLabels(images, args.imgsz, args.batch, augment=True, hyp=hyp, prefix="train: "), None
    dataloader, dataset = create_dataloader(
        images, args.imgsz, args.batch, 32, hyp=hyp, augment=True, workers=args.workers, shuffle=True, prefix="train: "
    )
    return dataset, dataloader


def ultralytics(args: argparse.Namespace, loader: bool):
    import yaml
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader, build_yolo_dataset

    names = yaml.safe_load(args.data.read_text())["names"]
    data = {"names": names, "nc": len(names), "channels": 3}
    cfg = get_cfg(overrides={"imgsz": args.imgsz, "workers": args.workers, "cache": False, "task": "detect"})
    dataset = build_yolo_dataset(cfg, str(train_images(args.data)), args.batch, data, mode="train")
    if not loader:
        return dataset, None
    return dataset, build_dataloader(dataset, args.batch, args.workers, shuffle=True, pin_memory=False, device="cpu")


IMPLS = {"ours": ours, "yolov5": yolov5, "ultralytics": ultralytics}
DATASET_CLASSES = {
    "ours": ("utils.data.dataset", "DetectionDataset"),
    "yolov5": ("yolov5.utils.dataloaders", "LoadImagesAndLabels"),
    "ultralytics": ("ultralytics.data.dataset", "YOLODataset"),
}
MODULES = {  # imported before anything is timed
    "ours": ("utils.data.config", "utils.data.dataset", "utils.data.labels", "utils.data.loader", "utils.hyp"),
    "yolov5": ("yolov5.utils.dataloaders",),
    "ultralytics": ("ultralytics.cfg", "ultralytics.data.build"),
}


def cache_files(impl: str, data_yaml: Path) -> list[Path]:
    """Where each implementation keeps its label cache for the train split."""
    labels = train_images(data_yaml).parent.parent / "labels"
    if impl != "ours":
        return [labels / (train_images(data_yaml).name + ".cache")]
    from utils.data.label_cache import cache_path_for

    return [cache_path_for([train_images(data_yaml)])]


# --- the measures ------------------------------------------------------------------------------


def measure_scan(args: argparse.Namespace) -> dict:
    caches = cache_files(args.impl, args.data)
    had_cache = all(c.exists() for c in caches)
    started = time.perf_counter()
    dataset, _ = IMPLS[args.impl](args, loader=False)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "images": len(dataset),
        "warm": had_cache,
        "cache_bytes": sum(c.stat().st_size for c in caches if c.exists()),
    }


def measure_memory(args: argparse.Namespace) -> dict:
    IMPLS[args.impl](args, loader=False)  # imports and caches in place: only the dataset is measured next
    tracemalloc.start()
    dataset, _ = IMPLS[args.impl](args, loader=False)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"bytes_per_image": held / len(dataset), "images": len(dataset)}


def endless(loader):
    """Batches of one epoch after another (ours ends each epoch; the references' loaders never do)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_loader(args: argparse.Namespace) -> dict:
    log = args.memory_log
    every = max(args.batch * args.warmup, 1)
    module, name = DATASET_CLASSES[args.impl]
    cls = getattr(importlib.import_module(module), name)  # patched before any loader forks its workers
    plain = cls.__getitem__

    def probed(self, index):  # runs in the worker (fork): its own memory, after every `every` items
        item = plain(self, index)
        probed.count += 1
        if log is not None and probed.count % every == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "items": probed.count, **memory_of_this_process()}) + "\n")
        return item

    probed.count = 0
    cls.__getitem__ = probed
    _, loader = IMPLS[args.impl](args, loader=True)
    batches = endless(loader)
    for _ in range(args.warmup):
        next(batches)
    started, images = time.perf_counter(), 0
    while images < args.items:
        batch = next(batches)
        images += len(batch[0]) if args.impl != "ultralytics" else len(batch["img"])
    seconds = time.perf_counter() - started
    readings = [json.loads(line) for line in log.read_text().splitlines()] if log and log.exists() else []
    workers = {}
    for r in readings:
        workers.setdefault(r["pid"], []).append(r)
    memory = [
        {"first": rs[0], "last": rs[-1]} for rs in (sorted(v, key=lambda r: r["items"]) for v in workers.values())
    ]
    return {"images_per_s": images / seconds, "images": images, "workers": args.workers, "memory": memory}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if args.impl == "ours":  # never ahead of a reference package's own modules
        sys.path.insert(0, str(REPO))
    for module in MODULES[args.impl]:
        importlib.import_module(module)
    measure = {"scan": measure_scan, "memory": measure_memory, "loader": measure_loader}[args.measure]
    result = measure(args)
    print(json.dumps({"impl": args.impl, "measure": args.measure, **result}), flush=True)


if __name__ == "__main__":
    main()
