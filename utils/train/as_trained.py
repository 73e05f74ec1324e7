"""Validation as train.py ran it for a checkpoint: its val split, image size, validation batch,
--single-cls and precision. val.py's defaults are the same, so the numbers agree with it."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from utils.checkpoint.format import batch_per_process, image_size, trained_amp, training_option
from utils.data.config import DatasetConfig
from utils.data.loader import build_val_loader, validation_batch_size
from utils.errors import UserError
from utils.eval.evaluate import EvalResult, evaluate
from utils.precision import inference_precision


def single_class_as_trained(checkpoint: dict, data: DatasetConfig, nc: int) -> bool:
    """The run's --single-cls, after checking that `data` has the `nc` classes the weights detect."""
    single_cls = bool(training_option(checkpoint, "single_cls", False))
    if data.num_classes(single_cls) != nc:
        raise UserError(
            f"the weights detect {nc} classes but {data.source} has {data.num_classes(single_cls)}"
            + (" (the run trained with --single-cls)" if single_cls else "")
        )
    return single_cls


def val_loader_as_trained(checkpoint: dict, model: torch.nn.Module, data: DatasetConfig, workers: int) -> DataLoader:
    """The val loader train.py validated `checkpoint`'s run with (twice its batch per process)."""
    single_cls = single_class_as_trained(checkpoint, data, model.nc)
    return build_val_loader(
        data.val,
        data.nc,
        img_size=image_size(checkpoint),
        batch_size=validation_batch_size(batch_per_process(checkpoint)),
        workers=workers,
        hyp=checkpoint["hyp"],
        stride=int(model.stride.max()),
        single_cls=single_cls,
    )


def evaluate_as_trained(
    model: torch.nn.Module, checkpoint: dict, loader: DataLoader, device: torch.device
) -> EvalResult:
    """evaluate() in the precision the run trained in (val.py's default)."""
    precision = inference_precision(
        trained_amp(checkpoint), model, device, batch=loader.batch_size, img_size=image_size(checkpoint)
    )
    return evaluate(model.eval(), loader, device=device, amp_dtype=precision.dtype)
