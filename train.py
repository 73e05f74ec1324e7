"""Train a YOLOv5-style detector with a ModelEMA updated after every optimizer step.

    python train.py                                   # yolov5n on the embedded shapes dataset
    python train.py --data coco.yaml --cfg yolov5s.yaml --imgsz 640 --epochs 300
    python train.py --resume [runs/train/exp/weights/last.pt]
    torchrun --nproc_per_node 2 train.py --batch-size 64 --sync-bn   # DDP; --batch-size is the global batch

Each epoch validates the EMA weights, appends a row to results.csv and writes
weights/last.pt (and best.pt) holding everything needed to resume exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.parse import read_model_yaml
from models.yolo import DetectionModel
from utils.augment import round_image_size
from utils.averaging import recalibrate_on_training_batches
from utils.checkpoint import (CheckpointWriter, ema_state, load_checkpoint, load_for_inference, make_checkpoint,
                              model_from_checkpoint, restore_rng_state, save_checkpoint, transfer_matching_weights)
from utils.config_files import resolve_config_path
from utils.data_config import DatasetConfig, load_dataset_config
from utils.dataset import build_train_loader
from utils.device import amp_dtype_for, autocast, describe_precision, select_device, to_model_input
from utils.dist import World, close_process_group, init_process_group, local_main_first, world_from_env
from utils.ema import ModelEMA, UniformAverage, pack_state
from utils.errors import TrainingStopped, UserError, run_cli
from utils.hyp import load_hyp
from utils.labels import list_image_files
from utils.log import LOGGER, RunLogger, interactive, setup_logging
from utils.loss import DetectionLoss
from utils.optim import (AUTO_SGD_MIN_STEPS, NOMINAL_BATCH_SIZE, OPTIMIZERS, BufferSnapshot, TrainSchedule,
                         accumulation_steps, build_optimizer, optimizer_step, resolve_auto_optimizer)
from utils.run_dir import add_run_dir_arguments, newest_last_checkpoint, next_run_dir
from utils.plots import plot_image_batch, plot_labels, plot_results
from utils.sync_bn import convert_sync_batchnorm
from val import EvalResult, build_val_loader, evaluate, results_table, save_validation_plots

DEFAULT_CFG = "yolov5n.yaml"
LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")
RUNTIME_ONLY_OPTIONS = ("device", "workers")  # may change on --resume: they do not change the results


@dataclass
class LoopState:
    """Where training stands: the next epoch and batch to run, and what that epoch has counted so far.

    Saved in every checkpoint, so --resume continues at exactly that batch with the same totals."""

    epoch: int = 0
    batch: int = 0                  # next micro-batch of the epoch
    optimizer_steps: int = 0        # steps taken or skipped since the start of training
    window: int = 0                 # micro-batches accumulated since the last step (0 in a checkpoint)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # the epoch's [box, obj, cls] so far
    skipped_steps: int = 0          # of this epoch, for a non-finite loss or gradient
    bad_streak: int = 0             # skipped steps in a row
    best_fitness: float = 0.0
    best_epoch: int = 0

    def record_step(self, taken: bool) -> None:
        self.optimizer_steps += 1
        self.window = 0
        self.skipped_steps += not taken
        self.bad_streak = 0 if taken else self.bad_streak + 1

    def start_next_epoch(self) -> None:
        self.epoch, self.batch, self.skipped_steps = self.epoch + 1, 0, 0
        self.loss_sum = torch.zeros_like(self.loss_sum)

    def state_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "loss_sum": self.loss_sum.detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LoopState":
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a YOLOv5-style detector with EMA weight averaging.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="", help="initial weights: a checkpoint of this framework ('' = from scratch)")
    p.add_argument("--raw", action="store_true",
                   help="with --weights: start from the checkpoint's raw model weights instead of its EMA")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --weights to be a pickled YOLOv5 checkpoint (unpickling can run code: trusted files only)")
    p.add_argument("--cfg", default="", help=f"model YAML (default: the --weights checkpoint's, else {DEFAULT_CFG})")
    p.add_argument("--data", default="data/shapes.yaml", help="dataset YAML (shapes.yaml is generated on first use)")
    p.add_argument("--hyp", default="hyp/scratch-low.yaml", help="hyperparameter YAML")
    p.add_argument("--epochs", type=int, default=30, help="total training epochs")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per micro-batch, over all ranks under torchrun (gradients accumulate to 64)")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=320, help="train and val image size (pixels)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume the newest run under --project, or the given last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate the final epoch")
    p.add_argument("--cache", nargs="?", const="ram", default="auto", choices=("auto", "ram", "off"),
                   help="cache decoded train images in RAM; auto: when they take under 10%% of the available memory")
    p.add_argument("--device", default=None, help="cuda device, i.e. 0, or cpu (default: CUDA if available)")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--no-ema", action="store_true",
                   help="no weight averaging: validate and save the raw weights (decay 0, for an honest comparison)")
    p.add_argument("--val-raw", action="store_true", help="also validate the raw model each epoch (raw/... columns)")
    p.add_argument("--swa-epochs", type=int, default=0,
                   help="SWA: average the weights at the end of each of the last K epochs into weights/swa.pt")
    p.add_argument("--swa-source", choices=("ema", "raw"), default="ema", help="what SWA averages")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over all ranks' batches")
    p.add_argument("--optimizer", default="auto", choices=OPTIMIZERS,
                   help="auto: AdamW (lr0 0.003) for runs under 10,000 optimizer steps, else SGD with the hyp's lr0")
    p.add_argument("--workers", type=int, default=None, help="max dataloader workers (default: 8, capped by cores)")
    add_run_dir_arguments(p, "runs/train")
    p.add_argument("--cos-lr", action="store_true", help="cosine learning-rate schedule")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="early stopping: epochs without improvement (0: off)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: first N, or a list of indices")
    p.add_argument("--save-period", type=int, default=-1, help="also save epochN.pt every N epochs (< 1: off)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (default: fp16 on CUDA, bf16 on CPUs with bf16)")
    p.add_argument("--float64", action="store_true",
                   help="train in double precision, without autocast (several times slower): for checking numerics, "
                        "e.g. that torchrun's processes together compute what one process does")
    p.add_argument("--no-plots", action="store_true", help="do not save plots")
    p.add_argument("--save-interval", type=float, default=10.0,
                   help="also write last.pt every N minutes inside an epoch, at a step boundary (0: off)")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many optimizer steps in a row skipped for a non-finite loss or gradient")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only: a resumed run then equals an uninterrupted one bit for bit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = world_from_env()
    setup_logging(world.rank)
    code = run(args, parser, world)
    close_process_group()  # not after an exception: torchrun then ends the other ranks' processes
    return code


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, world: World) -> int:
    """Check the options, data and model, prepare the run folder, then train (under torchrun:
    in every process, each of which finds the same options, data and checkpoint)."""
    if args.resume:
        checkpoint_path = Path(args.resume) if isinstance(args.resume, str) else newest_last_checkpoint(Path(args.project))
        checkpoint = load_checkpoint(checkpoint_path)
        opt = resumed_options(args, parser, checkpoint)
        if checkpoint.get("finished") or checkpoint["loop"]["epoch"] >= opt.epochs:
            LOGGER.info(f"{checkpoint_path} is from a finished run ({checkpoint['loop']['epoch']} epochs); nothing to resume")
            return 0
        hyp = checkpoint["hyp"]
    else:
        opt, checkpoint = args, None
        opt.device = "" if opt.device is None else opt.device
        opt.workers = 8 if opt.workers is None else opt.workers
        hyp = load_hyp(opt.hyp)
    check_options(opt, world)
    device = select_device(opt.device)
    init_process_group(world, device)
    if opt.deterministic:
        use_deterministic_algorithms()
    seed_everything(opt.seed)  # before the model exists: its initial weights come from this seed
    with local_main_first(world):  # the embedded dataset is generated once per machine
        data = load_dataset_config(opt.data)
    model = model_for_run(opt, data, checkpoint)
    opt.imgsz = round_image_size(opt.imgsz, int(model.stride.max()))  # decided here, before opt.yaml is written
    if checkpoint is None:
        opt.optimizer, hyp = choose_optimizer(opt, hyp, data)
    # Everything the user gave is checked before the run folder exists: a mistake leaves no trace.
    if checkpoint is not None:
        run_dir = checkpoint_path.resolve().parent.parent
        position = checkpoint["loop"]
        LOGGER.info(f"Resuming {run_dir} at epoch {position['epoch']} of {opt.epochs}"
                    + (f", batch {position['batch']}" if position["batch"] else ""))
    elif world.is_main:
        run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
        (run_dir / "opt.yaml").write_text(yaml.safe_dump(vars(opt), sort_keys=False))
        (run_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
    run_dir = world.from_main(run_dir if world.is_main else None)  # only rank 0 writes in it
    try:
        train(opt, hyp, data, model, run_dir, checkpoint, world, device)
    except KeyboardInterrupt:
        last = run_dir / "weights" / "last.pt"
        LOGGER.info(f"\nInterrupted. Continue with: python train.py --resume {last}" if last.exists()
                    else "\nInterrupted before the first checkpoint was written.")
        return 130
    return 0


def resumed_options(args: argparse.Namespace, parser: argparse.ArgumentParser, checkpoint: dict) -> argparse.Namespace:
    """The original run's options; only runtime-only ones may be overridden, others are reported as ignored."""
    # Defaults first: options added since the checkpoint was written take their default value.
    opt = argparse.Namespace(**{**vars(parser.parse_args([])), **checkpoint["opt"], "resume": False})
    ignored = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
               if k not in (*RUNTIME_ONLY_OPTIONS, "resume", "project") and v != parser.get_default(k)]
    if ignored:
        LOGGER.warning(f"WARNING: --resume continues with the run's original options; ignoring {' '.join(ignored)}")
    for name in RUNTIME_ONLY_OPTIONS:
        if getattr(args, name) is not None:
            setattr(opt, name, getattr(args, name))
    return opt


