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
from models.yolo import build_model  # noqa: E402
from utils.checkpoint.format import load_for_inference, trained_amp  # noqa: E402
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.loader import build_train_dataset, build_train_loader, build_val_loader  # noqa: E402
from utils.device import autocast, to_model_input  # noqa: E402
from utils.dist import World  # noqa: E402
from utils.eval.evaluate import evaluate  # noqa: E402
from utils.hyp import load_hyp  # noqa: E402
from utils.precision import add_amp_arguments, describe, inference_precision  # noqa: E402
from utils.train.criterion import build_criterion  # noqa: E402
from utils.train.ema import ModelEMA  # noqa: E402
from utils.train.optim import NOMINAL_BATCH_SIZE, accumulation_steps, build_optimizer  # noqa: E402
from utils.train.precision import training_precision  # noqa: E402
from utils.train.rng import seed_everything  # noqa: E402
from utils.train.step import optimizer_step  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("steps", "val"))
    parser.add_argument("--data", default="data/shapes.yaml")
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--hyp", default=None, help="default: the model head's recipe")
    parser.add_argument("--optimizer", default="SGD")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=8, help="untimed micro-batches first")
    add_amp_arguments(parser, default=None, auto="as train.py and val.py choose it")
    parser.add_argument("--cache", default="auto", choices=("auto", "ram", "off"))
    parser.add_argument("--compile", action="store_true", help="steps: run the forward through torch.compile")
    parser.add_argument("--no-channels-last", action="store_true", help="steps: keep the model and inputs NCHW")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    parser.add_argument("--weights", help="val: the checkpoint to evaluate")
    parser.add_argument("--trust-pickle", action="store_true", help="val: --weights is a pickled checkpoint")
    return parser.parse_args()


def time_steps(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    data = load_dataset_config(args.data)
    seed_everything(0)
    model = build_model(args.cfg, nc=data.nc)
    hyp = load_hyp(args.hyp, anchor_free=model.anchor_free)
    precision = training_precision(
        args.amp or "auto",
        model,
        hyp,
        img_size=args.imgsz,
        batch=args.batch,
        optimizer=args.optimizer,
        device=device,
        weights_dtype=torch.float32,
        world=World(),
    )
    amp_dtype = precision.dtype
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model.to(device, memory_format=memory_format)
    dataset = build_train_dataset(
        data, hyp, img_size=args.imgsz, seed=0, single_cls=False, cache=args.cache, epochs=1000
    )
    loader = build_train_loader(dataset, batch_size=args.batch, workers=args.workers, seed=0, pin_memory=False)
    accumulate = accumulation_steps(args.batch)
    optimizer = build_optimizer(
        model,
        args.optimizer,
        hyp["lr0"],
        hyp["momentum"],
        hyp["weight_decay"] * args.batch * accumulate / NOMINAL_BATCH_SIZE,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ema = ModelEMA(model, decay=hyp["ema_decay"], tau=hyp["ema_tau"])
    criterion = build_criterion(model, hyp, args.imgsz)
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
        if (i + 1) % accumulate == 0 and not optimizer_step(optimizer, scaler, model):
            raise SystemExit("non-finite gradient")
        t4 = time.perf_counter()
        if (i + 1) % accumulate == 0:
            ema.update(model)
        t5 = time.perf_counter()
        if i == 0:
            first_batch_seconds = t5 - t0
        if i >= args.warmup:
            timed_images += images.shape[0]
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[name] += seconds
    return {
        "precision": describe(precision) + (" + compile" if args.compile else ""),
        "precision_reason": precision.reason,
        "images": timed_images,
        "phases": phases,
        "first_batch_seconds": first_batch_seconds,
    }


def time_validation(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    started = time.perf_counter()
    checkpoint, model = load_for_inference(args.weights, "ema", device, trust_pickle=args.trust_pickle)
    data = load_dataset_config(args.data)
    precision = inference_precision(
        trained_amp(checkpoint), model, device, batch=args.batch, img_size=args.imgsz, requested=args.amp
    )
    loader = build_val_loader(
        data.val,
        data.nc,
        img_size=args.imgsz,
        batch_size=args.batch,
        workers=args.workers,
        hyp=checkpoint["hyp"],
        stride=int(model.stride.max()),
    )
    metrics = evaluate(model, loader, device=device, amp_dtype=precision.dtype).metrics
    return {
        "precision": describe(precision),
        "precision_reason": precision.reason,
        "images": len(loader.dataset),
        "seconds": time.perf_counter() - started,
        "map50": metrics.map50,
        "map50_95": metrics.map50_95,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = time_steps(args) if args.mode == "steps" else time_validation(args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"framework": "ours", "threads": torch.get_num_threads(), "peak_rss_mib": peak_mib, **result}))


if __name__ == "__main__":
    main()
