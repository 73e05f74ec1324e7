"""Weight averaging beyond the EMA: weighted averages of state dicts (average.py) and BatchNorm
statistics recomputed for averaged weights (through torch.optim.swa_utils.update_bn)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from utils.checkpoint.format import batch_per_process, image_size, trained_amp, training_option
from utils.data.config import DatasetConfig
from utils.data.dataset import DetectionDataset
from utils.data.loader import build_dataloader, build_train_dataset, mosaic_pool_of
from utils.device import autocast, parameter_dtype, to_model_input
from utils.errors import UserError
from utils.precision import Precision, inference_precision
from utils.train.as_trained import single_class_as_trained

# Images BatchNorm statistics are recomputed on (train.py and average.py --bn-images; 0: the whole
# train split). A few thousand pin every channel's mean and variance: on the shapes dataset (SWA of
# a 10-epoch run) 256 of its 512 images gave mAP@0.5:0.95 0.0728-0.0743 over three draws against
# 0.0726 with all (benchmarks/bench_bn_recalibration.py), and a pass over COCO's 118k images would
# hold up the end of a run for minutes on one GPU.
RECALIBRATION_IMAGES = 4096


def resolve_coefficients(coefficients: list[float] | None, count: int) -> list[float]:
    """The coefficients to use: uniform when None; else one per state, none negative, summing to 1."""
    if coefficients is None:
        return [1.0 / count] * count
    if len(coefficients) != count:
        raise UserError(f"--coef gives {len(coefficients)} coefficients for {count} checkpoints: give one each")
    if not all(math.isfinite(c) and c >= 0 for c in coefficients):
        raise UserError(
            f"--coef {' '.join(f'{c:g}' for c in coefficients)}: coefficients of an average are finite and not negative"
        )
    if abs(sum(coefficients) - 1.0) > 1e-6:
        raise UserError(
            f"--coef must sum to 1 (an average), but {' + '.join(f'{c:g}' for c in coefficients)} "
            f"= {sum(coefficients):.6g}"
        )
    return list(coefficients)


def first_mismatch(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str | None:
    """How `other` differs from `reference` at its first differing entry, or None if they match
    in names, shapes and dtypes."""
    for name, tensor in reference.items():
        if name not in other:
            return f"it has no tensor '{name}'"
        if other[name].shape != tensor.shape:
            return f"its tensor '{name}' has shape {tuple(other[name].shape)}, not {tuple(tensor.shape)}"
        if other[name].dtype != tensor.dtype:
            return f"its tensor '{name}' is {other[name].dtype}, not {tensor.dtype}"
    extra = [name for name in other if name not in reference]
    return f"it has a tensor '{extra[0]}' that the first has not" if extra else None


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding NaN or inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()), None)


def average_state_dicts(
    states: list[dict[str, torch.Tensor]],
    coefficients: list[float],
    strict: bool = True,
    labels: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """sum_i c_i * states[i] for every floating-point tensor, computed in float64; integer
    tensors (num_batches_tracked) are taken from the first state. With strict, states that
    differ from the first are refused naming the first differing tensor; without, a tensor
    that does not match in every state is kept from the first state and listed in the result."""
    labels = labels or [f"state {i}" for i in range(len(states))]
    reference = states[0]
    if strict:
        for label, state in zip(labels[1:], states[1:]):
            problem = first_mismatch(reference, state)
            if problem:
                raise UserError(
                    f"{label} does not fit {labels[0]}: {problem} (--no-strict averages the "
                    "tensors that match and keeps the others from the first file)"
                )
    averaged, kept = {}, []
    for name, tensor in reference.items():
        matching = all(name in s and s[name].shape == tensor.shape and s[name].dtype == tensor.dtype for s in states)
        if not matching:
            kept.append(name)
            averaged[name] = tensor.clone()
        elif tensor.dtype.is_floating_point:
            total = sum(c * s[name].double() for c, s in zip(coefficients, states))
            averaged[name] = total.to(tensor.dtype)
        else:
            averaged[name] = tensor.clone()
    return averaged, kept


def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None
) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over `batches`
    (uint8 image batches as the loaders yield them) with torch's update_bn; returns the number of
    images seen. Averaged weights need this: the averages of running statistics are not the
    statistics of the averaged network's activations."""
    seen, dtype = 0, parameter_dtype(model)

    def inputs():
        nonlocal seen
        for batch in batches:
            seen += batch.images.shape[0]
            yield to_model_input(batch.images, device, dtype)

    with autocast(device, amp_dtype):
        update_bn(inputs(), model, device=None)
    return seen


