"""Mask2Former's Hungarian matcher (point-sampled costs) for both output layouts.

Reference layout: ``outputs["pred_masks"]`` (B, Q, h, w) logits. Fused layout: ``outputs["pred_embeds"]``
(B, Q, C) and ``outputs["mask_features"]`` (B, C, h, w): F is sampled once at the image's shared random
points and the logits are one GEMM; the BCE cost becomes ``(Σ_p softplus(x) − x · t) / P`` (one GEMM, since
softplus(−x) − softplus(x) = −x). Both draw the same random points in the same order, so with one seed
they compute the same costs up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .common import point_sample
from .fused import shared_point_logits

__all__ = ["HungarianMatcher", "batch_dice_loss", "batch_sigmoid_ce_loss", "batch_sigmoid_ce_loss_gemm"]


def batch_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (N, P) logits; targets: (M, P) in {0, 1}. Returns (N, M) dice costs."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean BCE-with-logits, as the original: (N, P), (M, P) -> (N, M)."""
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return loss / hw


def batch_sigmoid_ce_loss_gemm(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Same as :func:`batch_sigmoid_ce_loss` with one GEMM: (Σ softplus(x) − x·tᵀ) / P."""
    return (F.softplus(inputs).sum(-1, keepdim=True) - inputs @ targets.transpose(0, 1)) / inputs.shape[1]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The original computes costs in float32; float64 stays float64 (tests)."""
    return x if x.dtype == torch.float64 else x.float()


class HungarianMatcher(nn.Module):
    """1-to-1 assignment of predictions to targets minimising
    ``cost_class·(−p[class]) + cost_mask·BCE + cost_dice·dice`` on ``num_points`` uniform points per image."""

    def __init__(self, cost_class: float = 1, cost_mask: float = 1, cost_dice: float = 1, num_points: int = 0):
        super().__init__()
        assert cost_class != 0 or cost_mask != 0 or cost_dice != 0, "all costs cant be 0"
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """The (Q, T_b) cost matrix of every image (on the outputs' device)."""
        fused = "pred_masks" not in outputs
        bs, num_queries = outputs["pred_logits"].shape[:2]
        costs = []
        for b in range(bs):
            out_prob = outputs["pred_logits"][b].softmax(-1)
            tgt_ids = targets[b]["labels"]
            cost_class = -out_prob[:, tgt_ids]
            ref = outputs["mask_features"] if fused else outputs["pred_masks"]
            tgt_mask = targets[b]["masks"].to(ref)
            point_coords = torch.rand(1, self.num_points, 2, device=ref.device)
            if tgt_mask.shape[0] == 0:
                costs.append(cost_class)
                continue
            if fused:
                tgt = point_sample(tgt_mask[None], point_coords, align_corners=False)[0]
                out = shared_point_logits(outputs["pred_embeds"][b], outputs["mask_features"][b], point_coords)
            else:
                tgt = point_sample(tgt_mask[:, None], point_coords.repeat(tgt_mask.shape[0], 1, 1),
                                   align_corners=False).squeeze(1)
                out_mask = outputs["pred_masks"][b][:, None]
                out = point_sample(out_mask, point_coords.repeat(out_mask.shape[0], 1, 1),
                                   align_corners=False).squeeze(1)
            with torch.autocast(ref.device.type, enabled=False):
                out, tgt = _acc(out), _acc(tgt)
                ce = batch_sigmoid_ce_loss_gemm(out, tgt) if fused else batch_sigmoid_ce_loss(out, tgt)
                cost_mask = ce
                cost_dice = batch_dice_loss(out, tgt)
            C = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            costs.append(C.reshape(num_queries, -1))
        return costs

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K+1) and pred_masks or pred_embeds + mask_features; targets: per image
        {"labels": (T,), "masks": (T, H, W)}. Returns per image (query indices, target indices), int64."""
        indices = []
        for C in self.cost_matrices(outputs, targets):
            i, j = linear_sum_assignment(C.float().cpu() if C.dtype == torch.bfloat16 else C.cpu())
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices

    def __repr__(self):
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, num_points={self.num_points})")