def choose_optimizer(opt: argparse.Namespace, hyp: dict, data: DatasetConfig) -> tuple[str, dict]:
    """--optimizer and hyp as the run will use them: 'auto' is resolved from the planned number of
    optimizer steps, once, and the result recorded in opt.yaml, hyp.yaml and every checkpoint."""
    if opt.optimizer != "auto":
        return opt.optimizer, hyp
    images = len(list_image_files(data.train)[0])
    planned_steps = opt.epochs * math.ceil(math.ceil(images / opt.batch_size) / accumulation_steps(opt.batch_size))
    name, hyp = resolve_auto_optimizer(opt.optimizer, hyp, planned_steps)
    LOGGER.info(f"--optimizer auto: {name} with lr0 {hyp['lr0']:g} for about {planned_steps} optimizer steps "
                f"(SGD from {AUTO_SGD_MIN_STEPS:,} steps on)")
    return name, hyp


def check_options(opt: argparse.Namespace, world: World) -> None:
    if opt.epochs < 1 or opt.batch_size < 1 or opt.imgsz < 32:
        raise UserError("--epochs and --batch-size must be at least 1, --imgsz at least 32")
    if opt.batch_size % world.size:
        raise UserError(f"--batch-size {opt.batch_size} is the global batch: it must be a multiple of the "
                        f"{world.size} processes (each takes an equal share)")
    if not 0 <= opt.swa_epochs <= opt.epochs:
        raise UserError(f"--swa-epochs {opt.swa_epochs} must be between 0 and --epochs {opt.epochs}")
    if opt.sync_bn and not world.distributed:
        LOGGER.warning("WARNING: --sync-bn only acts under torchrun with several processes; ignored")
    if opt.raw and not opt.weights:
        raise UserError("--raw picks the raw weights of the --weights checkpoint; give --weights too")
    if opt.swa_source != "ema" and not opt.swa_epochs:
        LOGGER.warning(f"WARNING: --swa-source {opt.swa_source} only acts with --swa-epochs K; ignored")
    if opt.val_raw and opt.no_ema:
        LOGGER.warning("WARNING: with --no-ema the validated weights are the raw ones; --val-raw adds the same numbers")
    if opt.workers < 0 or opt.patience < 0 or opt.save_interval < 0 or opt.max_bad_steps < 1:
        raise UserError("--workers, --patience and --save-interval must not be negative, --max-bad-steps at least 1")
    if any(f < 0 for f in opt.freeze):
        raise UserError("--freeze takes layer counts or indices, which are not negative")


