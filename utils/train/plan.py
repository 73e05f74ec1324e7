"""What a training run will do, said once before it starts: the EMA's horizon, the averaging
methods asked for, precision, batches and where it logs."""

from __future__ import annotations

import numpy as np

from utils.data.dataset import DetectionDataset
from utils.eval.plots import plot_labels
from utils.log import LOGGER
from utils.precision import describe
from utils.train.ema import TENSORFLOW_WARMUP, ImageEMA
from utils.train.optim import optimizer_steps
from utils.train.run import TrainingRun


def log_plan(run: TrainingRun, train_dataset: DetectionDataset, new_run: bool) -> None:
    """Say what `run` will do (and draw its labels once): EMA horizon, precision, batches (rank 0)."""
    opt, loop = run.config.opt, run.loop
    if run.plots and new_run:
        plot_labels(np.concatenate(train_dataset.labels), list(run.config.names), run.run_dir / "labels.jpg")
    planned_steps = optimizer_steps(opt.epochs - loop.epoch, run.batches_per_epoch, opt.batch_size)
    if opt.no_ema:
        weights = "Lookahead's slow weights" if opt.lookahead and opt.lookahead_ema == "slow" else "the raw weights"
        LOGGER.info(f"--no-ema: no weight averaging; {weights} are validated and saved as 'ema' too")
    elif isinstance(run.ema, ImageEMA):
        images_per_epoch = len(train_dataset)
        final = run.ema.images + (opt.epochs - loop.epoch) * images_per_epoch
        half_life = min(run.ema.half_life, run.ema.ramp * final)
        LOGGER.info(
            f"EMA: half-life {run.ema.half_life:g} images, at most {run.ema.ramp:g} of the images seen; "
            f"about {final} images by the end, where the half-life is {half_life:.0f} images "
            f"({half_life / images_per_epoch:.2g} epochs)"
        )
    else:
        ema = run.ema
        final_decay = ema.decay_after(ema.updates + planned_steps)
        ramp = (
            "with TensorFlow's warmup min(decay, (1 + n) / (10 + n))"
            if ema.warmup == TENSORFLOW_WARMUP
            else f"ramped over tau={ema.tau:g} updates"
        )
        LOGGER.info(
            f"EMA: decay {ema.decay} {ramp}; about {planned_steps} more "
            f"optimizer steps are planned, ending near d={final_decay:.3g}"
            + (
                " (the average stays close to the raw weights; --ema images averages over a share of "
                "the images seen instead: see the README's 'Choosing the averaging')"
                if final_decay < 0.5
                else ""
            )
        )
    if opt.graft:
        LOGGER.info(
            f"Filter grafting: {run.world.size} processes each train a network of their own on all of the train "
            f"split (seed "
            f"{opt.seed} + rank{', hyp files ' + ' '.join(opt.graft_hyp) if opt.graft_hyp else ''}); after each "
            "epoch each grafts the next one's into its own. Rank 0's network is validated and saved"
        )
    if opt.swap_epoch:
        LOGGER.info(
            f"SWAP: the {run.world.size} processes train as one until epoch {opt.swap_epoch}, then each alone; "
            "their average is written to weights/swap.pt at the end"
        )
    if opt.lookahead:
        k, alpha = opt.lookahead
        LOGGER.info(
            f"Lookahead: every {k} optimizer steps the slow weights move {alpha:g} of the way to the fast "
            f"ones, which restart from them; the EMA averages the {opt.lookahead_ema} weights"
        )
    if opt.noval and opt.patience:
        LOGGER.info(
            "--noval: only the last epoch is validated, so best.pt is written then and --patience "
            "(early stopping) has nothing to compare"
        )
    ranks = (
        f" in each of {run.world.size} processes"
        if opt.graft
        else f" over {run.world.size} processes ({run.config.batch_per_process} each"
        f"{', SyncBatchNorm' if opt.sync_bn else ''})"
        if run.world.distributed
        else ""
    )
    LOGGER.info(
        f"{describe(run.config.precision, run.weights_dtype)} on {run.device}; batch "
        f"{opt.batch_size}{ranks} x {run.schedule.full_accumulate} accumulated, {run.batches_per_epoch} "
        f"batches per epoch, {len(run.val_loader.dataset)} val images\n"
        f"Logging to {run.run_dir}; training for {opt.epochs} epochs..."
    )
