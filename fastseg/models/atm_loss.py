"""SegViT's ``ATMLoss`` (zbwxp/SegVit ``losses/atm_loss.py`` + ``losses/criterion.py``).

What the official loss does, and this one too:

* targets from the label map: one binary mask per class present (``ignore_index`` dropped); an image with no
  valid class gets no labels (and one placeholder mask ``label == ignore_index``, never indexed);
* **fixed assignment, no Hungarian matching**: class ``c`` is supervised on query ``c`` (the queries are the
  ``num_classes`` class embeddings), indices ``(labels, arange(len(labels)))``, the same for every aux output;
* class loss: cross-entropy over ``num_classes + 1`` logits, no-object weight ``eos_coef = 0.1``, every
  query not matched has target "no object";
* mask loss: **sigmoid focal loss** (alpha 0.25, gamma 2, mean over pixels) ×20 and dice (+1 smoothing) ×1
  on full masks (predictions bilinearly resized to the label size, ``align_corners=False``), both divided
  by the number of masks in the batch (all-reduced, clamped to ≥ 1);
* weights ``loss_ce`` 1, ``loss_mask`` 20, ``loss_dice`` 1, the same for ``<name>_<i>``, i < dec_layers - 1,
  all × ``loss_weight``; keys outside the weight dict dropped.

The math is MaskFormer's criterion (:class:`fastseg.models.maskformer.MaskFormerCriterion`, same focal / dice /
class terms) with :class:`FixedClassMatcher` in place of the Hungarian matcher. ``use_point=True`` (the
official ``SetCriterion_point``) is not available: its import is commented out in the official code.
"""
from __future__ import annotations

import torch
from torch import nn

from .maskformer import MaskFormerCriterion

__all__ = ["ATMLoss", "FixedClassMatcher", "prepare_targets"]


class FixedClassMatcher(nn.Module):
    """SegViT's assignment: for each image, ``(labels, arange(len(labels)))`` — query = class id."""

    @torch.no_grad()
    def forward(self, outputs, targets):
        return [(t["labels"], torch.arange(len(t["labels"]), device=t["labels"].device)) for t in targets]


def prepare_targets(label: torch.Tensor, ignore_index: int) -> list[dict]:
    """label (B, H, W) integer class map -> per image ``{"labels": (T,) int64 sorted, "masks": (T, H, W) bool}``
    (``masks`` is ``label == ignore_index`` alone, with no labels, when no class is present)."""
    out = []
    for lab in label:
        cls = lab.unique()
        cls = cls[cls != ignore_index]
        masks = [lab == c for c in cls] if len(cls) else [lab == ignore_index]
        out.append({"labels": cls.long(), "masks": torch.stack(masks, dim=0)})
    return out


class ATMLoss(nn.Module):
    """``ATMLoss(num_classes, dec_layers, mask_weight=20, dice_weight=1, cls_weight=1, loss_weight=1)``.

    ``forward(outputs, label, ignore_index)``: outputs = the ATM head's training dict (``pred_logits``
    (B, K, K+1), ``pred_masks`` (B, K, h, w) mask logits, ``aux_outputs``); label (B, H, W) int.
    Returns the weighted losses ``{"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}``.
    ``criterion.empty_weight`` is a buffer, as the official one (``loss_decode.criterion.empty_weight`` in
    SegViT checkpoints).
    """

    def __init__(self, num_classes: int, dec_layers: int, mask_weight: float = 20.0, dice_weight: float = 1.0,
                 cls_weight: float = 1.0, loss_weight: float = 1.0, use_point: bool = False,
                 eos_coef: float = 0.1):
        super().__init__()
        if use_point:
            raise NotImplementedError("use_point=True: the official SetCriterion_point is not in zbwxp/SegVit")
        weight_dict = {"loss_ce": cls_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        for i in range(dec_layers - 1):
            weight_dict.update({k + f"_{i}": v for k, v in list(weight_dict.items())[:3]})
        self.criterion = MaskFormerCriterion(num_classes, FixedClassMatcher(), weight_dict, eos_coef)
        self.loss_weight = loss_weight

    def forward(self, outputs: dict, label: torch.Tensor, ignore_index: int = 255) -> dict:
        targets = prepare_targets(label, ignore_index)
        losses = self.criterion(outputs, targets)
        wd = self.criterion.weight_dict
        return {k: v * wd[k] * self.loss_weight for k, v in losses.items() if k in wd}