def recalibrate_on_training_batches(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    epoch: int,
    batch_size: int,
    workers: int,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    max_images: int = RECALIBRATION_IMAGES,
) -> int:
    """recalibrate_batchnorm over one pass of the augmenting training `dataset` as it made `epoch`
    (the last epoch the weights were trained in: mosaic closed if it was), in batches of the size
    BatchNorm saw in training, or over its first batches holding at least `max_images` images
    (0: all), the same ones for the same seed; returns the number of images seen. `model` must
    hold plain BatchNorm layers: update_bn runs it in train mode, where SyncBatchNorm would wait
    for the other ranks.

    Why augmented: the weights were trained under the statistics of augmented batches, and
    statistics of plain letterboxed images shift every layer's normalisation away from what the
    next layer learned (shapes dataset, benchmarks/averaging_study.py's setting: mAP@0.5:0.95
    0.231 with plain images against 0.248 with these)."""
    loader = build_dataloader(
        dataset, batch_size, workers, shuffle=True, seed=seed, mosaic_pool=mosaic_pool_of(dataset.hyp)
    )
    loader.sampler.set_epoch(max(epoch, 0))
    batches = itertools.islice(loader, math.ceil(max_images / batch_size)) if max_images else loader
    return recalibrate_batchnorm(model, batches, device, amp_dtype)


class TrainingBatches:
    """The augmenting training split of `data` as the checkpoint's run augmented `epoch` (its image
    size, seed, --single-cls, batch per process, precision), built once to recalibrate the BatchNorm
    statistics of any number of averages of that run's weights on `max_images` of its images (0: all)."""

    def __init__(
        self,
        checkpoint: dict,
        data: DatasetConfig,
        nc: int,
        epoch: int,
        *,
        img_size: int | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        max_images: int = RECALIBRATION_IMAGES,
    ):
        single_cls = single_class_as_trained(checkpoint, data, nc)
        # BatchNorm saw each process's share of the batch in training (train.py splits it over torchrun ranks)
        self.batch_size = batch_size or batch_per_process(checkpoint)
        self.workers, self.seed = workers, int(training_option(checkpoint, "seed", 0))
        self.max_images = max_images
        self.trained_amp, self.epoch = trained_amp(checkpoint), epoch
        epochs = int(training_option(checkpoint, "epochs", epoch + 1))
        self.img_size = img_size or image_size(checkpoint)
        self.dataset = build_train_dataset(
            data,
            checkpoint["hyp"],
            img_size=self.img_size,
            seed=self.seed,
            single_cls=single_cls,
            cache="off",
            epochs=epochs,
        )

    def precision(self, model: nn.Module, device: torch.device) -> Precision:
        """The autocast the run trained `model`'s weights in (inference_precision's choice where it recorded none)."""
        return inference_precision(self.trained_amp, model, device, batch=self.batch_size, img_size=self.img_size)

    def recalibrate(self, model: nn.Module, device: torch.device) -> int:
        """recalibrate_on_training_batches over the split as it made the epoch; returns the images seen."""
        return recalibrate_on_training_batches(
            model,
            self.dataset,
            epoch=self.epoch,
            batch_size=self.batch_size,
            workers=self.workers,
            seed=self.seed,
            device=device,
            amp_dtype=self.precision(model, device).dtype,
            max_images=self.max_images,
        )
