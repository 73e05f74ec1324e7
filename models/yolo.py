"""DetectionModel: the layers built from a model YAML, with strides, anchors, fusing and a summary."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.blocks import Conv
from models.head import Detect
from models.parse import build_layers, read_model_yaml, validate_model_config
from utils.config_files import resolve_config_path
from utils.log import LOGGER


class DetectionModel(nn.Module):
    """A YOLOv5 detector. State-dict names follow YOLOv5's (`model.0.conv.weight`, ...)."""

    def __init__(self, cfg: dict, in_channels: int = 3, nc: int | None = None):
        super().__init__()
        validate_model_config(cfg, source="(dict)")
        self.yaml = copy.deepcopy(cfg)
        if nc is not None and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.in_channels = in_channels
        self.model, self.save = build_layers(self.yaml, in_channels)
        self.nc = self.yaml["nc"]
        self.names = [str(i) for i in range(self.nc)]
        self.hyp: dict = {}

        head = self.detect_head
        head.stride = self._measure_strides(in_channels)
        self.stride = head.stride
        head.anchors /= head.stride.view(-1, 1, 1)  # pixels -> grid cells of each level
        self._check_anchor_order()
        head.initialize_biases()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03  # YOLOv5's BatchNorm settings
            elif isinstance(m, nn.SiLU):
                m.inplace = True

    @property
    def detect_head(self) -> Detect:
        return self.model[-1]

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def _measure_strides(self, in_channels: int, size: int = 256) -> torch.Tensor:
        """Strides from one eval-mode pass (eval, so the BatchNorm statistics stay untouched)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            _, raw = self.forward(torch.zeros(1, in_channels, size, size))
        self.train(was_training)
        return torch.tensor([size / r.shape[2] for r in raw])

    def _check_anchor_order(self) -> None:
        head = self.detect_head
        area = head.anchors.prod(-1).mean(-1) * head.stride**2  # mean anchor area per level, pixels
        if (area[-1] - area[0]).sign() != (head.stride[-1] - head.stride[0]).sign():
            LOGGER.info("Reversing anchor order so that larger anchors go with larger strides")
            head.anchors[:] = head.anchors.flip(0)

    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm into its convolution, for inference."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self

    def summary(self, img_size: int = 640) -> str:
        """'N layers, N parameters, N gradients, N GFLOPs' as YOLOv5 prints it."""
        num_params = sum(p.numel() for p in self.parameters())
        num_grads = sum(p.numel() for p in self.parameters() if p.requires_grad)
        num_layers = len(list(self.modules()))
        gflops = self.gflops(img_size)
        return (
            f"{num_layers} layers, {num_params:,} parameters, {num_grads:,} gradients, "
            f"{gflops:.1f} GFLOPs at {img_size}px"
        )

    def gflops(self, img_size: int = 640) -> float:
        """Forward GFLOPs at img_size x img_size, counted on a small input and scaled by area."""
        probe = int(self.stride.max()) * 2
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.forward(torch.zeros(1, self.in_channels, probe, probe, device=param.device, dtype=param.dtype))
        self.train(was_training)
        return counter.get_total_flops() / 1e9 * (img_size / probe) ** 2


def build_model(cfg_path: str | Path, nc: int | None = None) -> DetectionModel:
    """Read a model YAML (a path, or a shipped name such as 'yolov5s.yaml') and build the detector."""
    return DetectionModel(read_model_yaml(resolve_config_path(cfg_path, "models")), nc=nc)
