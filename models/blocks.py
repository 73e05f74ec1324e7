"""Convolutional building blocks of YOLOv5, YOLOv8 and YOLO11, with the attribute names of their state dicts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the spatial size for stride 1 (odd kernels)."""
    return dilation * (kernel_size - 1) // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. After `fuse()` the BN is folded into the conv."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool = True,
    ):
        super().__init__()
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, groups=groups, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (inference only)."""
        if isinstance(self.bn, nn.Identity):
            return
        self.conv = nn.utils.fusion.fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
        self.bn = nn.Identity()


class DWConv(Conv):
    """Depth-wise convolution: a Conv with as many groups as the channel counts allow."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1, act: bool = True
    ):
        super().__init__(c_in, c_out, kernel_size, stride, groups=math.gcd(c_in, c_out), dilation=dilation, act=act)


class Bottleneck(nn.Module):
    """Two convolutions (1x1 then 3x3 by default), with a residual connection when shapes allow."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        kernels: tuple[int, int] = (1, 3),
    ):
        super().__init__()
        c_hidden = int(c_out * expansion)
        self.cv1 = Conv(c_in, c_hidden, kernels[0], 1)
        self.cv2 = Conv(c_hidden, c_out, kernels[1], 1, groups=groups)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions: two 1x1 branches, n bottlenecks on one, then a 1x1 merge."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int = 1,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        kernels: tuple[int, int] = (1, 3),
    ):
        super().__init__()
        c_hidden = int(c_out * expansion)
        self.cv1 = Conv(c_in, c_hidden, 1, 1)
        self.cv2 = Conv(c_in, c_hidden, 1, 1)
        self.cv3 = Conv(2 * c_hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(c_hidden, c_hidden, shortcut, groups, 1.0, kernels) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class C3k(C3):
    """C3 whose bottlenecks are two k x k convolutions (YOLO11's inner block)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int = 1,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        kernel_size: int = 3,
    ):
        super().__init__(c_in, c_out, n, shortcut, groups, expansion, kernels=(kernel_size, kernel_size))


class C2f(nn.Module):
    """YOLOv8's CSP block: split a 1x1 projection in two, chain n blocks on one half and
    concatenate every intermediate output before the 1x1 merge. The blocks are 3x3 bottlenecks
    of full width unless `block` (a factory of width -> module) says otherwise."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int = 1,
        shortcut: bool = False,
        groups: int = 1,
        expansion: float = 0.5,
        block: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        self.c = int(c_out * expansion)
        if block is None:

            def block(c: int) -> nn.Module:
                return Bottleneck(c, c, shortcut, groups, expansion=1.0, kernels=(3, 3))

        self.cv1 = Conv(c_in, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(block(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H, W)."""
        outputs = list(self.cv1(x).chunk(2, dim=1))
        for block in self.m:
            outputs.append(block(outputs[-1]))
        return self.cv2(torch.cat(outputs, dim=1))


class C3k2(C2f):
    """YOLO11's C2f: its blocks are C3k (for the m/l/x scales) or 3x3 bottlenecks of half width."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int = 1,
        c3k: bool = False,
        expansion: float = 0.5,
        groups: int = 1,
        shortcut: bool = True,
    ):
        def block(c: int) -> nn.Module:
            if c3k:
                return C3k(c, c, 2, shortcut, groups)
            return Bottleneck(c, c, shortcut, groups, kernels=(3, 3))

        super().__init__(c_in, c_out, n, shortcut, groups, expansion, block=block)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained max-pools concatenated with the input."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 5):
        super().__init__()
        c_hidden = c_in // 2
        self.cv1 = Conv(c_in, c_hidden, 1, 1)
        self.cv2 = Conv(c_hidden * 4, c_out, 1, 1)
        self.m = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class Concat(nn.Module):
    """Concatenate a list of tensors along one dimension (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)
