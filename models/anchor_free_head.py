"""Anchor-free Detect of YOLOv8 and YOLO11: per level a box branch predicting a distribution over
distances from the cell centre to each box side, and a class branch; no objectness."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import box_convert

from models.blocks import Conv, DWConv


def expected_distances(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(..., reg_max) logits over distance bins -> (...) expected distance: softmax, then the mean bin."""
    return logits.softmax(-1) @ bins.to(logits.dtype)


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin of each box side's distribution.

    The bin values 0..reg_max-1 are held as a fixed 1x1 convolution weight (kept in the state
    dict, never trained), so Ultralytics' weights load one to one.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4 * reg_max, A) logits -> (B, 4, A) expected distances in grid cells."""
        b, _, a = x.shape
        per_side = x.view(b, 4, self.reg_max, a).transpose(2, 3)  # (B, 4, A, reg_max)
        return expected_distances(per_side, self.conv.weight.view(self.reg_max))


def make_anchor_points(
    sizes: list[tuple[int, int]], strides: torch.Tensor, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, level by level and row-major: (A, 2) xy in grid cells, and (A, 1) strides."""
    points, point_strides = [], []
    for (h, w), stride in zip(sizes, strides.tolist()):
        ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), dim=-1).view(-1, 2))
        point_strides.append(torch.full((h * w, 1), stride, device=device, dtype=torch.float32))
    return torch.cat(points), torch.cat(point_strides)


def distances_to_boxes(distances: torch.Tensor, points: torch.Tensor, xywh: bool) -> torch.Tensor:
    """(..., 4) distances from (..., 2) points to the left, top, right and bottom box sides ->
    corner boxes (x1, y1, x2, y2), or centre/size boxes with xywh."""
    corners = torch.cat((points - distances[..., :2], points + distances[..., 2:]), dim=-1)
    return box_convert(corners, "xyxy", "cxcywh") if xywh else corners


class AnchorFreeDetect(nn.Module):
    """Detection head of YOLOv8/YOLO11 (and Ultralytics' YOLOv5u).

    Training mode returns the raw per-level outputs, each (B, 4 * reg_max + nc, H, W): box-side
    distance logits then class logits. Eval mode returns `(decoded, raw)` where decoded is
    (B, A, 4 + nc): box centre/size in input pixels, then class probabilities.
    `legacy=True` builds the YOLOv8 class branch (two 3x3 convolutions); `False` builds YOLO11's
    (depth-wise 3x3 then 1x1, twice).
    """

    def __init__(self, nc: int = 80, ch: list[int] = (), reg_max: int = 16, legacy: bool = True):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        self.legacy = legacy
        c_box = max(16, ch[0] // 4, 4 * reg_max)
        c_cls = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c_box, 3), Conv(c_box, c_box, 3), nn.Conv2d(c_box, 4 * reg_max, 1)) for c in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(c, c_cls, 3), Conv(c_cls, c_cls, 3), nn.Conv2d(c_cls, nc, 1))
            if legacy
            else nn.Sequential(
                nn.Sequential(DWConv(c, c, 3), Conv(c, c_cls, 1)),
                nn.Sequential(DWConv(c_cls, c_cls, 3), Conv(c_cls, c_cls, 1)),
                nn.Conv2d(c_cls, nc, 1),
            )
            for c in ch
        )
        self.dfl = DFL(reg_max)
        self.stride = torch.zeros(self.nl)  # set by attach_strides
        self._anchors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps (small strides first) -> raw outputs (training) or (decoded, raw) (eval)."""
        raw = [torch.cat((box(x), cls(x)), dim=1) for x, box, cls in zip(xs, self.cv2, self.cv3)]
        if self.training:
            return raw
        return self.decode(raw), raw

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw level outputs -> (B, A, 4 + nc) with xywh in input pixels, computed in float32
        (float64 for a float64 model), outside any autocast."""
        b, dtype = raw[0].shape[0], torch.promote_types(raw[0].dtype, torch.float32)
        with torch.autocast(raw[0].device.type, enabled=False):
            flat = torch.cat([r.to(dtype).view(b, self.no, -1) for r in raw], dim=2)
            box_logits, cls_logits = flat.split((4 * self.reg_max, self.nc), dim=1)
            points, strides = self.anchor_points([r.shape[2:] for r in raw], flat.device)
            distances = self.dfl(box_logits).transpose(1, 2)
            boxes = distances_to_boxes(distances, points.to(dtype), xywh=True) * strides.to(dtype)
            return torch.cat((boxes, cls_logits.transpose(1, 2).sigmoid()), dim=2)

    def anchor_points(self, sizes: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, 2) cell centres in grid cells and (A, 1) their strides, cached per feature-map sizes
        (computed afresh from the sizes in a graph being traced or exported: see Detect._grid)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return make_anchor_points([tuple(s) for s in sizes], self.stride, device)
        key = (tuple(tuple(s) for s in sizes), device)
        if key not in self._anchors:
            self._anchors[key] = make_anchor_points([tuple(s) for s in sizes], self.stride, device)
        return self._anchors[key]

    def _apply(self, fn, *args, **kwargs):
        self._anchors = {}  # a device change invalidates the cached anchor points
        return super()._apply(fn, *args, **kwargs)

    def attach_strides(self, stride: torch.Tensor) -> None:
        """Record the level strides and set the bias priors: box distances 1, classes ~5 objects per 640 px image."""
        self.stride = stride
        self._anchors = {}
        with torch.no_grad():
            for box, cls, s in zip(self.cv2, self.cv3, stride.tolist()):
                box[-1].bias.fill_(1.0)
                cls[-1].bias[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)
