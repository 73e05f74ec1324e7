"""Setting a training run up: options, device, data, model and run folder, decided once and in order.

Everything the user gave is checked before the run folder exists, so a mistake leaves no trace.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import yaml

from models.yolo import DetectionModel, build_model
from utils.checkpoint.format import (
    describe_kind,
    load_checkpoint,
    matching_weights,
    training_state,
    transfer_matching_weights,
)
from utils.data.config import DatasetConfig, load_dataset_config
from utils.data.file_record import record_data_files
from utils.data.labels import write_data_report
from utils.data.loader import build_train_dataset, build_val_loader, validation_batch_size
from utils.device import select_device
from utils.dist import World, init_process_group, local_main_first
from utils.errors import UserError
from utils.hyp import default_hyp_path, load_hyp
from utils.image_size import check_image_size
from utils.log import LOGGER
from utils.output_paths import check_run_dir, check_writable_folder
from utils.precision import log_choice
from utils.run_dir import RunDirLock, checkpoint_to_resume, next_run_dir, run_dir_of
from utils.train.autoanchor import autoanchor
from utils.train.autobatch import TrainingMemory
from utils.train.config import (
    AUTO_BATCH,
    RunConfig,
    TrainOptions,
    check_options,
    choose_optimizer,
    options_for_run,
    process_batch,
    weights_dtype,
)
from utils.train.loop_state import LoopState
from utils.train.plan import log_plan
from utils.train.precision import recorded_precision, training_precision
from utils.train.rng import seed_everything, use_deterministic_algorithms
from utils.train.run import TrainingRun
from utils.train.separate_processes import process_seed, resumed_state, training_alone

DEFAULT_CFG = "yolov5n.yaml"


def prepare_run(args: argparse.Namespace, defaults: dict, world: World) -> TrainingRun | None:
    """The run train.py's command line asks for, ready to train (under torchrun: in every
    process, each of which finds the same options, data and checkpoint); None when a resumed
    run has already finished. `defaults`: the command line's default values."""
    resumed = state = home = group_device = resumed_path = None
    if args.resume:
        if not isinstance(args.resume, str) and world.distributed:  # rank 0 picks the checkpoint: join the group
            group_device = select_device(args.device)
            init_process_group(world, group_device)
        resumed_path = checkpoint_to_resume(args.resume, Path(args.project), world)
        resumed = load_checkpoint(resumed_path)
        try:
            state = training_state(resumed)
        except UserError as error:
            raise UserError(f"--resume {resumed_path}: {error}") from None
        home = run_dir_of(resumed_path)  # None for a copy outside its run folder: it continues in a new one
        if home is None:
            LOGGER.info(
                f"{resumed_path} is not inside its run folder (<run>/weights/ beside the run's opt.yaml): "
                "it resumes in a new run folder under --project/--name"
            )
    opt = options_for_run(args, defaults, resumed, placement_from_command_line=home is None)
    position = LoopState.from_state_dict(state["loop"]) if state is not None else LoopState()
    if resumed is not None and (resumed.get("finished") or position.epoch >= opt.epochs):
        LOGGER.info(f"{resumed_path} is from a finished run ({position.epoch} epochs); nothing to resume")
        return None
    check_options(opt, world)
    if resumed is None and opt.graft_hyp and opt.hyp:  # (a resumed run's opt.hyp is the default's path)
        raise UserError("--graft-hyp gives every process its hyp file; --hyp would be unused: drop it")
    device = select_device(opt.device)
    if group_device not in (None, device):
        raise UserError(
            f"--resume: the run trained with --device {opt.device}; under torchrun a --resume without a path "
            f"needs it on the command line too: add --device {opt.device}"
        )
    init_process_group(world, device)
    if opt.deterministic:
        use_deterministic_algorithms()
    # Before the model exists: its initial weights come from this seed (with --graft each process's own).
    seed = process_seed(opt.seed, opt.graft, world)
    seed_everything(seed)
    with local_main_first(world):  # the embedded dataset is generated once per machine
        data = load_dataset_config(opt.data)
    world.decided_by_main(lambda: check_run_folder(opt, data, home, resumed_path))
    model = model_for_run(opt, data, resumed)
    if resumed is not None:  # processes training separately: ranks 1.. read their own state and hyp (--graft-hyp)
        alone = training_alone(opt.swap_epoch, opt.graft, position.epoch, world)
        state, hyp = resumed_state(state, resumed, resumed_path, world, alone)
    else:
        hyp = load_process_hyp(opt, world, model.anchor_free)
        opt = replace(opt, hyp=opt.hyp or default_hyp_path(model.anchor_free))
    if model.anchor_free and opt.label_smoothing:
        raise UserError("--label-smoothing applies to YOLOv5's anchor-based loss; the anchor-free loss has none")
    if model.anchor_free and opt.noautoanchor:
        LOGGER.warning("WARNING: --noautoanchor only acts on anchor-based models; this one has no anchors: ignored")
    if model.needs_anchor_fit and opt.noautoanchor:
        raise UserError(
            f"the model YAML gives `anchors: {model.yaml['anchors']}`, a count: the anchors must be fitted to the "
            "training labels, which --noautoanchor turns off; drop --noautoanchor, or list the anchor sizes in the YAML"
        )
    img_size = check_image_size(opt.imgsz, model)
    precision = training_precision(
        opt.amp,
        model,
        hyp,
        img_size=img_size,
        batch=None if opt.batch_size == AUTO_BATCH else process_batch(opt, world.size),
        optimizer=opt.optimizer,
        device=device,
        weights_dtype=weights_dtype(opt),
        world=world,
        recorded=recorded_precision(resumed),
    )
    log_choice(precision, weights_dtype(opt))
    opt = replace(opt, amp=precision.amp)
    memory = TrainingMemory(opt, model, device, world)
    if opt.batch_size != AUTO_BATCH:  # refused now if it cannot fit, before the data is scanned
        optimizer, hyp = choose_optimizer(opt, hyp, data) if resumed is None else (opt.optimizer, hyp)
        memory.check(img_size, process_batch(opt, world.size), optimizer)
    train_dataset = build_train_dataset(
        data,
        hyp,
        img_size=img_size,
        seed=seed,
        single_cls=opt.single_cls,
        cache=opt.cache,
        epochs=opt.epochs,
        world=world,
        reported=world.is_main,
    )
    if resumed is None and not model.anchor_free and not opt.noautoanchor:
        # Before TrainingRun copies the model into its EMA and other averages: they start with these anchors.
        # A resumed run's anchors come back with its checkpoint.
        autoanchor(model, train_dataset, img_size, hyp["anchor_t"], world)
    if opt.batch_size == AUTO_BATCH:  # measured once the anchors are final: the loss depends on them
        # auto: measured with AdamW's state, the larger, and resolved for the batch chosen
        measured_with = "AdamW" if opt.optimizer == "auto" else opt.optimizer
        batch = memory.autobatch(hyp, img_size, measured_with, limit=len(train_dataset))
        opt = replace(opt, batch_size=batch if opt.graft else batch * world.size)
        optimizer, hyp = choose_optimizer(opt, hyp, data)
    config = RunConfig(
        opt=replace(opt, imgsz=img_size, optimizer=optimizer),
        hyp=hyp,
        data=data,
        world_size=world.size,
        precision=precision,
    )
    opt = config.opt
    # Every rank validates its share of the batches each epoch (TrainingRun.val_shard); rank 0 validates
    # the final weights (SWA, best.pt) alone, on all of them.
    val_loader = build_val_loader(
        data.val,
        data.nc,
        img_size=opt.imgsz,
        batch_size=validation_batch_size(config.batch_per_process),
        workers=opt.workers,
        hyp=hyp,
        stride=int(model.stride.max()),
        single_cls=opt.single_cls,
        pin_memory=device.type == "cuda",
        reported=world.is_main,
        world=world,
    )
    run_dir = lock = None
    if world.is_main:  # only rank 0 writes in the run folder
        run_dir, lock = open_run_dir(config, home, position)
        scans = [("train", train_dataset.scan), ("val", val_loader.dataset.scan)]
        write_data_report(run_dir / "data_report.txt", scans)
        record_data_files(run_dir, scans, resumed=home is not None)
    run_dir = world.from_main(run_dir)
    run = TrainingRun(config, model, train_dataset, val_loader, run_dir, world, device, run_dir_lock=lock, state=state)
    if world.is_main:
        log_plan(run, train_dataset, new_run=state is None)
    return run


