"""The batch a run's memory allows: the pre-check of a given batch (a lower bound, never refusing one
that fits), AutoBatch (train.py --batch-size -1: the largest batch whose training step fills a
share of the free memory, from the measured peak of real steps at a few small batches) and, after
a real out-of-memory, the batch that fits.

A step (forward, loss, backward, optimizer step) of a copy of the model runs on the run's device
and precision at batches 1, 2 and 4; its peak above what was in use before it (CUDA: the
allocator's; CPU: the resident set's) is fitted with a line, bytes = intercept + slope x batch.
The run then holds, besides a step's peak, its weights, rank 0's averages and the optimizer's
state, counted from their tensors. Under torchrun every process measures its own device and all
take the smallest choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.yolo import DetectionModel
from utils.device import available_memory_bytes
from utils.dist import World
from utils.errors import UserError
from utils.log import LOGGER
from utils.peak_memory import PeakMemory, is_out_of_memory, release_cached_memory
from utils.train.config import TrainOptions, run_precision
from utils.train.memory_bound import check_training_memory, step_memory_lower_bound, weight_copies
from utils.train.probe import TrainingProbe

if TYPE_CHECKING:
    from utils.train.run import TrainingRun

PROBE_BATCHES = (1, 2, 4)
OOM_FRACTION = 0.9  # after an out-of-memory: the share of what is free beside the run's state a batch may fill
MAX_BATCH = 1024  # per process: beyond it a step gains nothing on any device we know


@dataclass(frozen=True)
class StepMemoryFit:
    """A training step's measured peak above what was in use before it, bytes = intercept +
    slope x batch, over the batches measured, and the bytes of the probe's weights and optimizer
    state (a run holds the same)."""

    measured: tuple[tuple[int, int], ...]  # (batch, peak bytes)
    intercept: float
    slope: float
    weight_bytes: int
    optimizer_state_bytes: int

    def largest_batch(self, budget: float) -> int:
        """The largest batch whose step fits in `budget` bytes beside what is already held (0: none)."""
        return max(int((budget - self.intercept) // self.slope), 0)

    def describe(self) -> str:
        points = ", ".join(f"{peak / 2**30:.3g} GiB at {batch}" for batch, peak in self.measured)
        return f"{points}: {self.slope / 2**30:.3g} GiB per image + {self.intercept / 2**30:.3g} GiB"


def measure_step_memory(
    model: DetectionModel,
    hyp: dict,
    *,
    img_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    weights_dtype: torch.dtype,
    optimizer: str,
    batches: tuple[int, ...] = PROBE_BATCHES,
) -> StepMemoryFit:
    """Measure a training step of a copy of `model` at each of `batches` (stopping at the first
    that runs out of memory) and fit the line. `model` itself, its BatchNorm statistics and the
    random number generators are untouched."""
    meter = PeakMemory(device)
    probe = None
    measured: list[tuple[int, int]] = []
    try:
        probe = TrainingProbe(
            model, hyp, img_size=img_size, device=device, weights_dtype=weights_dtype, optimizer=optimizer
        )
        probe.step(batches[0], amp_dtype)  # the optimizer's state, caches and code paths exist from here on
        weights, optimizer_state = probe.state_tensors()
        state_bytes = (_tensor_bytes(weights), _tensor_bytes(optimizer_state))
        for batch in batches:
            meter.reset()
            before = meter.in_use()
            try:
                probe.step(batch, amp_dtype)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                probe.optimizer.zero_grad(set_to_none=True)
                break
            measured.append((batch, meter.peak() - before))
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        measured = []
    finally:
        probe = None  # the copy's memory is given back before the run allocates its own
        release_cached_memory(device)
    if not measured:
        raise UserError(
            f"not even a training step of 1 image at --imgsz {img_size} fits in the memory of {device}: "
            "use a smaller --imgsz or model"
        )
    return _fit(measured, *state_bytes)


def _fit(measured: list[tuple[int, int]], weight_bytes: int, optimizer_state_bytes: int) -> StepMemoryFit:
    """The least-squares line through the measurements; a flat or falling one (noise, or a single
    point) becomes the line through the origin and the largest batch measured."""
    batches, peaks = np.array(measured, dtype=np.float64).T
    slope, intercept = np.polyfit(batches, peaks, 1) if len(measured) > 1 else (0.0, 0.0)
    if slope <= 0:
        slope, intercept = peaks[-1] / batches[-1], 0.0
    return StepMemoryFit(tuple(measured), float(intercept), float(slope), weight_bytes, optimizer_state_bytes)


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def choose_batch_size(
    fit: StepMemoryFit,
    *,
    available: int,
    fraction: float,
    held: int,
    limit: int,
    world: World,
    device: torch.device,
    img_size: int,
) -> int:
    """The largest batch per process whose step, beside `held` bytes the run keeps (weights,
    averages, optimizer state), fills at most `fraction` of `available`; at most `limit` (the
    train split) and MAX_BATCH; the smallest over torchrun's processes (collective)."""
    budget = fraction * available - held
    batch = min(fit.largest_batch(budget), limit, MAX_BATCH)
    chosen = world.smallest(batch)
    LOGGER.info(
        f"AutoBatch: a training step at {img_size} px on {device} measured {fit.describe()}; beside "
        f"{held / 2**30:.3g} GiB of weights, averages and optimizer state, a batch of {batch} fills at most "
        f"{fraction:.0%} of the {available / 2**30:.3g} GiB available"
        + (f"; {chosen} per process, the smallest of the {world.size} processes' choices" if world.distributed else "")
    )
    if chosen < 1:
        raise UserError(
            f"--batch-size -1: not even a batch of 1 at --imgsz {img_size} fits in {fraction:.0%} of the "
            f"{available / 2**30:.3g} GiB available on {device} (a step: {fit.describe()}): use a smaller --imgsz "
            "or model, or a larger --autobatch-fraction"
        )
    return chosen


