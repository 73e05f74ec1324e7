"""This framework's side of bench_train.py; prints one JSON line.

    python benchmarks/harness_ours.py steps --cfg yolov5n.yaml --imgsz 320 --batch 16 --workers 2
    python benchmarks/harness_ours.py val --weights best.pt [--trust-pickle]

`steps`: what train.py builds (loader, model, optimizer, EMA, loss, precision), stepped as
train.py steps at the full accumulation (warmup is left out here and in the yolov5 harness),
timed per phase. `val`: val.py's work (load, loader, inference, NMS, metrics), timed whole.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.parse import read_model_yaml  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from train import seed_everything  # noqa: E402
from utils.dataset import build_train_loader  # noqa: E402
from utils.checkpoint import load_for_inference  # noqa: E402
from utils.config_files import resolve_config_path  # noqa: E402
from utils.data_config import load_dataset_config  # noqa: E402
from utils.device import amp_dtype_for, autocast, describe_precision, to_model_input  # noqa: E402
from utils.ema import ModelEMA, pack_state  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.loss import DetectionLoss  # noqa: E402
from utils.optim import (  # noqa: E402
    NOMINAL_BATCH_SIZE,
    accumulation_steps,
    build_optimizer,
    optimizer_step,
)
from val import build_val_loader, evaluate  # noqa: E402


class TimedEMA(ModelEMA):
    """ModelEMA that adds the time of each update to `seconds` (optimizer_step calls update itself)."""

    seconds = 0.0

    def update(self, model: torch.nn.Module) -> None:
        started = time.perf_counter()
        super().update(model)
        self.seconds += time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("steps", "val"))
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--hyp", default="scratch-low.yaml")
    parser.add_argument("--optimizer", default="SGD")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=8, help="untimed micro-batches first")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--cache", default="auto", choices=("auto", "ram", "off"))
    parser.add_argument("--compile", action="store_true", help="steps: run the forward through torch.compile")
    parser.add_argument("--no-channels-last", action="store_true", help="steps: keep the model and inputs NCHW")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    parser.add_argument("--weights", help="val: the checkpoint to evaluate")
    parser.add_argument("--trust-pickle", action="store_true", help="val: --weights is a YOLOv5 checkpoint")
    return parser.parse_args()


def time_steps(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    amp_dtype = amp_dtype_for(device, enabled=not args.no_amp)
    hyp = load_hyp(args.hyp)
    data = load_dataset_config(args.data)
    seed_everything(0)
    model = DetectionModel(read_model_yaml(resolve_config_path(args.cfg, "models")), nc=data.nc)
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model.to(device, memory_format=memory_format)
    pack_state(model)
    loader = build_train_loader(data, hyp, args.imgsz, args.batch, args.workers, seed=0, single_cls=False,
                                cache=args.cache, pin_memory=False, report_path=None, epochs=1000)
    accumulate = accumulation_steps(args.batch)
    optimizer = build_optimizer(model, args.optimizer, hyp["lr0"], hyp["momentum"],
                                hyp["weight_decay"] * args.batch * accumulate / NOMINAL_BATCH_SIZE)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ema = TimedEMA(model, decay=hyp["ema_decay"], tau=hyp["ema_tau"])
    criterion = DetectionLoss(model.detect_head, hyp, args.imgsz)
    forward = torch.compile(model) if args.compile else model
    first_batch_seconds = None
    phases = {"data": 0.0, "forward_loss": 0.0, "backward": 0.0, "optimizer": 0.0, "ema": 0.0}
    model.train()
    epoch, batches = 0, iter(loader)
    timed_images = 0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            batches = iter(loader)
            batch = next(batches)
        t1 = time.perf_counter()
        images = to_model_input(batch.images, device).contiguous(memory_format=memory_format)
        with autocast(device, amp_dtype):
            raw = forward(images)
        loss, _ = criterion(raw, batch.targets)
        t2 = time.perf_counter()
        scaler.scale(loss).backward()
        t3 = time.perf_counter()
        ema_before = ema.seconds
        if (i + 1) % accumulate == 0 and not optimizer_step(optimizer, scaler, model, ema):
            raise SystemExit("non-finite gradient")
        t4 = time.perf_counter()
        if i == 0:
            first_batch_seconds = t4 - t0
        if i >= args.warmup:
            timed_images += images.shape[0]
            ema_seconds = ema.seconds - ema_before
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3 - ema_seconds, ema_seconds)):
                phases[name] += seconds
    return {"precision": describe_precision(amp_dtype) + (" + compile" if args.compile else ""), "images": timed_images,
            "phases": phases, "first_batch_seconds": first_batch_seconds}


def time_validation(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    started = time.perf_counter()
    checkpoint, model = load_for_inference(args.weights, "ema", device, trust_pickle=args.trust_pickle)
    data = load_dataset_config(args.data)
    amp_dtype = amp_dtype_for(device, enabled=not args.no_amp)
    loader = build_val_loader(data.val, data.nc, args.imgsz, args.batch, args.workers, checkpoint["hyp"],
                              int(model.stride.max()))
    metrics = evaluate(model, loader, device=device, amp_dtype=amp_dtype).metrics
    return {"precision": describe_precision(amp_dtype), "images": len(loader.dataset),
            "seconds": time.perf_counter() - started, "map50": metrics.map50, "map50_95": metrics.map50_95}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = time_steps(args) if args.mode == "steps" else time_validation(args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"framework": "ours", "threads": torch.get_num_threads(), "peak_rss_mib": peak_mib, **result}))


if __name__ == "__main__":
    main()