def model_for_run(opt: argparse.Namespace, data: DatasetConfig, checkpoint: dict | None) -> DetectionModel:
    """The run's model: the resumed checkpoint's, else --cfg (or the --weights checkpoint's YAML)
    with --weights transferred; checked against the dataset and --freeze."""
    nc = 1 if opt.single_cls else data.nc
    if checkpoint is not None:
        if checkpoint["model_yaml"]["nc"] != nc:
            raise UserError(f"the resumed run trained {checkpoint['model_yaml']['nc']} classes, but {data.source} "
                            f"now has {nc}; start a new run with --weights instead")
        model = DetectionModel(checkpoint["model_yaml"], nc=nc)
    else:
        initial = load_checkpoint(opt.weights, trust_pickle=opt.trust_pickle) if opt.weights else None
        if opt.cfg or initial is None:
            model = DetectionModel(read_model_yaml(resolve_config_path(opt.cfg or DEFAULT_CFG, "models")), nc=nc)
        else:
            model = DetectionModel(initial["model_yaml"], nc=nc)
        if initial is not None:
            # Anchors come from the model YAML when one is named explicitly, as in YOLOv5.
            weights = "model" if opt.raw else "ema"
            moved, total = transfer_matching_weights(model, initial, exclude=("anchors",) if opt.cfg else (),
                                                     weights=weights)
            LOGGER.info(f"Transferred {moved}/{total} tensors from {opt.weights} ({weights} weights); a fresh "
                        "optimizer and an EMA starting from them")
            trained_nc = initial["model_yaml"].get("nc")
            if trained_nc is not None and trained_nc != nc:
                LOGGER.info(f"{opt.weights} detects {trained_nc} classes and {data.source} has {nc}: the Detect "
                            "head's output layers start afresh")
    head_index = len(model.model) - 1
    frozen = list(range(opt.freeze[0])) if len(opt.freeze) == 1 else opt.freeze
    if any(i >= head_index for i in frozen):
        raise UserError(f"--freeze {' '.join(map(str, opt.freeze))} would freeze the Detect head (layer {head_index}); "
                        f"freeze at most the first {head_index} layers")
    freeze_layers(model, frozen)
    return model