def held_bytes(fit: StepMemoryFit, *, averages: int, weights_resident: bool, ddp: bool) -> int:
    """What a run keeps on its device besides a step's peak: the weights (unless already there, as
    a CPU run's model is), `averages` copies of them (rank 0's EMA, tracked averages, SWA's;
    Lookahead's slow weights), DDP's gradient buckets, and the optimizer's state (as the probe's)."""
    copies = weight_copies(averages, weights_resident) + (1 if ddp else 0)
    return copies * fit.weight_bytes + fit.optimizer_state_bytes


def out_of_memory_message(run: TrainingRun) -> str:
    """What to say after `run`'s training ran out of memory: where, that last.pt is kept, and the
    largest batch whose measured step fits in 90% of the memory free beside the run's weights,
    averages and optimizer state (which keep theirs), below the batch that failed."""
    opt = run.config.opt
    run.optimizer.zero_grad(set_to_none=True)
    release_cached_memory(run.device)
    failed = run.config.batch_per_process
    where = f"{run.device} ran out of memory training at --imgsz {opt.imgsz} with a batch of {failed} per process"
    kept = run.saver.last_path if run.saver is not None and run.saver.last_path.exists() else None
    kept_note = f" ({kept} holds the run up to its last checkpoint)" if kept else ""
    available = available_memory_bytes(run.device)
    processes = run.world.local_size if run.device.type == "cpu" else 1
    try:
        fit = measure_step_memory(
            run.model,
            run.config.hyp,
            img_size=opt.imgsz,
            device=run.device,
            amp_dtype=run.amp_dtype,
            weights_dtype=run.weights_dtype,
            optimizer=opt.optimizer,
        )
    except (UserError, OSError) as error:
        return f"{where}{kept_note}; measuring a smaller step failed too: {error}"
    except Exception as error:  # the copy itself did not fit beside the run's state
        if not is_out_of_memory(error):
            raise
        return f"{where}{kept_note}; not even a copy of the model fits beside the run's state to measure a smaller step"
    batch = 0 if available is None else min(fit.largest_batch(OOM_FRACTION * available // processes), failed - 1)
    if batch < 1:
        return f"{where}{kept_note}; not even a batch of 1 fits beside the run's state: use a smaller --imgsz or model"
    total = batch if opt.graft else batch * run.world.size
    return (
        f"{where}{kept_note}. A step measured {fit.describe()}, so a batch of {batch} per process fits: "
        f"train with --batch-size {total} (or -1, which measures and picks the batch)"
    )


class TrainingMemory:
    """The memory decisions of one process's run, before it starts: the lower-bound check of a
    given batch (utils/train/memory_bound.py) and --batch-size -1's measured choice."""

    def __init__(self, opt: TrainOptions, model: DetectionModel, device: torch.device, world: World):
        self.opt, self.model, self.device, self.world = opt, model, device, world
        self.weights_dtype, self.amp_dtype = run_precision(opt)
        # rank 0 keeps the EMA, the tracked averages and SWA's; CPU processes share the machine's memory
        own = 1 if opt.lookahead else 0  # Lookahead's slow weights, on every rank
        self.averages = own + (1 + len(opt.tracked) + (1 if opt.swa_epochs else 0) if world.is_main else 0)
        self.processes = world.local_size if device.type == "cpu" else 1
        self.weights_resident = device.type == "cpu"  # the model is built in the CPU's memory already

    def check(self, img_size: int, batch_size: int, optimizer: str) -> None:
        """Refuse a batch per process that cannot fit (a lower bound: never one that would)."""
        bound = step_memory_lower_bound(
            self.model,
            amp_dtype=self.amp_dtype,
            optimizer=optimizer,
            averages=self.averages,
            weights_resident=self.weights_resident,
            weights_dtype=self.weights_dtype,
        )
        try:
            check_training_memory(bound, img_size, batch_size, self.device, self.processes)
            refusal = None
        except UserError as error:
            refusal = str(error)
        refusals = [r for r in self.world.gathered(refusal) if r]  # every rank stops if one cannot fit
        if refusals:
            raise UserError(refusals[0])

    def autobatch(self, hyp: dict, img_size: int, optimizer: str, limit: int) -> int:
        """--batch-size -1: the batch per process, measured (at most the train split's share, `limit` images)."""
        available = available_memory_bytes(self.device)
        if available is None:
            raise UserError(f"--batch-size -1: the free memory of {self.device} cannot be read here; give a batch size")
        try:
            fit = measure_step_memory(
                self.model,
                hyp,
                img_size=img_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
                weights_dtype=self.weights_dtype,
                optimizer=optimizer,
            )
        except (OSError, UserError) as error:
            self.world.smallest(0)  # the other ranks learn that no batch fits here, and stop too
            if isinstance(error, UserError):
                raise
            raise UserError(f"--batch-size -1 cannot measure memory here ({error}); give a batch size") from None
        ddp = self.world.distributed and not self.opt.graft
        held = held_bytes(fit, averages=self.averages, weights_resident=self.weights_resident, ddp=ddp)
        share = limit if self.opt.graft else max(limit // self.world.size, 1)
        return choose_batch_size(
            fit,
            available=available // self.processes,
            fraction=self.opt.autobatch_fraction,
            held=held,
            limit=share,
            world=self.world,
            device=self.device,
            img_size=img_size,
        )
