"""Validation time in one process against the same validation shared by several (gloo, CPU).

    python benchmarks/bench_distributed_val.py --weights RUN/weights/last.pt [--processes 1 2] [--repeats 3]

What train.py pays per epoch to validate its EMA under torchrun: the broadcast of rank 0's weights
(World.copy_from_main_) and evaluate() over each process's share of the val batches, rank 0
gathering and scoring them all (before, rank 0 validated alone while the others waited). Each
process runs one thread (torch and OpenCV) and no loader workers, so N processes use N cores
against one process's one: wall times need that many idle cores. The CPU column is the busiest
process's CPU time for the validation (each rank's own; rank 0's includes the scoring), what
the wall time is on idle cores and what a loaded machine still measures fairly. The mAP and the
val loss of every process count must equal one process's bit for bit. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.checkpoint.format import (  # noqa: E402
    batch_per_process,
    image_size,
    load_checkpoint,
    model_from_checkpoint,
    trained_amp,
    training_option,
)
from utils.data.config import load_dataset_config  # noqa: E402
from utils.data.loader import val_shard_loader, validation_batch_size  # noqa: E402
from utils.dist import World  # noqa: E402
from utils.eval.evaluate import evaluate  # noqa: E402
from utils.precision import DTYPES, describe, inference_precision  # noqa: E402
from utils.train.as_trained import val_loader_as_trained  # noqa: E402
from utils.train.criterion import build_criterion  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_validations(rank: int, size: int, port: int, opt: argparse.Namespace, amp: str, results) -> None:
    """In each process: one warm-up and opt.repeats timed validations (broadcast + evaluate) in
    autocast `amp`; rank 0 puts its times and result into `results`."""
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    world = World(rank=rank, size=size, local_size=size)
    if world.distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    device = torch.device("cpu")
    checkpoint = load_checkpoint(opt.weights)
    model = model_from_checkpoint(checkpoint, "ema", source=opt.weights).to(memory_format=torch.channels_last)
    data = load_dataset_config(opt.data or training_option(checkpoint, "data"))
    loader = val_loader_as_trained(checkpoint, model, data, workers=0)
    shard = val_shard_loader(loader, world) if world.distributed else loader
    settings = {
        "device": device,
        "amp_dtype": DTYPES[amp],
        "loss_fn": build_criterion(model, checkpoint["hyp"], image_size(checkpoint)),
        "world": world,
    }
    times = []
    for _ in range(opt.repeats + 1):
        world.barrier()
        started = time.perf_counter()
        world.copy_from_main_(list(model.state_dict().values()))
        broadcast, cpu_started = time.perf_counter(), time.process_time()
        result = evaluate(model, shard, **settings)
        wall, cpu = time.perf_counter() - broadcast, time.process_time() - cpu_started
        times.append((broadcast - started, wall, max(world.gather_to_main(cpu) or [0.0])))
    if world.is_main:
        m = result.metrics
        results.put((times[1:], len(loader.dataset), len(loader), (m.map50, m.map50_95), result.loss.tolist()))
    if world.distributed:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a checkpoint of train.py (its EMA is validated)")
    p.add_argument("--data", default=None, help="dataset YAML (default: the run's)")
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="timed validations per process count (after a warm-up)")
    opt = p.parse_args()

    # The precision the run trained in, chosen once here (timed here where it recorded none), as val.py chooses it
    checkpoint = load_checkpoint(opt.weights)
    model = model_from_checkpoint(checkpoint, "ema", source=opt.weights)
    batch = validation_batch_size(batch_per_process(checkpoint))
    precision = inference_precision(
        trained_amp(checkpoint), model, torch.device("cpu"), batch=batch, img_size=image_size(checkpoint)
    )
    del checkpoint, model

    context = mp.get_context("spawn")
    rows, reference = [], None
    for size in opt.processes:
        results = context.SimpleQueue()
        mp.start_processes(
            _timed_validations,
            args=(size, free_port(), opt, precision.amp, results),
            nprocs=size,
            join=True,
            start_method="spawn",
        )
        times, images, batches, maps, loss = results.get()
        reference = reference or (maps, loss)
        broadcast_ms = statistics.median(t[0] for t in times) * 1e3
        seconds, cpu = statistics.median(t[1] for t in times), statistics.median(t[2] for t in times)
        rows.append((size, broadcast_ms, seconds, cpu, maps, loss, (maps, loss) == reference))
    print(
        f"{opt.weights}: {images} val images in {batches} batches, {describe(precision)} ({precision.reason}); "
        f"median of {opt.repeats} validations\n"
    )
    print(
        "| processes | broadcast ms | validation s (wall) | speed-up | busiest process, CPU s | speed-up | "
        "mAP@0.5 | mAP@0.5:0.95 | val loss | same as first |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
    for size, broadcast_ms, seconds, cpu, maps, loss, same in rows:
        print(
            f"| {size} | {broadcast_ms:.1f} | {seconds:.2f} | {rows[0][2] / seconds:.2f}x | {cpu:.2f} | "
            f"{rows[0][3] / cpu:.2f}x | {maps[0]:.6f} | {maps[1]:.6f} | {' '.join(f'{v:.6f}' for v in loss)} | "
            f"{'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