def freeze_layers(model: DetectionModel, layers: list[int]) -> None:
    """Stop gradients for the parameters of the given layer indices."""
    prefixes = tuple(f"model.{i}." for i in layers)
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    if prefixes:
        LOGGER.info(f"Froze layers {', '.join(str(i) for i in layers)}")


def use_deterministic_algorithms() -> None:
    """Only deterministic kernels (an op without one fails loudly instead of varying)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by CUDA's deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation draws from torch's generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def metric_columns(prefix: str, result: EvalResult | None) -> dict:
    """P, R, mAP@0.5, mAP@0.5:0.95 under `prefix` (zeros for an epoch not validated)."""
    metrics = result.metrics if result is not None else None
    values = (metrics.precision, metrics.recall, metrics.map50, metrics.map50_95) if metrics else (0.0,) * 4
    return {f"{prefix}{name}": v for name, v in zip(("precision", "recall", "mAP_0.5", "mAP_0.5:0.95"), values)}


def results_row(mean_loss: list[float], result: EvalResult | None, optimizer: torch.optim.Optimizer,
                ema_updates: int, val_raw: bool = False, raw_result: EvalResult | None = None) -> dict:
    """One results.csv row: the epoch's train losses, the EMA's validation metrics and losses,
    the raw model's metrics with --val-raw, each group's learning rate and the EMA's update count."""
    row = {f"train/{n}": v for n, v in zip(LOSS_NAMES, mean_loss)}
    row.update(metric_columns("metrics/", result))
    val_losses = result.loss.tolist() if result is not None else [0.0] * len(LOSS_NAMES)
    row.update({f"val/{n}": v for n, v in zip(LOSS_NAMES, val_losses)})
    if val_raw:
        row.update(metric_columns("raw/", raw_result))
    row.update({f"x/lr{k}": group["lr"] for k, group in enumerate(optimizer.param_groups)})
    row["ema/updates"] = ema_updates
    return row


