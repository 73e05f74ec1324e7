"""The training loop: epochs of accumulated AMP steps with an EMA, validated and checkpointed."""

from __future__ import annotations

import math
import time

from utils.checkpoint.format import load_for_inference
from utils.device import autocast, to_model_input
from utils.eval.evaluate import evaluate, results_table, save_validation_plots
from utils.eval.plots import plot_results
from utils.log import LOGGER
from utils.stop_signals import StopSignals
from utils.train.final_averages import finish_recalibrated, save_tracked_average
from utils.train.run import TrainingRun


def train(run: TrainingRun) -> None:
    """Train `run` (utils/train/run.py builds it) to its last epoch, or until early stopping.

    Under torchrun every rank runs this on its share of each global batch through
    DistributedDataParallel (or, training separately with --swap-epoch or --graft, as a process of
    its own); rank 0 alone keeps the EMA, logs and writes checkpoints, while the others wait for
    its verdict on early stopping. Every rank validates its share of the val batches with rank
    0's weights, and rank 0 scores them all."""
    started, first_epoch = time.time(), run.loop.epoch
    with StopSignals() as signals:  # SIGTERM, SIGUSR1: the step finished, last.pt written, Preempted raised
        train_epochs(run, signals)
    swap_weights = run.swap_average()  # --swap-epoch: every process's weights averaged (collective)
    if run.world.is_main:
        elapsed_s, epochs_run = time.time() - started, run.loop.epoch - first_epoch
        finish(run, elapsed_s=elapsed_s, epochs_run=epochs_run, swap_weights=swap_weights)


def train_epochs(run: TrainingRun, signals: StopSignals) -> None:
    """The epochs: accumulated steps, EMA updates, validation and checkpoints; a stop signal
    received (`signals`) ends them after the optimizer step under way, with last.pt written."""
    opt, loop, world, model, ema = run.config.opt, run.loop, run.world, run.model, run.ema
    patience = opt.patience or math.inf  # 0 turns early stopping off, as in YOLOv5
    while loop.epoch < opt.epochs:
        epoch = loop.epoch
        batches = run.start_epoch()  # this epoch's batches, after those a resumed run already took
        for i, batch in enumerate(batches, start=loop.batch):
            step = i + run.batches_per_epoch * epoch  # micro-batches since the start of training
            window_full = run.window_full(i, step)  # accumulated enough for an optimizer step
            images = to_model_input(batch.images, run.device, run.weights_dtype)
            if loop.window == 0:  # BatchNorm statistics before the window, to undo one with a non-finite loss
                run.buffers.take()
            with run.gradient_sync(window_full):  # DDP averages gradients in a window's last backward only
                with autocast(run.device, run.amp_dtype):
                    predictions = run.forward_model(images)
                loss, loss_items = run.criterion(predictions, batch.targets)
                run.backward(loss, loss_items)  # the window skips its step on every rank if any loss is not finite
            loop.window += 1
            loop.window_images += batch.images.shape[0]
            if window_full:
                stepped = run.optimizer_step(epoch, step)  # schedule, unscale, clip, step; False if skipped
                if stepped and ema is not None:
                    # once per optimizer step taken, never per micro-batch; the step's images over all
                    # ranks (our sampler gives every rank as many, repeating a few images to even them out)
                    images_in_step = run.images_in_step()
                    with run.averaged_weights():  # the model, or Lookahead's slow weights in it
                        ema.update(model, images_in_step)
                        for average in run.averages.values():  # --average, --val, --posthoc-ema
                            average.update(model, images_in_step)
                loop.record_step(run.stepped_everywhere(stepped))
                run.stop_if_diverging()
                stop = run.stop_signal(signals)  # agreed by every rank
                if stop or run.checkpoint_due(i):
                    loop.batch = i + 1
                    run.save_last()  # a mid-epoch last.pt (--save-interval, or a stop signal)
                if stop:
                    raise run.stop_on_signal(stop)
            run.show_progress(batches, batch, images, i, step)
        run.end_epoch(batches)
        if opt.graft and epoch + 1 < opt.epochs:
            run.graft()  # filter grafting: each process takes in the next one's network (collective)

        final_epoch, stop_early, is_best = epoch + 1 == opt.epochs, False, False
        if world.is_main:
            for average in (ema, *run.averages.values()):
                average.copy_attributes(model)  # validate what we ship: averages carrying the model's attributes
            if run.swa is not None and epoch >= opt.epochs - opt.swa_epochs:
                run.swa.update(ema.module if opt.swa_source == "ema" else model)
        result, others = None, dict.fromkeys(opt.validated)
        if not opt.noval or final_epoch:  # every rank validates its share with rank 0's weights; rank 0 scores
            result = evaluate(
                run.validation_network("ema"),
                run.val_shard,
                device=run.device,
                amp_dtype=run.amp_dtype,
                loss_fn=run.val_criterion,
                world=world,
            )
            for name in others:  # --val: the raw model or tracked averages, only when asked
                others[name] = evaluate(
                    run.validation_network(name), run.val_shard, device=run.device, amp_dtype=run.amp_dtype, world=world
                )
        if world.is_main:
            is_best = run.log_epoch(epoch, result, others)  # results.csv; best fitness of validated epochs
            # Only validated epochs count: with --noval nothing stops the run early.
            stop_early = result is not None and epoch - loop.best_epoch >= patience and not final_epoch
            run.save_snapshot(epoch, stopping=final_epoch or stop_early)  # --posthoc-ema, when due
        stop_early = world.from_main(stop_early)
        loop.start_next_epoch()
        if not opt.nosave or final_epoch or stop_early:  # rank 0 writes; processes training separately all add theirs
            run.save_epoch(epoch, finished=final_epoch or stop_early, best=is_best)
        if stop_early:
            LOGGER.info(f"Stopping early: no improvement for {opt.patience} epochs; best was epoch {loop.best_epoch}")
            break
        stop = run.stop_signal(signals)  # received while validating: after the epoch's last.pt
        if stop and not final_epoch:
            if opt.nosave:
                run.save_last()  # --nosave keeps no epoch's last.pt, but a stopped run needs one
            raise run.stop_on_signal(stop)


