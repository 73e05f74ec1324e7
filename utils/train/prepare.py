"""Setting a training run up: options, device, data, model and run folder, decided once and in order.

Everything the user gave is checked before the run folder exists, so a mistake leaves no trace.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import yaml

from models.yolo import DetectionModel, build_model
from utils.checkpoint.format import load_checkpoint, training_state, transfer_matching_weights
from utils.data.config import DatasetConfig, load_dataset_config
from utils.data.labels import write_data_report
from utils.data.loader import build_train_dataset, build_val_loader
from utils.device import select_device
from utils.dist import World, init_process_group, local_main_first
from utils.errors import UserError
from utils.hyp import load_hyp
from utils.image_size import check_image_size
from utils.log import LOGGER
from utils.run_dir import RunDirLock, newest_last_checkpoint, next_run_dir, run_dir_of
from utils.train.config import RunConfig, TrainOptions, check_options, choose_optimizer, options_for_run
from utils.train.rng import seed_everything, use_deterministic_algorithms
from utils.train.run import TrainingRun

DEFAULT_CFG = "yolov5n.yaml"


def prepare_run(args: argparse.Namespace, defaults: dict, world: World) -> TrainingRun | None:
    """The run train.py's command line asks for, ready to train (under torchrun: in every
    process, each of which finds the same options, data and checkpoint); None when a resumed
    run has already finished. `defaults`: the command line's default values."""
    resumed_path = resumed = None
    if args.resume:
        resumed_path = Path(args.resume) if isinstance(args.resume, str) else newest_last_checkpoint(Path(args.project))
        resumed = load_checkpoint(resumed_path)
    opt = options_for_run(args, defaults, resumed)
    if resumed is not None:
        state = _resumable_state(resumed, resumed_path)
        if resumed.get("finished") or state["loop"]["epoch"] >= opt.epochs:
            LOGGER.info(f"{resumed_path} is from a finished run ({state['loop']['epoch']} epochs); nothing to resume")
            return None
    check_options(opt, world)
    hyp = resumed["hyp"] if resumed is not None else load_hyp(opt.hyp)
    device = select_device(opt.device)
    init_process_group(world, device)
    if opt.deterministic:
        use_deterministic_algorithms()
    seed_everything(opt.seed)  # before the model exists: its initial weights come from this seed
    with local_main_first(world):  # the embedded dataset is generated once per machine
        data = load_dataset_config(opt.data)
    model = model_for_run(opt, data, resumed)
    img_size = check_image_size(opt.imgsz, model, batch_size=opt.batch_size // world.size, device=device, training=True)
    optimizer, hyp = choose_optimizer(opt, hyp, data) if resumed is None else (opt.optimizer, hyp)
    config = RunConfig(opt=replace(opt, imgsz=img_size, optimizer=optimizer), hyp=hyp, data=data, world_size=world.size)
    opt = config.opt
    train_dataset = build_train_dataset(
        data,
        hyp,
        img_size=opt.imgsz,
        seed=opt.seed,
        single_cls=opt.single_cls,
        cache=opt.cache,
        epochs=opt.epochs,
        world=world,
        reported=world.is_main,
    )
    val_loader = (
        build_val_loader(
            data.val,
            data.nc,
            img_size=opt.imgsz,
            batch_size=2 * config.batch_per_process,
            workers=opt.workers,
            hyp=hyp,
            stride=int(model.stride.max()),
            single_cls=opt.single_cls,
            pin_memory=device.type == "cuda",
            reported=True,
        )
        if world.is_main
        else None
    )
    run_dir = lock = None
    if world.is_main:  # only rank 0 writes in the run folder
        run_dir, lock = open_run_dir(config, args, defaults, resumed_path, resumed)
        write_data_report(
            run_dir / "data_report.txt", [("train", train_dataset.scan), ("val", val_loader.dataset.scan)]
        )
    run_dir = world.from_main(run_dir)
    return TrainingRun(
        config,
        model,
        train_dataset,
        val_loader,
        run_dir,
        world,
        device,
        run_dir_lock=lock,
        state=training_state(resumed) if resumed is not None else None,
    )


def _resumable_state(checkpoint: dict, path: Path) -> dict:
    try:
        return training_state(checkpoint)
    except UserError as error:
        raise UserError(f"--resume {path}: {error}") from None


def open_run_dir(
    config: RunConfig, args: argparse.Namespace, defaults: dict, resumed_path: Path | None, resumed: dict | None
) -> tuple[Path, RunDirLock]:
    """The run folder, locked for this run: a new project/name (with opt.yaml and hyp.yaml), or the
    resumed checkpoint's own run folder. A checkpoint copied out of its run folder continues in a
    new folder under --project/--name, never in whatever folder holds the copy."""
    run_dir = run_dir_of(resumed_path) if resumed_path is not None else None
    if run_dir is not None:
        placement = [f"--{k.replace('_', '-')}" for k in ("name", "exist_ok") if getattr(args, k) != defaults[k]]
        if placement:
            LOGGER.warning(f"WARNING: {' '.join(placement)} ignored: the run continues in its own folder {run_dir}")
        lock = RunDirLock(run_dir)
        position = resumed["loop"]
        LOGGER.info(
            f"Resuming {run_dir} at epoch {position['epoch']} of {config.opt.epochs}"
            + (f", batch {position['batch']}" if position["batch"] else "")
        )
        return run_dir, lock
    project, name, exist_ok = (
        (Path(args.project), args.name, args.exist_ok)
        if resumed_path is not None
        else (Path(config.opt.project), config.opt.name, config.opt.exist_ok)
    )
    run_dir = next_run_dir(project, name, exist_ok)
    lock = RunDirLock(run_dir)
    if resumed_path is not None:
        LOGGER.info(
            f"{resumed_path} is not inside its run folder (<run>/weights/ beside the run's opt.yaml): "
            f"resuming at epoch {resumed['loop']['epoch']} of {config.opt.epochs} in a new run folder "
            f"{run_dir}, whose results.csv starts there"
        )
    (run_dir / "opt.yaml").write_text(yaml.safe_dump(config.opt.to_dict(), sort_keys=False))
    (run_dir / "hyp.yaml").write_text(yaml.safe_dump(config.hyp, sort_keys=False))
    return run_dir, lock


def model_for_run(opt: TrainOptions, data: DatasetConfig, checkpoint: dict | None) -> DetectionModel:
    """The run's model: the resumed checkpoint's, else --cfg (or the --weights checkpoint's YAML)
    with --weights transferred; checked against the dataset and --freeze."""
    nc = 1 if opt.single_cls else data.nc
    if checkpoint is not None:
        if checkpoint["model_yaml"]["nc"] != nc:
            raise UserError(
                f"the resumed run trained {checkpoint['model_yaml']['nc']} classes, but {data.source} "
                f"now has {nc}; start a new run with --weights instead"
            )
        model = DetectionModel(checkpoint["model_yaml"], nc=nc)
    else:
        initial = load_checkpoint(opt.weights, opt.trust_pickle, offers_trust_pickle=True) if opt.weights else None
        if opt.cfg or initial is None:
            model = build_model(opt.cfg or DEFAULT_CFG, nc=nc)
        else:
            model = DetectionModel(initial["model_yaml"], nc=nc)
        if initial is not None:
            # Anchors come from the model YAML when one is named explicitly, as in YOLOv5.
            weights = "model" if opt.raw else "ema"
            moved, total = transfer_matching_weights(
                model, initial, exclude=("anchors",) if opt.cfg else (), weights=weights
            )
            LOGGER.info(
                f"Transferred {moved}/{total} tensors from {opt.weights} ({weights} weights); a fresh "
                "optimizer and an EMA starting from them"
            )
            trained_nc = initial["model_yaml"].get("nc")
            if trained_nc is not None and trained_nc != nc:
                LOGGER.info(
                    f"{opt.weights} detects {trained_nc} classes and {data.source} has {nc}: the Detect "
                    "head's output layers start afresh"
                )
    head_index = len(model.model) - 1
    frozen = list(range(opt.freeze[0])) if len(opt.freeze) == 1 else list(opt.freeze)
    if any(i >= head_index for i in frozen):
        raise UserError(
            f"--freeze {' '.join(map(str, opt.freeze))} would freeze the Detect head (layer {head_index}); "
            f"freeze at most the first {head_index} layers"
        )
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
