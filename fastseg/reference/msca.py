"""SegNeXt's multi-scale convolutional attention (MSCA), a faithful PyTorch copy.

Original: ``AttentionModule`` in Visual-Attention-Network/SegNeXt ``mmseg/models/backbones/mscan.py``
(same parameter names and paddings, so SegNeXt / mmsegmentation state_dicts load unchanged).

Shapes: ``x`` is ``(N, C, H, W)`` (any memory format, any float dtype); the output has the same shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionModule", "msca_reference", "STRIP_SIZES"]

#: the (1×k then k×1) strip branches, in parameter order conv0_*, conv1_*, conv2_*.
STRIP_SIZES = (7, 11, 21)


class AttentionModule(nn.Module):
    """5×5 depthwise conv, three strip branches (1×k → k×1, k = 7, 11, 21), sum, 1×1 conv, gate by input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)

        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)

        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.clone()
        attn = self.conv0(x)

        attn_0 = self.conv0_1(attn)
        attn_0 = self.conv0_2(attn_0)

        attn_1 = self.conv1_1(attn)
        attn_1 = self.conv1_2(attn_1)

        attn_2 = self.conv2_1(attn)
        attn_2 = self.conv2_2(attn_2)
        attn = attn + attn_0 + attn_1 + attn_2

        attn = self.conv3(attn)

        return attn * u


def msca_reference(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """The same math as :class:`AttentionModule` from a module's parameters (used as the torch backend)."""
    C = x.shape[1]
    attn = F.conv2d(x, m.conv0.weight, m.conv0.bias, padding=2, groups=C)
    out = attn
    for i, k in enumerate(STRIP_SIZES):
        h, v = getattr(m, f"conv{i}_1"), getattr(m, f"conv{i}_2")
        t = F.conv2d(attn, h.weight, h.bias, padding=(0, k // 2), groups=C)
        out = out + F.conv2d(t, v.weight, v.bias, padding=(k // 2, 0), groups=C)
    return F.conv2d(out, m.conv3.weight, m.conv3.bias) * x
