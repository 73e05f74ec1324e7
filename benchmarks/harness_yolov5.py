"""The `yolov5` PyPI package's side of bench_train.py (run by the reference venv's python); prints one JSON line.

    python harness_yolov5.py steps --data-dir DIR --nc 6 --cfg yolov5n.yaml --imgsz 320 --batch 16 --workers 2
    python harness_yolov5.py val --data-yaml DIR/data.yaml --weights best.pt --imgsz 320 --batch 32 --workers 2

`steps` builds what `yolov5 train` builds (Model, create_dataloader with hyp.scratch-low augmentation,
ComputeLoss with the same gain scaling, smart_optimizer SGD, ModelEMA) after importing yolov5's
train module first, so threads and OpenCV are set up exactly as its CLI sets them. The step
follows its loop: imgs.float() / 255, forward under its autocast (off on CPU: YOLOv5's AMP check
fails there), loss, backward, and every `accumulate` micro-batches unscale, clip to 10, step,
EMA update, timed per phase. `val` times yolov5.val.run (load, loader, inference, NMS, metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("steps", "val"))
    parser.add_argument("--data-dir", type=Path, help="steps: dataset root with images/train")
    parser.add_argument("--nc", type=int, help="steps: number of classes")
    parser.add_argument("--data-yaml", help="val: dataset YAML in the dataset's root DIR, above images/val")
    parser.add_argument("--weights", help="val: checkpoint")
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=8, help="untimed micro-batches first")
    return parser.parse_args()


def time_validation(args: argparse.Namespace) -> dict:
    import yolov5.val as v5val

    started = time.perf_counter()
    metrics = v5val.run(
        data=args.data_yaml,
        weights=args.weights,
        batch_size=args.batch,
        imgsz=args.imgsz,
        workers=args.workers,
        device="cpu",
        half=False,
        plots=False,
        project=str(Path(args.weights).parent / "val"),
    )[0]  # (P, R, mAP50, mAP50-95, *losses)
    map50, map50_95 = metrics[2], metrics[3]
    images = sum(1 for _ in (Path(args.data_yaml).parent / "images" / "val").iterdir())
    return {"images": images, "seconds": time.perf_counter() - started, "map50": map50, "map50_95": map50_95}


def time_steps(args: argparse.Namespace) -> dict:
    import torch
    import yaml
    import yolov5.train as v5
    from yolov5.models.yolo import Model
    from yolov5.utils.dataloaders import create_dataloader
    from yolov5.utils.loss import ComputeLoss
    from yolov5.utils.torch_utils import ModelEMA, smart_optimizer

    package = Path(v5.__file__).parent
    hyp = yaml.safe_load((package / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    torch.manual_seed(0)
    model = Model(str(package / "models" / args.cfg), ch=3, nc=args.nc)
    nl = model.model[-1].nl
    hyp["box"] *= 3 / nl
    hyp["cls"] *= args.nc / 80 * 3 / nl
    hyp["obj"] *= (args.imgsz / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = 0.0
    model.nc, model.hyp = args.nc, hyp
    stride = max(int(model.stride.max()), 32)
    loader, _ = create_dataloader(
        str(args.data_dir / "images" / "train"),
        args.imgsz,
        args.batch,
        stride,
        hyp=hyp,
        augment=True,
        workers=args.workers,
        prefix="train: ",
        shuffle=True,
        seed=0,
    )
    accumulate = max(round(64 / args.batch), 1)
    hyp["weight_decay"] *= args.batch * accumulate / 64
    optimizer = smart_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    ema = ModelEMA(model)
    compute_loss = ComputeLoss(model)
    amp = False  # yolov5's check_amp() returns False on CPU
    scaler = torch.cuda.amp.GradScaler(enabled=amp)
    phases = {"data": 0.0, "forward_loss": 0.0, "backward": 0.0, "optimizer": 0.0, "ema": 0.0}
    model.train()
    batches = iter(loader)
    timed_images = 0
    for i in range(args.warmup + args.steps):
        timing = i >= args.warmup
        t0 = time.perf_counter()
        try:
            imgs, targets, _, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            imgs, targets, _, _ = next(batches)
        t1 = time.perf_counter()
        imgs = imgs.float() / 255
        with torch.cuda.amp.autocast(amp):
            pred = model(imgs)
            loss, _ = compute_loss(pred, targets)
        t2 = time.perf_counter()
        scaler.scale(loss).backward()
        t3 = time.perf_counter()
        t4 = t5 = t3
        if (i + 1) % accumulate == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            t4 = time.perf_counter()
            ema.update(model)
            t5 = time.perf_counter()
        if timing:
            timed_images += imgs.shape[0]
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[name] += seconds
        if not math.isfinite(loss.item()):
            raise SystemExit("non-finite loss")
    return {"images": timed_images, "phases": phases}


def main() -> None:
    args = parse_args()
    import torch
    import yolov5.train as v5  # its imports set OMP_NUM_THREADS and OpenCV's threads, as the CLI's do

    result = time_steps(args) if args.mode == "steps" else time_validation(args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "framework": f"yolov5 {v5.__version__}",
                "precision": "fp32",
                "threads": torch.get_num_threads(),
                "peak_rss_mib": peak_mib,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
