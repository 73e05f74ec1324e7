"""The network's input size: a multiple of the model's stride, and one the machine has memory for.

train.py, val.py, detect.py and average.py all decide it here, before any work starts, so an
impossible --imgsz is one clear error instead of an allocation failure mid-batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.device import available_memory_bytes
from utils.errors import UserError
from utils.log import LOGGER


def round_image_size(img_size: int, stride: int) -> int:
    """img_size rounded up to a multiple of the model's max stride, saying so when it changes."""
    rounded = max(math.ceil(img_size / stride) * stride, stride)
    if rounded != img_size:
        LOGGER.warning(f"WARNING: --imgsz {img_size} is not a multiple of the max stride {stride}; using {rounded}")
    return rounded


def check_image_size(
    img_size: int,
    model: nn.Module,
    *,
    batch_size: int | None = None,
    device: torch.device | None = None,
    processes: int = 1,
) -> int:
    """--imgsz as the model runs it (rounded up to its stride), after refusing one below the
    stride and, given a `batch_size`, an inference batch that cannot fit in the memory of `device`
    (shared by `processes` alike) by a lower bound: the input and the largest layer output. (A
    training batch is checked by utils/train/autobatch.py.)"""
    stride = int(model.stride.max())
    if img_size < stride:
        raise UserError(f"--imgsz {img_size} is smaller than the model's stride {stride}: use at least {stride}")
    given, img_size = img_size, round_image_size(img_size, stride)
    if batch_size is not None:
        check_batch_fits(model, (img_size, img_size), batch_size, device, processes, option=f"--imgsz {given}")
    return img_size


def check_batch_fits(
    model: nn.Module,
    size_hw: tuple[int, int],
    batch_size: int,
    device: torch.device | None,
    processes: int = 1,
    option: str = "--imgsz",
) -> None:
    """Refuse an inference batch of (height, width) images that cannot fit in the memory of `device`
    (shared by `processes` alike), by a lower bound: the input and the largest layer output, fp32.
    `option` names the value in the message."""
    largest_output = largest_output_per_pixel(model, probe_size=2 * int(model.stride.max()))
    needed = (3 + largest_output) * size_hw[0] * size_hw[1] * batch_size * 4  # the float input: 3 per pixel
    available = available_memory_bytes(device)
    available = available // processes if available is not None else None
    if available is not None and needed > available:
        raise UserError(
            f"{option} needs at least {needed / 2**30:,.0f} GiB for one batch of {batch_size} (input and "
            f"largest layer output, fp32), but {available / 2**30:,.1f} GiB are available on {device}"
            + (f" to each of its {processes} processes" if processes > 1 else "")
            + ": use a smaller --imgsz"
            + (" or --batch-size" if batch_size > 1 else "")
        )


@torch.no_grad()
def largest_output_per_pixel(model: nn.Module, probe_size: int) -> float:
    """Elements of the largest leaf-module output per input pixel (measured in one eval-mode pass
    at probe_size; it scales with the image area)."""
    sizes: list[int] = []

    def record(_module: nn.Module, _inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    was_training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, 3, probe_size, probe_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return max(sizes) / probe_size**2


def exact_image_size(sizes: list[int], stride: int, option: str = "--imgsz") -> tuple[int, int]:
    """One size or (height, width), each a positive multiple of the model's max stride, as (h, w);
    anything else is a UserError naming the sizes that would do (a fixed input shape is not rounded)."""
    if len(sizes) not in (1, 2):
        raise UserError(f"{option} takes one size or two (height width), got {len(sizes)}")
    height, width = sizes * 2 if len(sizes) == 1 else sizes
    if any(s < stride or s % stride for s in (height, width)):
        nearest = " ".join(str(max(round(s / stride), 1) * stride) for s in sizes)
        raise UserError(
            f"{option} {' '.join(map(str, sizes))}: each side must be a multiple of the model's stride {stride}, "
            f"e.g. {option} {nearest}"
        )
    return height, width
