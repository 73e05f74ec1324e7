"""YOLO11's position-sensitive attention: multi-head self-attention over all cells of a feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import Conv


class Attention(nn.Module):
    """Multi-head self-attention with 1x1 projections and a depth-wise 3x3 positional term on the values.

    Keys and queries have `attn_ratio` of the per-head width; values have the full per-head width.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, groups=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): every cell attends to every cell."""
        b, c, h, w = x.shape
        # Channels are grouped by head; within a head: queries, keys, values.
        q, k, v = (
            self.qkv(x)
            .view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
            .split((self.key_dim, self.key_dim, self.head_dim), dim=2)
        )
        attended = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1))
        y = attended.transpose(-2, -1).reshape(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class PSABlock(nn.Module):
    """Attention then a two-layer 1x1 feed-forward, each with a residual connection."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True):
        super().__init__()
        self.attn = Attention(c, num_heads=num_heads, attn_ratio=attn_ratio)
        self.ffn = nn.Sequential(Conv(c, 2 * c, 1), Conv(2 * c, c, 1, act=False))
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention, then the feed-forward; each added to its input when `add`."""
        if not self.add:
            return self.ffn(self.attn(x))
        attended = x + self.attn(x)
        return attended + self.ffn(attended)


class C2PSA(nn.Module):
    """Split a 1x1 projection in two, run n attention blocks (one head per 64 channels) on one half, merge."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, expansion: float = 0.5):
        super().__init__()
        if c_in != c_out:
            raise ValueError(f"C2PSA keeps the channel count, got {c_in} in and {c_out} out")
        self.c = int(c_in * expansion)
        if self.c < 64:
            raise ValueError(f"C2PSA needs at least 64 hidden channels (one attention head per 64), got {self.c}")
        self.cv1 = Conv(c_in, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c_in, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=self.c // 64) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W); attention on half of the projected channels."""
        kept, attended = self.cv1(x).chunk(2, dim=1)
        return self.cv2(torch.cat((kept, self.m(attended)), dim=1))
