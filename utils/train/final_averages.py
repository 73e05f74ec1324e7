"""The averages a run writes when it ends: SWA (--swa-epochs) and SWAP (--swap-epoch), their
BatchNorm statistics recomputed, validated and saved; the averages tracked by --average, --val
and --posthoc-ema, saved as they are."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.checkpoint.format import averaged_checkpoint, model_from_checkpoint, save_checkpoint
from utils.eval.evaluate import evaluate, results_table
from utils.log import LOGGER
from utils.train.averaging import RECALIBRATION_IMAGES, recalibrate_on_training_batches
from utils.train.ema import WeightAverage


def finish_recalibrated(
    weights: dict[str, torch.Tensor],
    last: dict,
    train_loader: DataLoader,
    *,
    what: str,
    workers: int,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    val_loader: DataLoader,
    out_path: Path,
    max_images: int = RECALIBRATION_IMAGES,
    **extra,
) -> None:
    """Recompute the BatchNorm statistics of averaged `weights` (SWA's, SWAP's) on the last epoch's
    training batches (augmented: see recalibrate_on_training_batches; the first of them holding
    `max_images`, 0: all), validate them and save them
    to `out_path`: an average-kind checkpoint built on the run's `last` one, described as `what`,
    with `extra` entries (SWA's plain average, SWAP's processes)."""
    # Rebuilt from the checkpoint: plain BatchNorm where the run had SyncBatchNorm (rank 0 works alone here).
    average = model_from_checkpoint({**last, "ema": weights}, "ema", source=what)
    average.to(device, memory_format=torch.channels_last)
    images = recalibrate_on_training_batches(
        average,
        train_loader.dataset,
        epoch=last["epoch"],
        batch_size=train_loader.batch_size,
        workers=workers,
        seed=seed,
        device=device,
        amp_dtype=amp_dtype,
        max_images=max_images,
    )
    result = evaluate(average, val_loader, device=device, amp_dtype=amp_dtype)
    description = f"{what}, BatchNorm statistics recomputed on {images} augmented training images"
    LOGGER.info(f"{description}:\n{results_table(result, list(average.names))}")
    state = {k: v.detach().cpu().clone() for k, v in average.state_dict().items()}
    save_checkpoint(out_path, averaged_checkpoint(last, state, description, **extra))
    LOGGER.info(f"Saved {out_path}")


def save_tracked_average(path: Path, last: dict, average: WeightAverage, name: str) -> None:
    """Save a tracked average as an average-kind checkpoint built on the run's `last` one (BatchNorm
    statistics averaged, as the EMA's are), for val.py and detect.py."""
    state = {k: v.detach().cpu().clone() for k, v in average.module.state_dict().items()}
    description = f"the {name} average of the run's weights after {average.updates} optimizer steps"
    settings = {k: v for k, v in average.state_dict().items() if k != "module"}
    save_checkpoint(path, averaged_checkpoint(last, state, description, tracked={"name": name, **settings}))
    LOGGER.info(f"Saved {path} ({description})")
