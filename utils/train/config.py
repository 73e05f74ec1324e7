"""A training run's configuration: the options, hyperparameters and dataset, decided once and frozen.

The options are train.py's command line (or, on --resume, the original run's, with defaults for
options added since); opt.yaml, hyp.yaml and every checkpoint record them as plain dicts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch

from utils.checkpoint.format import trained_amp
from utils.data.config import DatasetConfig
from utils.data.listing import list_image_paths
from utils.dist import World, per_process_batch
from utils.errors import UserError
from utils.log import LOGGER
from utils.option_checks import check_range
from utils.precision import DTYPES, Precision
from utils.train.averaging import RECALIBRATION_IMAGES
from utils.train.ema import tracked_names
from utils.train.optim import AUTO_SGD_MIN_STEPS, optimizer_steps, resolve_auto_optimizer

RUNTIME_ONLY_OPTIONS = ("device", "workers")  # may change on --resume: they do not change the results
PLACEMENT_OPTIONS = ("project", "name", "exist_ok")  # on --resume, where a copy outside its run folder continues
SINGLE_CLASS_NAME = "item"
# Options added since a run was recorded take their default on --resume, except these, whose
# default would change what the run does: the value that gives its behaviour from before.
BEFORE_THEY_EXISTED = {"bn_images": 0}  # SWA / SWAP recomputed BatchNorm on all of the train split
AUTO_BATCH = -1  # --batch-size -1: measured and chosen (utils/train/autobatch.py), then recorded as a number
AUTOBATCH_FRACTION = 0.6  # --autobatch-fraction's default


@dataclass(frozen=True)
class TrainOptions:
    """train.py's options by their command-line names (see train.py --help)."""

    weights: str
    raw: bool
    trust_pickle: bool
    cfg: str
    data: str
    hyp: str
    epochs: int
    batch_size: int  # the global batch: split over torchrun's processes (AUTO_BATCH until measured)
    autobatch_fraction: float  # --batch-size -1: the share of the free memory a training step may fill
    imgsz: int  # a multiple of the model's stride once the run is configured
    nosave: bool
    keep_optimizer: bool  # the final best.pt stays a whole training checkpoint (default: stripped to its EMA)
    noval: bool
    noautoanchor: bool  # no AutoAnchor check and fit of the anchors at the start of a new run
    cache: str
    device: str
    single_cls: bool
    no_ema: bool
    ema: str  # the EMA's rule: 'steps' (YOLOv5's ramp) or 'images' (a half-life in images)
    average: tuple[str, ...]  # averages tracked besides the EMA (utils/train/ema.py names)
    val: tuple[str, ...]  # validated each epoch besides the EMA: 'raw' or averages
    val_raw: bool  # as val: ('raw',), kept for the command line and runs recorded before --val
    posthoc_ema: int  # snapshots of the post-hoc power EMAs to save (0: none)
    swa_epochs: int
    swa_source: str
    bn_images: int  # SWA, SWAP: training images their BatchNorm statistics are recomputed on (0: all)
    sync_bn: bool
    optimizer: str  # never 'auto' once the run is configured
    lookahead: tuple[int, float] | tuple[()]  # (K, ALPHA) of Lookahead around the optimizer; () without
    lookahead_ema: str  # with --lookahead: 'slow' or 'fast', the weights the averages fold in
    swap_epoch: int  # SWAP under torchrun: from this epoch each process trains alone (0: off)
    graft: bool  # filter grafting under torchrun: a network per process, grafted after each epoch
    graft_hyp: tuple[str, ...]  # with graft: a hyp file per process (empty: --hyp for all)
    workers: int
    project: str
    name: str
    exist_ok: bool
    cos_lr: bool
    label_smoothing: float
    patience: int
    freeze: tuple[int, ...]
    save_period: int
    seed: int
    amp: str  # 'auto' until the run is configured, then what it chose: 'bf16', 'fp16' or 'off'
    float64: bool
    no_plots: bool
    save_interval: float
    max_bad_steps: int
    deterministic: bool

    def to_dict(self) -> dict:
        """Plain types, as opt.yaml and the checkpoints hold them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def validated(self) -> tuple[str, ...]:
        """What each epoch validates besides the EMA: --val, with raw first for --val-raw."""
        return tuple(dict.fromkeys((*(("raw",) if self.val_raw else ()), *self.val)))

    @property
    def tracked(self) -> tuple[str, ...]:
        """The averages the run keeps besides its EMA (--average, --val's averages, --posthoc-ema's)."""
        return tracked_names(self.average, self.validated, self.posthoc_ema > 0)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is decided by; built once by utils/train/prepare.py and never changed."""

    opt: TrainOptions
    hyp: dict  # validated (utils/hyp.py); AdamW's lr0 when --optimizer auto chose it
    data: DatasetConfig
    world_size: int  # torchrun's processes (1 alone)
    precision: Precision  # the autocast opt.amp names, why it was chosen, and the timings behind it

    @property
    def names(self) -> tuple[str, ...]:
        return (SINGLE_CLASS_NAME,) if self.opt.single_cls else self.data.names

    @property
    def batch_per_process(self) -> int:
        return process_batch(self.opt, self.world_size)


