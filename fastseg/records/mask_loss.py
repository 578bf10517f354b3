"""Record of MaskFormer's fused full-resolution mask losses ``fastseg.ops.mask_losses_from_embeddings``
(``MaskFormer.set_fused(True)``'s criterion). No module of its own and nothing for ``patch`` to swap."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_op import FusedOp

__all__ = ["RECORD"]


class _Loss(nn.Module):
    """``loss(embeds (T, C), features (B, C, h, w), targets (T, H, W) uint8, batch_idx (T,))`` -> (2,) = the
    focal and dice losses (official reductions, num_masks = T), fused or as the official criterion."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, embeds, features, targets, batch_idx):
        from fastseg.ops.mask_loss import mask_losses_from_embeddings, matched_logits

        T = embeds.shape[0]
        if self.fused:
            return torch.stack(mask_losses_from_embeddings(embeds, features, batch_idx, targets, T))
        x = F.interpolate(matched_logits(embeds, features, batch_idx)[:, None], size=targets.shape[-2:],
                          mode="bilinear", align_corners=False)[:, 0].flatten(1)
        y = targets.flatten(1).to(x)
        prob = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = prob * y + (1 - prob) * (1 - y)
        focal = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean(1).sum() / T
        dice = (1 - (2 * (prob * y).sum(-1) + 1) / (prob.sum(-1) + y.sum(-1) + 1)).sum() / T
        return torch.stack([focal, dice])


def _check(device, dtype):
    """Losses and gradients (embeddings, features) vs the official formulas: odd sizes, 3 images (one without
    pairs), an empty and an all-ones target."""
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    require("fastseg.ops", "mask_losses_from_embeddings", "the fused MaskFormer mask losses land with issue 16")
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(4, 8, generator=g)
    features = torch.randn(3, 8, 7, 9, generator=g)
    targets = (torch.rand(4, 29, 35, generator=g) > 0.6).to(torch.uint8)
    targets[0] = 0
    targets[1] = 1
    batch_idx = torch.tensor([0, 2, 0, 2])
    return compare(_Loss(True), _Loss(False), [embeds, features, targets.to(device), batch_idx.to(device)],
                   lambda m, e, f, t, b: m(e, f, t, b), dtype, device,
                   input_names=["embeds", "features", "targets", "batch_idx"])


RECORD = FusedOp(
    name="mask_loss",
    summary="bilinear upsample + sigmoid focal + dice at the target size, no (T, H, W) tensors (MaskFormer losses)",
    check=_check,
    bench=("maskformer",),
)
