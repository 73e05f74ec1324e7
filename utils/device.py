"""Device selection, autocast contexts and model inputs (which autocast a run uses: utils/precision.py)."""

from __future__ import annotations

import contextlib
import os

import torch

from utils import resources
from utils.errors import UserError


def select_device(spec: str | None) -> torch.device:
    """'' or None: CUDA (the local rank's GPU under torchrun) if available, else CPU; 'cpu'; '0' /
    'cuda:0'. Several ids ('0,1') need torchrun, whose local rank picks one of them."""
    spec = (spec or "").strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "":  # under torchrun each process takes the GPU of its local rank
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} present): "
                f"launch at most {torch.cuda.device_count()} processes per machine, or use --device cpu"
            )
        return torch.device("cuda", local_rank)
    ids = spec.split(",")
    if not all(i.isdigit() for i in ids):
        raise UserError(f"--device {spec!r} is not 'cpu', a CUDA id like '0', or a list like '0,1'")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec} asks for CUDA, but no CUDA device is available here (use --device cpu)")
    if len(ids) > 1 and int(os.environ.get("LOCAL_RANK", -1)) < 0:
        raise UserError(f"--device {spec} names several GPUs: launch with torchrun --nproc_per_node {len(ids)}")
    local_rank, processes = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if processes > 1 and len(ids) != processes:
        raise UserError(
            f"--device {spec}: torchrun started {processes} processes on this machine; give one GPU id "
            f"each (e.g. --device {','.join(map(str, range(processes)))}) or leave --device out"
        )
    index = int(ids[local_rank] if len(ids) > 1 else ids[0])
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {index}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of `model`'s weights: float32, or float64 from a train.py --float64 run; for an
    exported model (no parameters of its own), the input dtype it was exported for."""
    return getattr(model, "input_dtype", None) or next(model.parameters()).dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_model_input(
    images_uint8: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, 3, H, W) uint8 batch -> `dtype` in [0, 1] on `device`, channels_last (faster convolutions
    on CPU and on CUDA tensor cores; the model is converted to match)."""
    return images_uint8.to(device, non_blocking=True, memory_format=torch.channels_last).to(dtype) / 255


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take on `device`: the GPU's free memory, or what the machine
    has available within the container's limit (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return resources.available_memory_bytes()
