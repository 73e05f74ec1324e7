"""TrainingRun: everything a training run is made of, built once, with the state a checkpoint keeps.

The loop (utils/train/loop.py) shows the order of a step; the run holds the parts and does the
bookkeeping around them: the accumulation window, non-finite passes, the progress line, the
results row and the checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.yolo import DetectionModel
from utils.checkpoint.format import training_checkpoint
from utils.data.dataset import Batch, DetectionDataset
from utils.data.loader import build_train_loader, val_shard_loader
from utils.dist import World
from utils.errors import TrainingStopped, UserError
from utils.eval.evaluate import EvalResult, results_table
from utils.eval.plots import plot_image_batch
from utils.log import LOGGER, interactive
from utils.run_dir import RunDirLock
from utils.stop_signals import Preempted, StopSignals, signal_name
from utils.train.config import RunConfig, run_precision
from utils.train.criterion import build_criterion
from utils.train.ema import (
    EMA_IMAGES,
    EMA_STEPS,
    UniformAverage,
    WeightAverage,
    build_average,
    posthoc_names,
)
from utils.train.grafting import graft_from_next_process
from utils.train.lookahead import Lookahead
from utils.train.loop_state import LoopState
from utils.train.optim import DECAY_GROUP, TrainSchedule, build_optimizer
from utils.train.posthoc import SNAPSHOT_FOLDER, SnapshotWriter
from utils.train.results import RunLogger, results_row
from utils.train.rng import restore_rng_state, rng_state
from utils.train.saver import CheckpointWriter
from utils.train.separate_processes import ProcessFiles, averaged_over_processes, training_alone
from utils.train.step import BufferSnapshot, optimizer_step
from utils.train.sync_bn import convert_sync_batchnorm


def process_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> dict:
    """What one process's training has of its own: weights, optimizer, scaler and RNG states."""
    return {
        "model": model.state_dict(),  # saved at once, so the live tensors need no copy
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
    }


def state_of(
    model: torch.nn.Module,
    ema: WeightAverage,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    loop: LoopState | None = None,
    swa: UniformAverage | None = None,
    averages: dict[str, WeightAverage] | None = None,
) -> dict:
    """A run's state as its checkpoint keeps it: weights, averages, optimizer, scaler, loop
    position and RNG states (the layout of utils/checkpoint/format.py's training_state())."""
    return {
        **process_state(model, optimizer, scaler),
        "ema": ema.state_dict(),
        "averages": {name: average.state_dict() for name, average in (averages or {}).items()},
        "swa": swa.state_dict() if swa is not None else None,
        "loop": (loop or LoopState()).state_dict(),
    }


