"""The precision a run trains in: train.py's --amp resolved on the run's device (utils/precision.py),
once, by rank 0 for all of torchrun's processes, before anything is measured or loaded."""

from __future__ import annotations

import torch

from models.yolo import DetectionModel
from utils.dist import World
from utils.log import LOGGER
from utils.precision import Precision, Timing, choose_precision, unusable
from utils.train.probe import TrainingProbe

NOMINAL_BATCH = 16  # --batch-size -1: the batch timed, before AutoBatch (which needs the precision) picks one


def recorded_precision(checkpoint: dict | None) -> Precision | None:
    """The precision a resumed run's checkpoint recorded (None: a new run, or one from before --amp)."""
    record = (checkpoint or {}).get("precision")
    return Precision.from_dict(record) if record else None


def training_precision(
    requested: str,
    model: DetectionModel,
    hyp: dict,
    *,
    img_size: int,
    batch: int | None,
    optimizer: str,
    device: torch.device,
    weights_dtype: torch.dtype,
    world: World,
    recorded: Precision | None = None,
) -> Precision:
    """--amp `requested` on `device` for a step of `batch` images per process (None: AutoBatch's
    to come, timed at NOMINAL_BATCH). A resumed run keeps the precision it `recorded`, unless that
    cannot run on this device (fp16 on a CPU, bf16 on a GPU without it): then it is chosen again."""
    if recorded is not None and requested == recorded.amp:
        if unusable(recorded.amp, device) is None:
            return recorded
        LOGGER.info(f"The run trained with --amp {recorded.amp}, which {device} cannot run: --amp auto chooses again")
        requested = "auto"
    batch = batch or NOMINAL_BATCH
    optimizer = "AdamW" if optimizer == "auto" else optimizer  # (AdamW's state is the larger)

    def make_step():
        probe = TrainingProbe(
            model, hyp, img_size=img_size, device=device, weights_dtype=weights_dtype, optimizer=optimizer
        )
        return lambda dtype: probe.step(batch, dtype)

    timing = Timing(
        f"a training step of {batch} images at {img_size} px", "training", model.yaml, batch, img_size, make_step
    )
    return world.decided_by_main(lambda: choose_precision(requested, device, timing, weights_dtype))
