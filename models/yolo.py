"""DetectionModel: the layers built from a model YAML, with strides, anchors, fusing and a summary."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.anchor_free_head import AnchorFreeDetect
from models.blocks import Conv
from models.head import Detect
from models.parse import build_layers, read_model_yaml, validate_model_config
from utils.errors import UserError
from utils.log import LOGGER


class DetectionModel(nn.Module):
    """A detector built from a model YAML: YOLOv5's anchor-based head, or the anchor-free head of
    YOLOv5u/YOLOv8/YOLO11. State-dict names follow YOLOv5's and Ultralytics' (`model.0.conv.weight`, ...)."""

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

        self.detect_head.attach_strides(self._measure_strides(in_channels))
        self.stride = self.detect_head.stride
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03  # YOLOv5's BatchNorm settings
            elif isinstance(m, nn.SiLU):
                m.inplace = True

    @property
    def detect_head(self) -> Detect | AnchorFreeDetect:
        return self.model[-1]

    @property
    def anchor_free(self) -> bool:
        return isinstance(self.detect_head, AnchorFreeDetect)

    @property
    def needs_anchor_fit(self) -> bool:
        """Whether the anchors are placeholders still to be fitted to the data (the YAML's `anchors: N`)."""
        return not self.anchor_free and isinstance(self.yaml["anchors"], int)

    def set_anchors(self, anchors_px: list[list[float]]) -> None:
        """Replace the anchor-based head's anchors by per-level [w1, h1, w2, h2, ...] in input pixels,
        in the head and in the YAML, so that a model rebuilt from its YAML has them too."""
        head = self.detect_head
        sizes = torch.tensor(anchors_px, dtype=torch.float32).view(head.nl, head.na, 2)
        with torch.no_grad():  # grid cells of each level, as the head keeps them (Detect.attach_strides)
            head.anchors.copy_(sizes / head.stride.view(-1, 1, 1))
        self.yaml["anchors"] = [[float(v) for v in level] for level in anchors_px]

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def _measure_strides(self, in_channels: int, size: int = 256) -> torch.Tensor:
        """Strides from one eval-mode pass over the head's inputs (eval, so BatchNorm statistics stay untouched)."""
        sizes = []
        hook = self.detect_head.register_forward_pre_hook(lambda _, args: sizes.extend(x.shape[-2] for x in args[0]))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.forward(torch.zeros(1, in_channels, size, size))
        except RuntimeError as error:  # layers whose outputs do not fit the next ones
            raise UserError(f"model config: its layers do not fit together: {str(error).splitlines()[0]}") from None
        finally:
            self.train(was_training)
            hook.remove()
        return torch.tensor([size / h for h in sizes], dtype=torch.float32)

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
    """Read a model YAML (a path, or a shipped name such as 'yolov5s.yaml' or 'yolo11n.yaml') and build the detector."""
    return DetectionModel(read_model_yaml(cfg_path), nc=nc)