def finish(run: TrainingRun, elapsed_s: float, epochs_run: int, swap_weights: dict | None = None) -> None:
    """After the last epoch (rank 0): close the log, plot, finish SWA and SWAP, strip best.pt (unless
    --keep-optimizer) and validate it, free the run folder."""
    run.logger.close()
    LOGGER.info(f"\n{epochs_run} epochs completed in {elapsed_s / 3600:.3f} hours.")
    if run.plots:
        plot_results(run.logger.csv_path, run.run_dir / "results.png")
    opt, last = run.config.opt, run.checkpoint(finished=True)
    recalibrated = {
        "workers": opt.workers,
        "seed": opt.seed,
        "max_images": opt.bn_images,
        "device": run.device,
        "amp_dtype": run.amp_dtype,
        "val_loader": run.val_loader,
    }
    if run.swa is not None and run.swa.updates:
        finish_recalibrated(
            run.swa.module.state_dict(),
            last,
            run.train_loader,
            what=f"SWA of the {opt.swa_source} weights at the end of the last {run.swa.updates} epochs",
            out_path=run.run_dir / "weights" / "swa.pt",
            swa=last["swa"],
            **recalibrated,
        )
    elif run.swa is not None:
        LOGGER.warning(
            f"WARNING: training stopped before the last {opt.swa_epochs} epochs, so SWA averaged "
            "nothing and no swa.pt was written"
        )
    if swap_weights is not None:
        finish_recalibrated(
            swap_weights,
            last,
            run.train_loader,
            what=f"SWAP: the mean of {run.world.size} processes trained alone from epoch {opt.swap_epoch}",
            out_path=run.run_dir / "weights" / "swap.pt",
            swap={"processes": run.world.size, "swap_epoch": opt.swap_epoch},
            **recalibrated,
        )
    elif opt.swap_epoch:
        LOGGER.warning(
            f"WARNING: training stopped before SWAP's second phase (epoch {opt.swap_epoch}), so no swap.pt was written"
        )
    for name, average in run.averages.items():  # --average, --val, --posthoc-ema: weights/NAME.pt
        path = run.run_dir / "weights" / f"{name}.pt"
        save_tracked_average(path, last, average, name)
    best_path = run.saver.best_path
    if best_path.exists():
        if not opt.keep_optimizer:  # validated and plotted below as it ships
            run.saver.strip_best(run.logger.epoch_metrics(run.loop.best_epoch))
        LOGGER.info(f"Validating {best_path}...")
        _, best_model = load_for_inference(best_path, "ema", run.device)
        result = evaluate(
            best_model,
            run.val_loader,
            device=run.device,
            amp_dtype=run.amp_dtype,
            plot_dir=run.run_dir if run.plots else None,
        )
        LOGGER.info(results_table(result, list(run.config.names), verbose=True))
        if run.plots:
            save_validation_plots(result, list(run.config.names), run.run_dir)
    LOGGER.info(f"Results saved to {run.run_dir}")
    if run.run_dir_lock is not None:
        run.run_dir_lock.release()