def finish_swa(swa: UniformAverage, last: dict, train_loader: torch.utils.data.DataLoader, opt: argparse.Namespace,
               device: torch.device, amp_dtype: torch.dtype | None, val_loader: torch.utils.data.DataLoader,
               weights_dir: Path) -> None:
    """Recompute the SWA average's BatchNorm statistics on the last epoch's training batches
    (augmented: see recalibrate_on_training_batches), validate it and save weights/swa.pt (the
    checkpoint format, with the average as both 'ema' and 'model'; 'swa' keeps the plain average)."""
    # Rebuilt from the checkpoint: plain BatchNorm where the run had SyncBatchNorm (rank 0 works alone here).
    average = model_from_checkpoint({**last, "ema": swa.module.state_dict()}, "ema", source="the SWA average")
    average.to(device, memory_format=torch.channels_last)
    images = recalibrate_on_training_batches(average, train_loader.dataset, epoch=last["epoch"],
                                             batch_size=train_loader.batch_size, workers=opt.workers, seed=opt.seed,
                                             device=device, amp_dtype=amp_dtype)
    result = evaluate(average, val_loader, device=device, amp_dtype=amp_dtype)
    source = f"SWA of the {opt.swa_source} weights at the end of the last {swa.updates} epochs, " \
             f"BatchNorm statistics recomputed on {images} augmented training images"
    LOGGER.info(f"{source}:\n{results_table(result, list(average.names))}")
    state = {k: v.detach().cpu().clone() for k, v in average.state_dict().items()}
    save_checkpoint(weights_dir / "swa.pt", {**last, "ema": state, "model": state, "optimizer": None, "scaler": None,
                                             "source": source})
    LOGGER.info(f"Saved {weights_dir / 'swa.pt'}")


def last_checkpoint_name(writer: CheckpointWriter | None) -> str:
    """The run's last.pt for messages, as far as this rank knows (rank 0 writes it)."""
    if writer is None:
        return "see rank 0's message"
    return str(writer.last_path) if writer.last_path.exists() else "none yet"