def check_run_folder(opt: TrainOptions, data: DatasetConfig, home: Path | None, resumed: Path | None) -> None:
    """Before any work, on rank 0 (which writes): a resumed run's own folder can be written; a new run's
    --project/--name can be made and written in, and holds and lies in none of the run's inputs."""
    if home is not None:
        for folder in (home, home / "weights"):  # results.csv and plots; the checkpoints
            check_writable_folder(folder, f"the run folder {home} (--resume continues in it)")
        return
    files = [p for p in (opt.weights, opt.cfg, opt.hyp, *opt.graft_hyp, resumed, data.source) if p]
    check_run_dir(opt.project, opt.name, opt.exist_ok, files, [*data.train, *data.val, *data.test])


def load_process_hyp(opt: TrainOptions, world: World, anchor_free: bool) -> dict:
    """--hyp, or this process's --graft-hyp file. Those files must agree on warmup_epochs, which
    sets the accumulation windows: the processes step, and checkpoint, in lockstep."""
    if not opt.graft_hyp:
        return load_hyp(opt.hyp, anchor_free=anchor_free)
    hyps = [load_hyp(path, anchor_free=anchor_free) for path in opt.graft_hyp]
    if len({h["warmup_epochs"] for h in hyps}) > 1:
        raise UserError(
            "--graft-hyp: the files differ in warmup_epochs, which sets when the processes step; they step in "
            "lockstep, so give them all the same warmup_epochs"
        )
    return hyps[world.rank]


