"""Mask2Former's set criterion: class CE (no-object weight ``eos_coef``) and point-sampled mask BCE + dice
(PointRend uncertainty sampling), for the reference (``pred_masks``) and fused (``pred_embeds`` +
``mask_features``) output layouts. The fused path never forms the (B, Q, h, w) logits: the point logits of
the matched masks come from :func:`fused.point_logits` (a bounded chunk of matched masks' logit maps at a time,
recomputed in backward), the uncertainty sampling included; it draws the same random numbers in the same
order as the reference, so with one seed both give the same losses up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample
from .fused import point_logits as fused_point_logits

__all__ = ["SetCriterion", "dice_loss", "sigmoid_ce_loss", "pad_target_masks"]


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def pad_target_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad per-image (T_b, H_b, W_b) masks to one (B, T_max, H_max, W_max) tensor (DETR's NestedTensor)."""
    T = max(m.shape[0] for m in masks)
    H = max(m.shape[1] for m in masks)
    W = max(m.shape[2] for m in masks)
    out = masks[0].new_zeros((len(masks), T, H, W))
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out


class SetCriterion(nn.Module):
    """Losses after Hungarian matching, on the last layer and (``aux_outputs``) every earlier prediction."""

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict, eos_coef: float,
                 losses=("labels", "masks"), num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, chunk_elems: int = 1 << 24):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.chunk_elems = chunk_elems

    def loss_labels(self, outputs, targets, indices, num_masks):
        src_logits = outputs["pred_logits"]
        src_logits = src_logits if src_logits.dtype == torch.float64 else src_logits.float()
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o.to(src_logits.device)
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight.to(src_logits))
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs, targets, indices, num_masks):
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        fused = "pred_masks" not in outputs
        ref = outputs["mask_features"] if fused else outputs["pred_masks"]
        target_masks = pad_target_masks([t["masks"] for t in targets]).to(ref)
        target_masks = target_masks[tgt_idx][:, None]  # (N, 1, H, W)
        if fused:
            embeds = outputs["pred_embeds"][src_idx]  # (N, C)
            feats = outputs["mask_features"]
            batch_idx = src_idx[0].to(feats.device)
            with torch.no_grad():
                point_coords = get_uncertain_point_coords_with_randomness(
                    embeds[:, None], calculate_uncertainty, self.num_points, self.oversample_ratio,
                    self.importance_sample_ratio,
                    sample_logits=lambda c: fused_point_logits(embeds.detach(), feats.detach(), batch_idx, c,
                                                               self.chunk_elems)[:, None])
                point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
            point_logits = fused_point_logits(embeds, feats, batch_idx, point_coords, self.chunk_elems)
        else:
            src_masks = outputs["pred_masks"][src_idx][:, None]  # (N, 1, h, w)
            with torch.no_grad():
                point_coords = get_uncertain_point_coords_with_randomness(
                    src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio,
                    self.importance_sample_ratio)
                point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
            point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _get_src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def get_loss(self, loss, outputs, targets, indices, num_masks):
        loss_map = {"labels": self.loss_labels, "masks": self.loss_masks}
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}")
        return loss_map[loss](outputs, targets, indices, num_masks)

    def match(self, outputs: dict, targets: list[dict]):
        """The matcher's indices for one prediction (``outputs`` without ``aux_outputs``)."""
        return self.matcher(outputs, targets)

    def num_masks(self, targets, device) -> float:
        n = sum(len(t["labels"]) for t in targets)
        n = torch.as_tensor([n], dtype=torch.float, device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            world = torch.distributed.get_world_size()
        return torch.clamp(n / world, min=1).item()

    def forward(self, outputs: dict, targets: list[dict], return_indices: bool = False):
        """Unweighted losses {"loss_ce", "loss_mask", "loss_dice", and "<name>_<i>" per aux output}."""
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.match(outputs_without_aux, targets)
        all_indices = [indices]
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.match(aux_outputs, targets)
            all_indices.append(indices)
            for loss in self.losses:
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                losses.update({k + f"_{i}": v for k, v in l_dict.items()})
        return (losses, all_indices) if return_indices else losses