def weights_dtype(opt: TrainOptions) -> torch.dtype:
    """The dtype a run's weights train in: float64 with --float64, else float32."""
    return torch.float64 if opt.float64 else torch.float32


def run_precision(opt: TrainOptions) -> tuple[torch.dtype, torch.dtype | None]:
    """The weights' dtype and the autocast dtype (None: none) of a configured run (opt.amp chosen)."""
    if opt.amp not in DTYPES:
        raise ValueError(f"--amp {opt.amp!r} is not resolved yet (utils/train/precision.py)")
    return weights_dtype(opt), DTYPES[opt.amp]


def process_batch(opt: TrainOptions, world_size: int) -> int:
    """Images in one process's batch: its share of the global --batch-size, or all of it with
    --graft, where each process is a run of its own."""
    return opt.batch_size if opt.graft else per_process_batch(opt.batch_size, world_size)


def options_for_run(
    args: argparse.Namespace, defaults: dict, resumed: dict | None, placement_from_command_line: bool = True
) -> TrainOptions:
    """The options a run uses. A new run: the command line, with --device and --workers resolved.
    A resumed run: the original run's options (defaults for those added since, none for those
    removed since), of which only --device and --workers may be changed, and --project, --name
    and --exist-ok when the checkpoint is outside its run folder (`placement_from_command_line`:
    where the run continues); others given are reported as ignored. Every command-line option
    must be a field of TrainOptions."""
    given = {k: v for k, v in vars(args).items() if k != "resume"}
    if resumed is None:
        chosen = {**given, "device": args.device or "", "workers": 8 if args.workers is None else args.workers}
    else:
        changeable = RUNTIME_ONLY_OPTIONS + (PLACEMENT_OPTIONS if placement_from_command_line else ())
        ignored = [
            f"--{k.replace('_', '-')}"
            for k, v in given.items()
            if k not in changeable and k != "project" and v != defaults[k]
        ]  # --project: where to look
        if ignored:
            LOGGER.warning(f"WARNING: --resume continues with the run's original options; ignoring {' '.join(ignored)}")
        recorded = {k: v for k, v in resumed["opt"].items() if k in given}
        recorded["amp"] = trained_amp(resumed) or "auto"  # (runs from before --amp recorded --no-amp)
        chosen = {**{k: defaults[k] for k in given}, **BEFORE_THEY_EXISTED, **recorded}
        chosen.update({k: given[k] for k in RUNTIME_ONLY_OPTIONS if given[k] is not None})
        if placement_from_command_line:
            chosen.update({k: given[k] for k in PLACEMENT_OPTIONS})
    as_tuples = ("freeze", "average", "val", "lookahead", "graft_hyp")
    return TrainOptions(**{**chosen, **{k: tuple(chosen[k]) for k in as_tuples}})