def open_run_dir(config: RunConfig, home: Path | None, position: LoopState) -> tuple[Path, RunDirLock]:
    """The run folder, locked for this run: a resumed checkpoint's own (`home`), else a new
    --project/--name with opt.yaml and hyp.yaml (for a new run, and for a checkpoint copied out
    of its run folder, which never continues in whatever folder holds the copy)."""
    opt = config.opt
    where = f" at epoch {position.epoch} of {opt.epochs}" + (f", batch {position.batch}" if position.batch else "")
    if home is not None:
        lock = RunDirLock(home)
        LOGGER.info(f"Resuming {home}{where}")
        return home, lock
    run_dir = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
    lock = RunDirLock(run_dir)
    if position.epoch or position.batch:
        LOGGER.info(f"Resuming in the new run folder {run_dir}{where}; its results.csv starts there")
    (run_dir / "opt.yaml").write_text(yaml.safe_dump(opt.to_dict(), sort_keys=False))
    (run_dir / "hyp.yaml").write_text(yaml.safe_dump(config.hyp, sort_keys=False))
    return run_dir, lock


def model_for_run(opt: TrainOptions, data: DatasetConfig, checkpoint: dict | None) -> DetectionModel:
    """The run's model: the resumed checkpoint's, else --cfg (or the --weights checkpoint's YAML)
    with --weights transferred; checked against the dataset and --freeze."""
    nc = data.num_classes(opt.single_cls)
    if checkpoint is not None:
        if checkpoint["model_yaml"]["nc"] != nc:
            raise UserError(
                f"the resumed run trained {checkpoint['model_yaml']['nc']} classes, but {data.source} "
                f"now has {nc}; start a new run with --weights instead"
            )
        model = DetectionModel(checkpoint["model_yaml"], nc=nc)
    else:
        initial = (  # mmap: only the weights transferred are read
            load_checkpoint(opt.weights, opt.trust_pickle, offers_trust_pickle=True, mmap=True) if opt.weights else None
        )
        if opt.raw and initial is not None and initial.get("model") is None:
            raise UserError(
                f"--raw: {opt.weights} holds no raw model weights: it is {describe_kind(initial)}. Leave out "
                "--raw to start from its EMA"
            )
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
            warn_partial_transfer(opt, model, initial, weights, classes_differ=trained_nc not in (None, nc))
            if trained_nc is not None and trained_nc != nc:
                restarted = (
                    "the class branch's layers sized by the class count start afresh; the box branch and DFL "
                    "keep their weights"
                    if model.anchor_free
                    else "the Detect head's output layers start afresh"
                )
                LOGGER.info(f"{opt.weights} detects {trained_nc} classes and {data.source} has {nc}: {restarted}")
    head_index = len(model.model) - 1
    frozen = list(range(opt.freeze[0])) if len(opt.freeze) == 1 else list(opt.freeze)
    if any(i >= head_index for i in frozen):
        raise UserError(
            f"--freeze {' '.join(map(str, opt.freeze))} would freeze the Detect head (layer {head_index}); "
            f"freeze at most the first {head_index} layers"
        )
    freeze_layers(model, frozen)
    return model


def warn_partial_transfer(
    opt: TrainOptions, model: DetectionModel, initial: dict, weights: str, classes_differ: bool
) -> None:
    """Warn when --weights leaves tensors untransferred that a class count change does not explain
    (those of the Detect head): a --cfg of another architecture or scale starts mostly from scratch."""
    matched = matching_weights(model, initial, exclude=("anchors",) if opt.cfg else (), weights=weights)
    head = f"model.{len(model.model) - 1}."
    own = model.state_dict()
    unexplained = [
        k for k in own if k not in matched and "anchors" not in k and not (classes_differ and k.startswith(head))
    ]
    if unexplained:
        architecture = f"--cfg {opt.cfg}" if opt.cfg else "the model"
        LOGGER.warning(
            f"WARNING: only {len(matched)}/{len(own)} tensors ({len(matched) / len(own):.0%}) came from {opt.weights}; "
            f"{len(unexplained)} of {architecture} differ in name or shape and start from scratch (first: "
            f"{', '.join(unexplained[:3])}). Is it the architecture and scale {opt.weights} was trained as?"
        )


def freeze_layers(model: DetectionModel, layers: list[int]) -> None:
    """Stop gradients for the parameters of the given layer indices."""
    prefixes = tuple(f"model.{i}." for i in layers)
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    if prefixes:
        LOGGER.info(f"Froze layers {', '.join(str(i) for i in layers)}")
