"""Record of the fused bilinear upsample + per-pixel cross-entropy ``fastseg.ops.upsampled_cross_entropy``
(CAC heads' ``set_fused(True)`` training loss). No module of its own and nothing for ``patch`` to swap."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_op import FusedOp

__all__ = ["RECORD"]


class _Loss(nn.Module):
    """``loss(logits (B, K, h, w), target (B, H, W) long) -> (B, H, W)`` per-pixel CE, fused or eager."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, logits, target):
        if self.fused:
            from fastseg.ops import upsampled_cross_entropy

            return upsampled_cross_entropy(logits, target, align_corners=False, ignore_index=255)
        up = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, target, ignore_index=255, reduction="none")


def _check(device, dtype):
    """Loss and logit gradient vs ``F.interpolate`` + ``F.cross_entropy`` (odd sizes, ignored pixels)."""
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    require("fastseg.ops", "upsampled_cross_entropy", "the fused upsample + cross-entropy lands with CAC")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 21, 26), generator=g)
    target[:, :3] = 255
    return compare(_Loss(True), _Loss(False), [logits, target.to(device)], lambda m, x, t: m(x, t), dtype, device,
                   input_names=["logits", "target"])


RECORD = FusedOp(
    name="upsample_ce",
    summary="bilinear upsample + per-pixel cross-entropy, no (B, K, H, W) upsampled logits (CAC losses)",
    check=_check,
    bench=("cac",),
)