def check_options(opt: TrainOptions, world: World) -> None:
    """Refuse impossible options, warn about ineffective ones: before anything is written."""
    if opt.epochs < 1 or (opt.batch_size < 1 and opt.batch_size != AUTO_BATCH):
        raise UserError("--epochs must be at least 1, --batch-size at least 1 (or -1: measure and choose)")
    if not 0 < opt.autobatch_fraction <= 1:
        raise UserError(f"--autobatch-fraction {opt.autobatch_fraction} must be above 0 and at most 1")
    if opt.batch_size % world.size and not opt.graft and opt.batch_size != AUTO_BATCH:
        raise UserError(
            f"--batch-size {opt.batch_size} is the global batch: it must be a multiple of the "
            f"{world.size} processes (each takes an equal share)"
        )
    if not 0 <= opt.swa_epochs <= opt.epochs:
        raise UserError(f"--swa-epochs {opt.swa_epochs} must be between 0 and --epochs {opt.epochs}")
    if opt.bn_images < 0:
        raise UserError(f"--bn-images {opt.bn_images}: a number of images, or 0 for all of the train split")
    check_range(
        "--label-smoothing",
        opt.label_smoothing,
        0,
        1,
        high_in=False,
        meaning="the share of a target spread over both classes: at 1 every target is 0.5, above it they invert",
    )
    check_range("--save-interval", opt.save_interval, 0, meaning="minutes between mid-epoch last.pt writes; 0: off")
    check_range("--seed", opt.seed, 0, 2**32 - world.size, meaning="NumPy's seeds, plus the rank with --graft")
    if opt.trust_pickle and not opt.weights:
        LOGGER.warning("WARNING: --trust-pickle only acts on a --weights file; ignored")
    if opt.autobatch_fraction != AUTOBATCH_FRACTION and opt.batch_size != AUTO_BATCH:
        LOGGER.warning(
            f"WARNING: --autobatch-fraction {opt.autobatch_fraction:g} only acts with --batch-size -1 (AutoBatch); "
            "ignored"
        )
    if opt.raw and not opt.weights:
        raise UserError("--raw picks the raw weights of the --weights checkpoint; give --weights too")
    if opt.workers < 0 or opt.patience < 0 or opt.max_bad_steps < 1:
        raise UserError("--workers and --patience must not be negative, --max-bad-steps at least 1")
    if any(f < 0 for f in opt.freeze):
        raise UserError("--freeze takes layer counts or indices, which are not negative")
    if opt.sync_bn and not world.distributed:
        LOGGER.warning("WARNING: --sync-bn only acts under torchrun with several processes; ignored")
    if opt.swap_epoch and not 0 < opt.swap_epoch < opt.epochs:
        raise UserError(f"--swap-epoch {opt.swap_epoch} must be between 1 and --epochs - 1 ({opt.epochs - 1})")
    if opt.swap_epoch and not world.distributed:
        raise UserError(
            "--swap-epoch needs several processes to average: run under torchrun, e.g. "
            "torchrun --nproc_per_node 2 train.py --swap-epoch E"
        )
    if opt.swap_epoch and opt.sync_bn:
        raise UserError("--swap-epoch trains each process alone in its second phase; --sync-bn would tie them: drop it")
    if opt.graft and not world.distributed:
        raise UserError(
            "--graft grafts the networks of several processes into each other: run under torchrun, e.g. "
            "torchrun --nproc_per_node 2 train.py --graft"
        )
    if opt.graft and (opt.swap_epoch or opt.sync_bn):
        raise UserError("--graft trains a network per process: it does not combine with --swap-epoch or --sync-bn")
    if opt.lookahead and (opt.swap_epoch or opt.graft):
        raise UserError(
            "--lookahead does not combine with --swap-epoch or --graft: their averages and grafts act on the "
            "model's (fast) weights, which Lookahead moves back toward its slow ones"
        )
    if opt.graft_hyp and not opt.graft:
        raise UserError("--graft-hyp gives each process of a --graft run its hyp file; give --graft too")
    if opt.graft_hyp and len(opt.graft_hyp) != world.size:
        raise UserError(
            f"--graft-hyp gives {len(opt.graft_hyp)} hyp files for {world.size} processes: give one each (a "
            f"resumed run continues with the processes it started with: torchrun --nproc_per_node {len(opt.graft_hyp)})"
        )
    if opt.lookahead_ema != "slow" and not opt.lookahead:
        LOGGER.warning(f"WARNING: --lookahead-ema {opt.lookahead_ema} only acts with --lookahead; ignored")
    if opt.swa_source != "ema" and not opt.swa_epochs:
        LOGGER.warning(f"WARNING: --swa-source {opt.swa_source} only acts with --swa-epochs K; ignored")
    if opt.bn_images != RECALIBRATION_IMAGES and not (opt.swa_epochs or opt.swap_epoch):
        LOGGER.warning(f"WARNING: --bn-images {opt.bn_images} only acts with --swa-epochs or --swap-epoch; ignored")
    if "raw" in opt.validated and opt.no_ema:
        LOGGER.warning("WARNING: with --no-ema the validated weights are the raw ones; --val raw adds the same numbers")
    if opt.no_ema and opt.ema != "steps":
        raise UserError(f"--no-ema turns the EMA off; --ema {opt.ema} chooses its rule: give one of them")
    if opt.posthoc_ema < 0 or opt.posthoc_ema == 1:
        raise UserError(
            f"--posthoc-ema {opt.posthoc_ema}: the number of snapshots to save, at least 2 "
            "(a reconstruction needs several; 0 turns post-hoc EMA off)"
        )
    if opt.posthoc_ema > opt.epochs:
        LOGGER.warning(
            f"WARNING: --posthoc-ema {opt.posthoc_ema} snapshots over {opt.epochs} epochs: one per epoch, "
            f"{opt.epochs} in all"
        )


def choose_optimizer(opt: TrainOptions, hyp: dict, data: DatasetConfig) -> tuple[str, dict]:
    """--optimizer and hyp as the run will use them: 'auto' is resolved from the planned number of
    optimizer steps, once, and the result recorded in opt.yaml, hyp.yaml and every checkpoint."""
    if opt.optimizer != "auto":
        return opt.optimizer, hyp
    batches_per_epoch = math.ceil(len(list_image_paths(data.train)[0]) / opt.batch_size)
    planned_steps = optimizer_steps(opt.epochs, batches_per_epoch, opt.batch_size)
    name, hyp = resolve_auto_optimizer(opt.optimizer, hyp, planned_steps)
    LOGGER.info(
        f"--optimizer auto: {name} with lr0 {hyp['lr0']:g} for about {planned_steps} optimizer steps "
        f"(SGD from {AUTO_SGD_MIN_STEPS:,} steps on)"
    )
    return name, hyp