class TrainingRun:
    """The model (and its DDP wrapper), EMA, SWA average, optimizer, scaler, schedule, losses,
    loaders, loop state, results log and checkpoint writer of one run. Rank 0 alone has the EMA,
    SWA average, log and writer (None on the other ranks); every rank has the validation loader
    and validates its share of it each epoch (val_shard)."""

    def __init__(
        self,
        config: RunConfig,
        model: DetectionModel,
        train_dataset: DetectionDataset,
        val_loader: torch.utils.data.DataLoader | None,
        run_dir: Path,
        world: World,
        device: torch.device,
        run_dir_lock: RunDirLock | None = None,
        state: dict | None = None,
    ):
        opt, hyp = config.opt, config.hyp
        self.config, self.run_dir, self.world, self.device = config, run_dir, world, device
        self.run_dir_lock = run_dir_lock
        self.weights_dtype, self.amp_dtype = run_precision(opt)
        model.names, model.hyp = list(config.names), dict(hyp)  # the model's own copy: the config stays as decided
        model.to(device, self.weights_dtype, memory_format=torch.channels_last)  # before a resumed state is loaded
        self.model = convert_sync_batchnorm(model, device) if opt.sync_bn and world.distributed else model
        LOGGER.info(f"Model: {self.model.summary(opt.imgsz)}")
        if hyp["copy_paste"] > 0:
            LOGGER.warning("WARNING: copy_paste needs segment labels; with box labels it has no effect (as in YOLOv5)")

        self.train_loader = build_train_loader(
            train_dataset,
            batch_size=opt.batch_size,
            workers=opt.workers,
            seed=opt.seed,
            pin_memory=device.type == "cuda",
            world=world,
            whole=opt.graft,
        )
        self.val_loader = val_loader
        # Each epoch's validation is shared out: each rank runs its share of the batches with rank 0's
        # weights (validation_network), and rank 0 gathers the predictions (utils/eval/evaluate.py).
        self.val_shard = val_shard_loader(val_loader, world) if world.distributed else val_loader
        self._validation_copy: torch.nn.Module | None = None  # ranks 1..: holds rank 0's weights to validate
        self.batches_per_epoch = len(self.train_loader)
        self.plots = not opt.no_plots and world.is_main

        self.schedule = TrainSchedule(hyp, opt.epochs, self.batches_per_epoch, opt.batch_size, cos_lr=opt.cos_lr)
        weight_decay = hyp["weight_decay"] * self.schedule.weight_decay_scale
        self.optimizer: torch.optim.Optimizer | Lookahead = build_optimizer(
            self.model, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay
        )
        if opt.lookahead:  # fast weights: the model's parameters; slow ones in the optimizer's state
            self.optimizer = Lookahead(self.optimizer, *opt.lookahead)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # The EMA lives on rank 0 alone, which validates and saves it. Parameters are equal on all ranks
        # after every step (DDP averages the gradients); BatchNorm statistics are equal with --sync-bn,
        # and without it rank 0's are the ones DDP broadcasts to every rank before each forward
        # (broadcast_buffers). Averaging rank 0's model is therefore averaging the model every rank
        # runs, with no collective and no copy of the EMA on the other ranks. (Processes training
        # separately, --swap-epoch's second phase and --graft, differ: rank 0's EMA is then its own model's.)
        # --no-ema keeps the same machinery with d = 0: the "average" is then the raw model itself.
        # Under torchrun, each step's images are counted over all ranks (ImageEMA's horizon is in images).
        self.ema: WeightAverage | None = None
        self.averages: dict[str, WeightAverage] = {}  # tracked besides the EMA (--average, --val, --posthoc-ema)
        self.snapshots: SnapshotWriter | None = None
        if world.is_main:
            rule = EMA_IMAGES if opt.ema == "images" else EMA_STEPS  # the hyp's settings, as for --average
            self.ema = build_average(rule, self.model, {**hyp, "ema_decay": 0.0} if opt.no_ema else hyp)
            self.averages = {name: build_average(name, self.model, hyp) for name in opt.tracked}
            if opt.posthoc_ema:
                folder = run_dir / "weights" / SNAPSHOT_FOLDER
                self.snapshots = SnapshotWriter(folder, opt.epochs, opt.posthoc_ema, new_run=state is None)
        self.swa = (
            UniformAverage(self.ema.module if opt.swa_source == "ema" else self.model)
            if opt.swa_epochs and world.is_main
            else None
        )
        self.criterion = build_criterion(self.model, hyp, opt.imgsz, label_smoothing=opt.label_smoothing, world=world)
        self.val_criterion = build_criterion(self.model, hyp, opt.imgsz, label_smoothing=opt.label_smoothing)
        self.loop = LoopState()
        # Processes training separately: where ranks 1.. write their own states, and what rank 0's checkpoint
        # records of the files of its save (its 'process_files').
        self.process_files = (
            ProcessFiles(run_dir / "weights", world) if world.distributed and (opt.graft or opt.swap_epoch) else None
        )
        self._process_files: dict | None = None
        if state is not None:
            self.load_state_dict(state)
        self.buffers = BufferSnapshot(self.model)
        # Forward passes go through DDP, which averages the gradients over the ranks in backward; the
        # optimizer, EMA, clipping and checkpoints use the bare model, whose tensors DDP shares.
        # Processes training separately (SWAP's second phase, grafting: see train_alone()) need no DDP,
        # which would also overwrite every rank's own weights with rank 0's when built.
        self.forward_model = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if world.distributed and not self.alone
            else self.model
        )
        self._finite_window: torch.Tensor | None = None  # on the device: every loss of this window was finite
        self.logger = RunLogger(run_dir, self.loop.epoch) if world.is_main else None
        self.saver = CheckpointWriter(run_dir / "weights", opt.save_interval) if world.is_main else None

    # What a checkpoint keeps

    def state_dict(self) -> dict:
        """Everything a resume needs besides the configuration (rank 0's: the one that writes checkpoints)."""
        state = state_of(
            self.model,
            self.ema,
            self.optimizer,
            scaler=self.scaler,
            loop=self.loop,
            swa=self.swa,
            averages=self.averages,
        )
        if self._process_files is not None:  # processes training separately: ranks 1..'s files (rank 0's is this)
            state["process_files"] = self._process_files
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from what state_dict() returned (on every rank; the averages on rank 0). Processes
        training separately: ranks 1.. are given their own process state in it (separate_processes.resumed_state)."""
        self._load_process_state(state)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for name, average in self.averages.items():
            if name not in state.get("averages", {}):
                raise UserError(f"the checkpoint holds no '{name}' average, which this run tracks: it cannot resume it")
            average.load_state_dict(state["averages"][name])
        if self.swa is not None and state.get("swa"):
            self.swa.load_state_dict(state["swa"])
        self.loop = LoopState.from_state_dict(state["loop"])

    def _load_process_state(self, state: dict) -> None:
        """Load what process_state() returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])

    def checkpoint(self, finished: bool = False) -> dict:
        """The run as a training checkpoint (utils/checkpoint/format.py)."""
        return training_checkpoint(
            self.state_dict(),
            finished=finished,
            model_yaml=self.model.yaml,
            names=list(self.config.names),
            hyp=self.config.hyp,
            opt=self.config.opt.to_dict(),
            world_size=self.world.size,
            precision=self.config.precision.to_dict(),
        )

    # One epoch

    def start_epoch(self) -> Iterable[Batch]:
        """Train mode, the epoch's data order (each rank skipping its share of the batches a resumed
        run already took) and the progress bar over it."""
        opt, loop = self.config.opt, self.loop
        if self.alone:
            self.train_alone()
        self.forward_model.train()
        close_mosaic = int(self.config.hyp["close_mosaic"])
        if close_mosaic and loop.epoch == opt.epochs - close_mosaic:
            LOGGER.info(f"Closing mosaic (and mixup) for the last {close_mosaic} epochs")
        skip = loop.batch * self.train_loader.batch_size
        self.train_loader.sampler.set_epoch(loop.epoch, skip=skip, independent=self.alone)
        loop.loss_sum = loop.loss_sum.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self._finite_window = None
        self._progress = ""  # the epoch's progress line, logged at its end
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", *self.criterion.names, "Instances", "Size"))
        return tqdm(
            self.train_loader,
            initial=loop.batch,
            total=self.batches_per_epoch,
            bar_format="{l_bar}{bar:10}{r_bar}",
            disable=not interactive() or not self.world.is_main,
        )

    @property
    def alone(self) -> bool:
        """Whether the processes train separately this epoch (--graft; --swap-epoch's second phase)."""
        opt = self.config.opt
        return training_alone(opt.swap_epoch, opt.graft, self.loop.epoch, self.world)

    def train_alone(self) -> None:
        """Each process on its own, as a one-process run with its batch (SWAP: its share of the
        global batch; --graft: all of it) would train: forward without DDP (no gradient
        all-reduce, no broadcast of rank 0's BatchNorm statistics), the loss of one process,
        accumulation to the nominal batch and weight decay for its batch; start_epoch() gives it
        its own order and augmentation of the data (SWAP: its share of each epoch; --graft: all)."""
        opt, hyp = self.config.opt, self.config.hyp
        if self.forward_model is not self.model:
            LOGGER.info(f"SWAP: from epoch {self.loop.epoch} each of the {self.world.size} processes trains alone")
        self.forward_model = self.model  # the DDP wrapper and its gradient hooks are released
        self.criterion = self.val_criterion  # built for one process: means over this rank's batch
        self.schedule = TrainSchedule(
            hyp, opt.epochs, self.batches_per_epoch, self.config.batch_per_process, cos_lr=opt.cos_lr
        )
        self.optimizer.param_groups[DECAY_GROUP]["weight_decay"] = (
            hyp["weight_decay"] * self.schedule.weight_decay_scale
        )

    def images_in_step(self) -> int:
        """Images that trained the weights of this optimizer step: the window's over all ranks, or
        this rank's own when the processes train separately (the sampler gives each as many)."""
        return self.loop.window_images * (1 if self.alone else self.world.size)

    def window_full(self, i: int, step: int) -> bool:
        """Whether micro-batch i of the epoch (`step` of the run) completes an accumulation window.
        The last window of an epoch steps with what it has, its gradient summed over its images and
        not rescaled: benchmarks/short_window_study.py measured why (weight decay is under 0.2% of
        an update; rescaling would weigh its few images up to 9 times as much as any other)."""
        return self.loop.window + 1 >= self.schedule.accumulate(step) or i + 1 == self.batches_per_epoch

    def gradient_sync(self, window_full: bool) -> AbstractContextManager:
        """Under DDP, gradients are averaged over the ranks only in the window's last backward."""
        if isinstance(self.forward_model, DistributedDataParallel) and not window_full:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, loss_items: torch.Tensor) -> None:
        """Backward, and the epoch's loss sums. A loss that is not finite on any rank marks the
        window, whose step is then skipped on all and its BatchNorm statistics undone. Nothing
        here waits for the device: the mark is read once, at the window's step."""
        # The loss items summed over the ranks, and on how many ranks the loss is not finite.
        summed = self.world.sum(torch.cat((loss_items, (~torch.isfinite(loss)).float().reshape(1))))
        # (Processes training separately each have their own mean loss: the log shows their mean, and a
        # non-finite loss on one rank skips the step on all, which keeps their loops in step.)
        finite = summed[3] == 0
        self._finite_window = finite if self._finite_window is None else self._finite_window & finite
        # Always (under DDP a collective): a window with a non-finite loss drops all of its gradients.
        self.scaler.scale(loss).backward()
        self.loop.loss_sum += torch.where(finite, summed[:3], 0.0) / (self.world.size if self.alone else 1)

    def optimizer_step(self, epoch: int, step: int) -> bool:
        """The window's optimizer step at the schedule's lr (zeroing the gradients); False when it
        was skipped for a non-finite loss (its BatchNorm statistics then go back to the window's
        start: run.buffers.take() there) or gradient."""
        finite_loss, self._finite_window = self._finite_window, None
        self.schedule.apply(self.optimizer, epoch, step)
        stepped = optimizer_step(self.optimizer, self.scaler, self.model, finite_loss=finite_loss)
        if not stepped and finite_loss is not None and not bool(finite_loss):  # read again only when skipped
            self.buffers.restore()
        return stepped

    def averaged_weights(self) -> AbstractContextManager:
        """Around the averages' updates: the model as they fold it in, holding Lookahead's slow
        weights under --lookahead with --lookahead-ema slow."""
        if isinstance(self.optimizer, Lookahead) and self.config.opt.lookahead_ema == "slow":
            return self.optimizer.slow_weights()
        return contextlib.nullcontext()

    def stepped_everywhere(self, stepped: bool) -> bool:
        """Whether this optimizer step was taken on every rank, for the loop's skip counters, which
        must agree on all ranks. Under DDP the ranks decide alike; processes training separately
        each decide on their own gradients (collective)."""
        if not self.alone:
            return stepped
        skipped = self.world.sum(torch.tensor([0.0 if stepped else 1.0], device=self.device))
        return bool(skipped.item() == 0)

    def stop_if_diverging(self) -> None:
        """Stop after --max-bad-steps skipped steps in a row (the last good checkpoint is kept)."""
        if self.loop.bad_streak >= self.config.opt.max_bad_steps:
            report = self.run_dir / "data_report.txt" if self.run_dir is not None else None
            data = f"the data (see {report})" if report is not None and report.is_file() else "the labels"
            raise TrainingStopped(
                f"{self.loop.bad_streak} optimizer steps in a row had a non-finite loss or gradient, so training "
                f"stopped; no such value reached the weights or a checkpoint. Last good checkpoint: "
                f"{self._last_checkpoint_name()}. Try a lower lr0, --amp off, or check {data}"
            )

    def stop_signal(self, signals: StopSignals) -> int | None:
        """The stop signal (utils/stop_signals.py) any rank has received, or None: under torchrun
        every rank learns it at the same optimizer step (collective: one number per step)."""
        received = signals.received or 0
        if self.world.distributed:
            received = int(self.world.largest_(torch.tensor([received], device=self.device)).item())
        return received or None

    def stop_on_signal(self, signum: int) -> Preempted:
        """The exception that ends training once last.pt holds where it stopped."""
        loop, where = self.loop, f"epoch {self.loop.epoch}"
        if loop.batch:
            where += f", batch {loop.batch}/{self.batches_per_epoch}"
        return Preempted(
            signum,
            f"{signal_name(signum)}: training stopped at {where} with last.pt written; continue with: "
            f"python train.py --resume {self._last_checkpoint_name()}",
        )

    def _last_checkpoint_name(self) -> str:
        """The run's last.pt for messages, as far as this rank knows (rank 0 writes it)."""
        if self.saver is None:
            return "see rank 0's message"
        return str(self.saver.last_path) if self.saver.last_path.exists() else "none yet"

    def show_progress(self, bar: tqdm, batch: Batch, images: torch.Tensor, i: int, step: int) -> None:
        """The progress line (mean losses so far), and the first batches drawn as the model saw them.
        The line changes at optimizer steps only: reading the losses waits for the device."""
        if self.plots and step < 3:
            plot_image_batch(
                batch.images, batch.targets.numpy(), list(self.config.names), self.run_dir / f"train_batch{step}.jpg"
            )
        if self.loop.window:  # inside an accumulation window
            return
        mean_loss = (self.loop.loss_sum / (i + 1)).tolist()
        memory = f"{torch.cuda.memory_reserved(self.device) / 2**30:.3g}G" if self.device.type == "cuda" else "cpu"
        self._progress = ("%11s" * 2 + "%11.4g" * 5) % (
            f"{self.loop.epoch}/{self.config.opt.epochs - 1}",
            memory,
            *mean_loss,
            len(batch.targets),
            images.shape[-1],
        )
        bar.set_description(self._progress)

    def end_epoch(self, bar: tqdm) -> None:
        bar.close()
        if not interactive() and self.world.is_main:
            LOGGER.info(self._progress)
        if self.loop.skipped_steps:
            LOGGER.warning(
                f"WARNING: {self.loop.skipped_steps} optimizer step(s) of this epoch skipped for a "
                "non-finite loss or gradient; the EMA did not move on those"
            )

    def validated(self, name: str) -> torch.nn.Module:
        """What --val NAME validates: the raw model or a tracked average."""
        return self.model if name == "raw" else self.averages[name].module

    def validation_network(self, name: str) -> torch.nn.Module:
        """Rank 0's network `name` ('ema', or --val's 'raw' or average) on every rank, for each to
        validate its share of val_shard (collective): rank 0's own module there, and on the others a
        copy of the model holding rank 0's weights and BatchNorm statistics, broadcast (rank 0's
        always, though processes training separately have networks of their own)."""
        if self.world.is_main:
            network = self.ema.module if name == "ema" else self.validated(name)
        else:
            if self._validation_copy is None:
                self._validation_copy = copy.deepcopy(self.model).requires_grad_(False)
            network = self._validation_copy
        self.world.copy_from_main_(list(network.state_dict().values()))
        return network

    def log_epoch(self, epoch: int, result: EvalResult | None, others: dict[str, EvalResult | None]) -> bool:
        """Print the validation, append the results.csv row and keep the best fitness; True when
        this epoch is the best so far. An epoch not validated (--noval) has no fitness. `others`:
        the results of --val's names (None when not validated)."""
        names = list(self.config.names)
        if result is not None:
            LOGGER.info(results_table(result, names))
        for name, other in others.items():
            if other is not None:
                LOGGER.info(f"{name}: mAP50 {other.metrics.map50:.3g}, mAP50-95 {other.metrics.map50_95:.3g}")
        is_best = result is not None and result.metrics.fitness >= self.loop.best_fitness
        if is_best:
            self.loop.best_fitness, self.loop.best_epoch = result.metrics.fitness, epoch
        mean_loss = (self.loop.loss_sum / self.batches_per_epoch).tolist()
        self.logger.log_epoch(
            epoch,
            results_row(
                self.criterion.names,
                mean_loss,
                result,
                self.optimizer,
                self.ema.updates,
                others,
            ),
        )
        return is_best

    def save_snapshot(self, epoch: int, stopping: bool) -> None:
        """--posthoc-ema: the power EMAs at the end of `epoch` into weights/posthoc/ when a snapshot
        is due, or when the run stops here."""
        if self.snapshots is not None:
            posthoc = {name: self.averages[name] for name in posthoc_names()}
            self.snapshots.write(epoch, posthoc, force=stopping)

    def checkpoint_due(self, i: int) -> bool:
        """Whether a mid-epoch last.pt (--save-interval) is due after micro-batch i. Rank 0's clock
        decides; processes training separately all learn it, as each adds its own state."""
        due = i + 1 < self.batches_per_epoch and self.saver is not None and self.saver.due()
        return bool(self.world.from_main(due)) if self.alone else due

    def write_own_states(self, stem: str) -> None:
        """Processes training separately: ranks 1.. write their own states to files of their own
        beside rank 0's checkpoint, which names them (collective; see ProcessFiles). `stem`: the
        checkpoint's ('last', or 'epochN' when epochN.pt is written too)."""
        self._process_files = None
        if self.alone:
            state = None
            if not self.world.is_main:
                state = {**process_state(self.model, self.optimizer, self.scaler), "hyp": dict(self.config.hyp)}
            self._process_files = self.process_files.write(stem, state)

    def own_states_saved(self) -> None:
        """After rank 0's checkpoint: each rank removes its files no checkpoint names any more (collective)."""
        if self._process_files is not None:
            self.process_files.saved()

    def save_last(self) -> None:
        """A mid-epoch last.pt (every rank calls it: see write_own_states)."""
        self.write_own_states("last")
        if self.saver is not None:
            self.saver.write(self.checkpoint())
        self.own_states_saved()

    def save_epoch(self, epoch: int, finished: bool, best: bool) -> None:
        """last.pt, and best.pt / epochN.pt when due, at the end of an epoch (every rank calls it:
        see write_own_states)."""
        save_period = self.config.opt.save_period
        copy_name = f"epoch{epoch}.pt" if save_period > 0 and epoch % save_period == 0 else None
        self.write_own_states(Path(copy_name).stem if copy_name else "last")
        if self.saver is not None:
            self.saver.write(self.checkpoint(finished=finished), best=best, copy_name=copy_name)
        self.own_states_saved()

    def graft(self) -> None:
        """--graft: every process grafts the next one's network into its own (collective); rank 0
        logs its alphas."""
        alphas = graft_from_next_process(self.model, self.world, self.config.hyp)
        LOGGER.info(
            f"Grafted the next process's network into this one's: alpha (the share kept) {min(alphas):.3f} to "
            f"{max(alphas):.3f}, mean {sum(alphas) / len(alphas):.3f} over {len(alphas)} layers"
        )

    def swap_average(self) -> dict[str, torch.Tensor] | None:
        """After the last epoch of a SWAP run that reached its second phase: the mean of all the
        processes' weights (collective; rank 0 uses it), else None."""
        opt = self.config.opt
        if not (self.world.distributed and opt.swap_epoch and self.loop.epoch > opt.swap_epoch):
            return None
        return averaged_over_processes(self.model, self.world)
