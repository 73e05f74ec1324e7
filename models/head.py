"""YOLOv5's Detect: per-level 1x1 convolutions from feature maps to anchor-based predictions."""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.log import LOGGER


def make_grid(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, H, W, 2) xy cell offsets of an H x W feature map, shifted by -0.5 as the xy decoding expects."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack((xs, ys), dim=-1).view(1, 1, h, w, 2) - 0.5


class Detect(nn.Module):
    """YOLOv5 detection head.

    Training mode returns the raw per-level outputs, each (B, num_anchors, H, W, 5 + nc) holding
    logits for xy, wh, objectness and classes. Eval mode returns `(decoded, raw)` where
    decoded is (B, N, 5 + nc): box centre/size in input pixels, then objectness and class
    probabilities (YOLOv5's convention, so `model(images)[0]` goes straight to NMS).
    """

    def __init__(self, nc: int = 80, anchors: list[list[float]] = (), ch: list[int] = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor
        self.nl = len(anchors)  # detection levels
        self.na = len(anchors[0]) // 2  # anchors per level
        # Anchors are given in input pixels; DetectionModel divides them by the level stride
        # once strides are known, after which they are in grid cells (what the loss uses).
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.stride = torch.zeros(self.nl)  # set by attach_strides
        self._grids: dict[tuple, torch.Tensor] = {}

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps (small strides first) -> raw outputs (training) or (decoded, raw) (eval)."""
        raw = []
        for i, x in enumerate(xs):
            b, _, h, w = x.shape
            # (B, na*no, H, W) -> (B, na, H, W, no)
            raw.append(self.m[i](x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return self.decode(raw), raw

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw level outputs -> (B, N, 5 + nc) with xywh in input pixels, computed in float32."""
        # The strides as Python floats: constants of the model, also in a traced or exported graph.
        out, strides = [], self.stride.tolist()
        for i, p in enumerate(raw):
            b, _, h, w, _ = p.shape
            grid = self._grid(i, h, w, p.device)
            # Anchors may be replaced by load_state_dict, so their pixel sizes are not cached.
            anchor_grid = (self.anchors[i].float() * strides[i]).view(1, self.na, 1, 1, 2)
            y = p.float().sigmoid()
            xy = (y[..., 0:2] * 2 + grid) * strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor_grid
            out.append(torch.cat((xy, wh, y[..., 4:]), dim=-1).view(b, -1, self.no))
        return torch.cat(out, dim=1)

    def _grid(self, level: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, 1, H, W, 2) cell offsets, shifted by -0.5 as the xy decoding expects, cached per size. A
        graph being traced or exported computes them from the input's shape instead: a cached grid
        would enter it as a constant of one size, and torch.export's symbolic sizes are no dict keys."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return make_grid(h, w, device)
        key = (level, h, w, device)
        if key not in self._grids:
            self._grids[key] = make_grid(h, w, device)
        return self._grids[key]

    def _apply(self, fn, *args, **kwargs):
        self._grids = {}  # a device change invalidates the cached grids
        return super()._apply(fn, *args, **kwargs)

    def attach_strides(self, stride: torch.Tensor) -> None:
        """Record the level strides, put larger anchors with larger strides (reversing a list given
        the other way round, in pixels), turn the anchors from pixels into grid cells of their level
        (what the loss uses), and set the bias priors."""
        self.stride = stride
        with torch.no_grad():
            area = self.anchors.prod(-1).mean(-1)  # mean anchor area per level, pixels
            area_change, stride_change = float(area[-1] - area[0]), float(stride[-1] - stride[0])
            if area_change * stride_change < 0:  # strictly the other way round: equal areas are left alone
                LOGGER.info("Reversing anchor order so that larger anchors go with larger strides")
                self.anchors[:] = self.anchors.flip(0)
            self.anchors /= stride.view(-1, 1, 1)
            self.initialize_biases()

    def initialize_biases(self) -> None:
        """YOLOv5's priors: objectness for ~8 objects per 640x640 image, class probability 0.6 / nc."""
        for conv, stride in zip(self.m, self.stride.tolist()):
            bias = conv.bias.detach().view(self.na, -1)
            bias[:, 4] += math.log(8 / (640 / stride) ** 2)
            bias[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99999))