def train(opt: argparse.Namespace, hyp: dict, data: DatasetConfig, model: DetectionModel, run_dir: Path,
          checkpoint: dict | None, world: World, device: torch.device) -> None:
    """The training loop: epochs of accumulated AMP steps with an EMA, validated and checkpointed.

    Under torchrun every rank runs it on its share of each global batch, through
    DistributedDataParallel; rank 0 alone keeps the EMA, validates, logs, plots and writes
    checkpoints while the others wait for its verdict on early stopping."""
    weights_dtype = torch.float64 if opt.float64 else torch.float32
    amp_dtype = amp_dtype_for(device, enabled=not opt.no_amp, weights_dtype=weights_dtype)
    weights_dir = run_dir / "weights"
    if world.is_main:
        weights_dir.mkdir(parents=True, exist_ok=True)
    names = ["item"] if opt.single_cls else list(data.names)
    model.names, model.hyp = names, hyp
    model.to(device, weights_dtype, memory_format=torch.channels_last)  # before a resumed state is loaded into it
    if opt.sync_bn and world.distributed:
        model = convert_sync_batchnorm(model, device)
    pack_state(model)  # state in two flat tensors: the EMA update is then one lerp_ and one copy_ (utils/ema.py)
    LOGGER.info(f"Model: {model.summary(opt.imgsz)}")
    if hyp["copy_paste"] > 0:
        LOGGER.warning("WARNING: copy_paste needs segment labels; with box labels it has no effect (as in YOLOv5)")

    # Data
    pin_memory = device.type == "cuda"
    report_path = run_dir / "data_report.txt" if world.is_main else None  # every skipped or repaired file
    if report_path is not None:
        report_path.unlink(missing_ok=True)  # rewritten at each start
    train_loader = build_train_loader(data, hyp, opt.imgsz, opt.batch_size, opt.workers, opt.seed, opt.single_cls,
                                      opt.cache or "auto", pin_memory, report_path, opt.epochs, world)
    val_loader = build_val_loader(data.val, data.nc, opt.imgsz, opt.batch_size // world.size * 2, opt.workers, hyp,
                                  int(model.stride.max()), single_cls=opt.single_cls, pin_memory=pin_memory,
                                  report_path=report_path) if world.is_main else None
    batches_per_epoch = len(train_loader)
    plots = not opt.no_plots and world.is_main
    if plots and checkpoint is None:
        plot_labels(np.concatenate(train_loader.dataset.labels), names, run_dir / "labels.jpg")

    # Optimisation
    schedule = TrainSchedule(hyp, opt.epochs, batches_per_epoch, opt.batch_size, cos_lr=opt.cos_lr)
    accumulate = schedule.full_accumulate
    weight_decay = hyp["weight_decay"] * opt.batch_size * accumulate / NOMINAL_BATCH_SIZE
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # The EMA lives on rank 0 alone, which validates and saves it. Parameters are equal on all ranks
    # after every step (DDP averages the gradients); BatchNorm statistics are equal with --sync-bn,
    # and without it rank 0's are the ones DDP broadcasts to every rank before each forward
    # (broadcast_buffers). Averaging rank 0's model is therefore averaging the model every rank
    # runs, with no collective and no copy of the EMA on the other ranks.
    # --no-ema keeps the same machinery with d = 0: the "average" is then the raw model itself.
    ema = ModelEMA(model, decay=0.0 if opt.no_ema else hyp["ema_decay"], tau=hyp["ema_tau"]) if world.is_main else None
    swa = UniformAverage(ema.module if opt.swa_source == "ema" else model) if opt.swa_epochs and world.is_main else None
    criterion = DetectionLoss(model.detect_head, hyp, opt.imgsz, label_smoothing=opt.label_smoothing, world=world)
    val_criterion = DetectionLoss(model.detect_head, hyp, opt.imgsz, label_smoothing=opt.label_smoothing)
    loop = LoopState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(ema_state(checkpoint))
        if swa is not None and checkpoint.get("swa"):
            swa.load_state_dict(checkpoint["swa"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        loop = LoopState.from_state_dict(checkpoint["loop"])
    patience = opt.patience or math.inf  # 0 turns early stopping off, as in YOLOv5
    planned_steps = (opt.epochs - loop.epoch) * math.ceil(batches_per_epoch / accumulate)  # warmup adds a few
    if ema is not None and opt.no_ema:
        LOGGER.info("--no-ema: no weight averaging; the raw weights are validated and saved as 'ema' too")
    elif ema is not None:
        final_decay = ema.decay * (1 - math.exp(-(ema.updates + planned_steps) / ema.tau))
        LOGGER.info(f"EMA: decay {ema.decay} ramped over tau={ema.tau:g} updates; about {planned_steps} more "
                    f"optimizer steps are planned, ending near d={final_decay:.3g}"
                    + (" (the average stays close to the raw weights; raise epochs or lower ema_tau in the hyp "
                       "file to average more)" if final_decay < 0.5 else ""))
    logger = RunLogger(run_dir, loop.epoch) if world.is_main else None
    ranks = (f" over {world.size} processes ({opt.batch_size // world.size} each"
             f"{', SyncBatchNorm' if opt.sync_bn else ''})" if world.distributed else "")
    if world.is_main:
        LOGGER.info(f"{describe_precision(amp_dtype, weights_dtype)} on {device}; batch {opt.batch_size}{ranks} "
                    f"x {accumulate} accumulated, {batches_per_epoch} batches per epoch, "
                    f"{len(val_loader.dataset)} val images\n"
                    f"Logging to {run_dir}; training for {opt.epochs} epochs...")

    writer = CheckpointWriter(weights_dir, opt.save_interval) if world.is_main else None
    buffers = BufferSnapshot(model)
    # Forward passes go through DDP, which averages the gradients over the ranks in backward; the
    # optimizer, EMA, clipping and checkpoints use the bare model, whose tensors DDP shares.
    forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model

    def checkpoint_now(finished: bool = False) -> dict:
        return make_checkpoint(loop=loop.state_dict(), finished=finished, model=model, ema=ema, optimizer=optimizer,
                               scaler=scaler, names=names, hyp=hyp, opt=vars(opt), world_size=world.size, swa=swa)

    started, first_epoch = time.time(), loop.epoch
    while loop.epoch < opt.epochs:
        epoch = loop.epoch
        forward_model.train()
        if hyp["close_mosaic"] and epoch == opt.epochs - hyp["close_mosaic"]:
            LOGGER.info(f"Closing mosaic (and mixup) for the last {int(hyp['close_mosaic'])} epochs")
        # A resume may start mid-epoch: each rank skips its share of the global batches already taken.
        train_loader.sampler.set_epoch(epoch, skip=loop.batch * train_loader.batch_size)
        loop.loss_sum = loop.loss_sum.to(device)
        optimizer.zero_grad(set_to_none=True)
        bad_window = False  # a micro-batch of the current window had a non-finite loss
        bar = tqdm(train_loader, initial=loop.batch, total=batches_per_epoch, bar_format="{l_bar}{bar:10}{r_bar}",
                   disable=not interactive() or not world.is_main)
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", *LOSS_NAMES, "Instances", "Size"))
        for i, batch in enumerate(bar, start=loop.batch):
            step = i + batches_per_epoch * epoch  # micro-batches since the start of training
            # Step once the window is full; the last window of an epoch steps with what it has.
            window_full = loop.window + 1 >= schedule.accumulate(step) or i + 1 == batches_per_epoch
            images = to_model_input(batch.images, device, weights_dtype)
            buffers.take()
            # Under DDP, gradients are averaged over the ranks only in the window's last backward.
            with forward_model.no_sync() if world.distributed and not window_full else contextlib.nullcontext():
                with autocast(device, amp_dtype):
                    raw = forward_model(images)
                loss, loss_items = criterion(raw, batch.targets)
                # The loss items summed over the ranks, and on how many ranks the loss is not finite.
                summed = world.sum(torch.cat((loss_items, (~torch.isfinite(loss)).float().reshape(1))))
                if summed[3] == 0:
                    scaler.scale(loss).backward()
                    loop.loss_sum += summed[:3]
                else:  # undo this forward's BatchNorm statistics; the window's step is skipped on every rank
                    buffers.restore()
                    bad_window = True
                    if world.distributed:  # DDP's backward is collective: every rank takes part; grads are dropped
                        scaler.scale(loss).backward()
            loop.window += 1
            if window_full:
                if bad_window:
                    optimizer.zero_grad(set_to_none=True)
                    stepped = False
                else:
                    schedule.apply(optimizer, epoch, step)
                    stepped = optimizer_step(optimizer, scaler, model, ema)  # the EMA moves with each taken step
                loop.record_step(stepped)
                bad_window = False
                if loop.bad_streak >= opt.max_bad_steps:
                    raise TrainingStopped(
                        f"{loop.bad_streak} optimizer steps in a row had a non-finite loss or gradient, so training "
                        f"stopped; no such value reached the weights or a checkpoint. Last good checkpoint: "
                        f"{last_checkpoint_name(writer)}. Try a lower lr0, --no-amp, "
                        f"or check the data (see data_report.txt)")
                if writer is not None and writer.due() and i + 1 < batches_per_epoch:
                    loop.batch = i + 1
                    writer.write(checkpoint_now())
            if plots and step < 3:  # the first batches exactly as the model saw them
                plot_image_batch(batch.images, batch.targets.numpy(), names, run_dir / f"train_batch{step}.jpg")
            mean_loss = (loop.loss_sum / (i + 1)).tolist()
            memory = f"{torch.cuda.memory_reserved(device) / 2**30:.3g}G" if device.type == "cuda" else "cpu"
            progress = ("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{opt.epochs - 1}", memory, *mean_loss,
                                                     len(batch.targets), images.shape[-1])
            bar.set_description(progress)
        bar.close()
        if not interactive() and world.is_main:
            LOGGER.info(progress)
        if loop.skipped_steps:
            LOGGER.warning(f"WARNING: {loop.skipped_steps} optimizer step(s) of this epoch skipped for a non-finite "
                           "loss or gradient; the EMA did not move on those")

        final_epoch = epoch + 1 == opt.epochs
        stop_early = False
        if world.is_main:  # the other ranks wait for its verdict on early stopping, below
            ema.copy_attributes(model)  # validate what we ship: the EMA, carrying the model's attributes
            if swa is not None and epoch >= opt.epochs - opt.swa_epochs:
                swa.update(ema.module if opt.swa_source == "ema" else model)
            validate = not opt.noval or final_epoch
            result = evaluate(ema.module, val_loader, device=device, amp_dtype=amp_dtype, loss_fn=val_criterion) \
                if validate else None
            if result is not None:
                LOGGER.info(results_table(result, names))
            raw_result = evaluate(model, val_loader, device=device, amp_dtype=amp_dtype) \
                if validate and opt.val_raw else None
            if raw_result is not None:
                LOGGER.info(f"raw model: mAP50 {raw_result.metrics.map50:.3g}, mAP50-95 {raw_result.metrics.map50_95:.3g}")
            fitness = result.metrics.fitness if result is not None else 0.0
            is_best = fitness >= loop.best_fitness
            if is_best:
                loop.best_fitness, loop.best_epoch = fitness, epoch
            logger.log_epoch(epoch, results_row(mean_loss, result, optimizer, ema.updates, opt.val_raw, raw_result))
            stop_early = epoch - loop.best_epoch >= patience and not final_epoch

        loop.start_next_epoch()
        if world.is_main and (not opt.nosave or final_epoch or stop_early):
            save_copy = opt.save_period > 0 and epoch % opt.save_period == 0
            writer.write(checkpoint_now(finished=final_epoch or stop_early), best=is_best,
                         copy_name=f"epoch{epoch}.pt" if save_copy else None)
        if world.from_main(stop_early):
            LOGGER.info(f"Stopping early: no improvement for {opt.patience} epochs; best was epoch {loop.best_epoch}")
            break

    if not world.is_main:
        return
    logger.close()
    LOGGER.info(f"\n{loop.epoch - first_epoch} epochs completed in {(time.time() - started) / 3600:.3f} hours.")
    if plots:
        plot_results(logger.csv_path, run_dir / "results.png")
    if swa is not None and swa.updates:
        finish_swa(swa, checkpoint_now(finished=True), train_loader, opt, device, amp_dtype, val_loader, weights_dir)
    elif swa is not None:
        LOGGER.warning(f"WARNING: training stopped before the last {opt.swa_epochs} epochs, so SWA averaged "
                       "nothing and no swa.pt was written")
    if writer.best_path.exists():
        LOGGER.info(f"Validating {writer.best_path}...")
        _, best_model = load_for_inference(writer.best_path, "ema", device)
        result = evaluate(best_model, val_loader, device=device, amp_dtype=amp_dtype, plot_dir=run_dir if plots else None)
        LOGGER.info(results_table(result, names, verbose=True))
        if plots:
            save_validation_plots(result, names, run_dir)
    LOGGER.info(f"Results saved to {run_dir}")


if __name__ == "__main__":
    run_cli(main, "train.py")
