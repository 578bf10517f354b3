"""Whole models with the CAC head (reference, plain PyTorch): an mmseg-style encoder-decoder and SegNeXt + CAC.

``model(images)`` → context-aware logits resized to the image (B, K, H, W) (mmseg's whole-image inference);
``model.forward_train(images, gt)`` → the head's losses prefixed ``decode.`` plus ``loss``, their total as
mmseg's ``_parse_losses`` sums it (every key containing ``loss``: here ``decode.loss_ce``, which already holds
CE + PreSelf CE + oracle CE + distillation). ``model.decode_head.set_fused(True)`` (or ``fastseg.patch(model)``) runs
the head's classifier as fastseg's fused Triton ops (:mod:`fastseg.ops.cac`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .cac_head import DepthwiseSeparableASPPHeadCAC, FCNHeadCAC, LightHamHeadCAC, UPerHeadCAC
from .mscan import mscan_b, mscan_l, mscan_s, mscan_t

__all__ = ["CACSegmentor", "segnext_t_cac", "segnext_s_cac", "segnext_b_cac", "segnext_l_cac", "FCNHeadCAC",
           "UPerHeadCAC", "DepthwiseSeparableASPPHeadCAC", "LightHamHeadCAC"]


class CACSegmentor(nn.Module):
    """``backbone(images)`` (a list of features) → a CAC ``decode_head`` (keys ``backbone.*``, ``decode_head.*``)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, images):
        out = self.decode_head(self.backbone(images))
        return F.interpolate(out, size=images.shape[2:], mode="bilinear",
                             align_corners=self.decode_head.align_corners)

    def forward_train(self, images, gt_semantic_seg) -> dict:
        losses = {f"decode.{k}": v for k, v in self.decode_head.forward_train(self.backbone(images),
                                                                               gt_semantic_seg).items()}
        losses["loss"] = sum(v for k, v in losses.items() if "loss" in k)
        return losses


def _segnext_cac(backbone, ham_channels, md_r, num_classes, **head_kw):
    dims = [getattr(backbone, f"norm{i}").normalized_shape[0] for i in (2, 3, 4)]
    head = LightHamHeadCAC(in_channels=dims, channels=ham_channels, ham_channels=ham_channels,
                           num_classes=num_classes,
                           ham_kwargs=dict(MD_S=1, MD_R=md_r, train_steps=6, eval_steps=7, inv_t=100, rand_init=True),
                           **head_kw)
    return CACSegmentor(backbone, head)


def segnext_t_cac(num_classes=150, fused=False, **kw):
    """MSCAN-T + the light Hamburger head (256 channels) with CAC; ``fused`` applies to the MSCAN backbone only."""
    return _segnext_cac(mscan_t(fused=fused, **kw), 256, 16, num_classes)


def segnext_s_cac(num_classes=150, fused=False, **kw):
    return _segnext_cac(mscan_s(fused=fused, **kw), 256, 16, num_classes)


def segnext_b_cac(num_classes=150, fused=False, **kw):
    return _segnext_cac(mscan_b(fused=fused, **kw), 512, 64, num_classes)


def segnext_l_cac(num_classes=150, fused=False, **kw):
    return _segnext_cac(mscan_l(fused=fused, **kw), 1024, 64, num_classes)
