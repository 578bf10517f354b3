"""ECENet's head (the port's ``SegDecodingTransformer``), its losses, and MSCAN + ECENet models (reference).

Blocks: :mod:`fastseg.reference.ecenet`. Parameter names are the port's (``laterals``, ``transfer``,
``proj``, ``ghost_up_layers``, ``token_emb``, ``gated_tokens``, ``learner``, ``trans``, ``layer_slcts``,
``norms``, ``conv_seg``), so a state_dict converted from the port's checkpoint loads.

Data flow for 4 stages (strides 4, 8, 16, 32), C = ``channels``, K = ``num_classes``:
FR + LayerNorm on every stage → 1×1 ``laterals`` to C → ECE on stride 32: mask₀ = ``learner`` (grouped 1×1,
1×1 → K), class embeddings E = ``token_emb[3]``(mask₀) → for stride 16, 8, 4: SAU (pixels attend to E; the
head-mean logits are the stage's mask), E ← ``gated_tokens``(``token_emb``(mask), E) → the 4 stage outputs
ghost-upsampled to stride 4, concatenated, ``proj`` (3×3 ConvModule) → ``conv_seg`` (dropout 0.1) plus
``class_mask_fusion(trans(E), Σ masks)``. Outputs at stride 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.ecenet import (ClassEmbedding, ClassEmbeddingUpdater, ConvModule, FeatureReconstruction,
                                GhostUpscale, SemanticsAttentionLayer, class_mask_fusion, class_mask_targets,
                                diversity_loss, diversity_maps, mask_dice_loss, mask_focal_loss)
from .mscan import mscan_b, mscan_l, mscan_s, mscan_t

__all__ = ["ECENetHead", "ECENetSegmentor", "mscan_t_ecenet", "mscan_s_ecenet", "mscan_b_ecenet",
           "mscan_l_ecenet"]


class ECENetHead(nn.Module):
    """The port's ``SegDecodingTransformer`` with the config of its released model as defaults
    (``all_levels``, ``ghost_up``, ``mask_loss``, ``div_loss`` on, ``ratio=1``, 4 heads, MLP ratio 4, dropout 0.1).

    ``forward(inputs)``: list of 4 stage features (B, C_i, H_i, W_i), finest first → dict with
    ``seg_logits`` (B, K, H₀, W₀) (what inference uses), ``masks`` (B, K, H₀, W₀) — the sum of all masks but
    the finest SAU's, the port's ``wo_mask``, supervised by the mask loss — and ``div_maps`` (list of (B, H_i·W_i),
    :func:`~fastseg.reference.ecenet.diversity_maps`). ``forward_train(inputs, labels)`` → the loss dict.

    Losses (the port's config; the loss code itself is not in the port, see docs/ecenet.md): ``loss_ce``
    (cross-entropy of ``seg_logits`` bilinearly resized to the labels, ignore 255, mmseg 0.x's mean over all
    pixels), ``loss_mask`` = 5 · sigmoid focal and ``loss_dice`` = 2 · dice on ``masks`` resized to the labels,
    for the classes present in each image, mask k ↔ class k, normalised by their count (``SDTLoss``
    mask_weight 5, dice_weight 2), and ``loss_div`` = 0.2 · :func:`~fastseg.reference.ecenet.diversity_loss`.
    """

    def __init__(self, in_channels=(64, 128, 320, 512), channels: int = 256, num_classes: int = 150,
                 num_heads: int = 4, attn_drop_rate: float = 0.0, drop_rate: float = 0.0, qkv_bias: bool = True,
                 mlp_ratio: int = 4, all_levels: bool = True, ghost_up: bool = True, mask_loss: bool = True,
                 ratio: float = 1.0, div_loss: bool = True, dropout_ratio: float = 0.1, align_corners: bool = False,
                 ignore_index: int = 255, mask_weight: float = 5.0, dice_weight: float = 2.0,
                 div_weight: float = 0.2, negate: bool = True, q_act: bool = True):
        super().__init__()
        self.in_channels = list(in_channels)
        if len(self.in_channels) < 2:
            raise ValueError("ECENetHead needs at least 2 input stages")
        self.channels = channels
        self.num_classes = num_classes
        self.all_levels, self.ghost_up = all_levels, ghost_up
        self.mask_loss, self.div_loss = mask_loss, div_loss
        self.align_corners = align_corners
        self.ignore_index = ignore_index
        self.mask_weight, self.dice_weight, self.div_weight = mask_weight, dice_weight, div_weight
        n = len(self.in_channels)

        self.laterals = nn.ModuleList([nn.Conv2d(c, channels, 1, bias=False) for c in self.in_channels])
        self.transfer = nn.ModuleList([
            SemanticsAttentionLayer(channels, num_heads, num_classes, attn_drop_rate, drop_rate, qkv_bias, mlp_ratio,
                                    negate=negate, q_act=q_act) for _ in range(n - 1)])
        if all_levels:
            self.proj = ConvModule(n * channels, channels, 3, 1, 1)
        if ghost_up:
            self.ghost_up_layers = nn.ModuleList([GhostUpscale(channels, 2 ** (i + 1)) for i in range(n - 1)])
        self.token_emb = nn.ModuleList([ClassEmbedding(num_classes, channels, ratio) for _ in range(n)])
        self.gated_tokens = nn.ModuleList([ClassEmbeddingUpdater(channels, channels, channels) for _ in range(n - 1)])
        self.learner = nn.Sequential(nn.Conv2d(channels, channels, 1, groups=num_heads, bias=False),
                                     nn.Conv2d(channels, num_classes, 1, bias=False))
        self.trans = nn.Linear(channels, num_classes)
        self.layer_slcts = nn.ModuleList([FeatureReconstruction(c) for c in self.in_channels])
        self.norms = nn.ModuleList([nn.LayerNorm(c) for c in self.in_channels])
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)  # mmseg's BaseDecodeHead init
        nn.init.zeros_(self.conv_seg.bias)

    def _resize(self, x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, inputs) -> dict:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"ECENetHead: {len(inputs)} inputs for {len(self.in_channels)} in_channels")
        feats, div_maps = [], []
        for x, slct, norm in zip(inputs, self.layer_slcts, self.norms):  # FR, then LayerNorm over channels
            diversified, out = slct(x)
            feats.append(norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            if self.div_loss:
                div_maps.append(diversity_maps(diversified))
        laterals = [lat(f) for lat, f in zip(self.laterals, feats)]

        last_mask = self.learner(laterals[-1])  # ECE
        kc = self.token_emb[-1](last_mask)  # B, K, C
        masks, outs = [last_mask], [laterals[-1]]
        for i in range(len(self.transfer), 0, -1):  # SAU, coarse to fine
            low = laterals[i - 1]
            t = self.transfer[i - 1](low, kc)
            mask = t["attn"].transpose(1, 2).reshape(low.shape[0], self.num_classes, *low.shape[2:])
            kc = self.gated_tokens[i - 1](self.token_emb[i - 1](mask), kc)
            masks.append(mask)
            outs.append(t["out"])

        if self.all_levels:
            if self.ghost_up:
                outs.reverse()  # fine to coarse
                outs = [outs[0]] + [up(o) for up, o in zip(self.ghost_up_layers, outs[1:])]
            size = feats[0].shape[2:]
            out = self.proj(torch.cat([self._resize(o, size) for o in outs], dim=1))
        else:
            out = outs[-1]

        size = masks[-1].shape[2:]
        masks = [self._resize(m, size) for m in masks]
        total_mask = torch.stack(masks).sum(0)
        wo_mask = torch.stack(masks[:-1]).sum(0)
        # the port resizes to its (resized) outs[0], i.e. the stride-4 size (= ``out``'s size)
        total_mask = F.interpolate(total_mask, size=out.shape[2:], mode="bilinear", align_corners=False)
        pred = class_mask_fusion(self.trans(kc), total_mask)
        feat = self.dropout(out) if self.dropout is not None else out
        return {"seg_logits": self.conv_seg(feat) + pred, "masks": wo_mask, "div_maps": div_maps}

    def losses(self, out: dict, labels: torch.Tensor) -> dict:
        """Loss dict from :meth:`forward`'s output and labels (B, H, W) or (B, 1, H, W) int64."""
        if labels.dim() == 4:
            labels = labels.squeeze(1)
        size = labels.shape[-2:]
        logits = self._resize(out["seg_logits"], size)
        losses = {"loss_ce": F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none").mean()}
        if self.mask_loss:
            masks = self._resize(out["masks"], size)
            targets = class_mask_targets(labels, self.ignore_index)
            pred = torch.cat([m[c] for m, (c, _) in zip(masks, targets)]).flatten(1)
            tgt = torch.cat([t for _, t in targets]).flatten(1).to(pred.dtype)
            num = max(pred.shape[0], 1)
            losses["loss_mask"] = self.mask_weight * mask_focal_loss(pred, tgt, num)
            losses["loss_dice"] = self.dice_weight * mask_dice_loss(pred, tgt, num)
        if self.div_loss:
            losses["loss_div"] = self.div_weight * diversity_loss(out["div_maps"], [c // 2 for c in self.in_channels])
        return losses

    def forward_train(self, inputs, labels) -> dict:
        return self.losses(self(inputs), labels)


class ECENetSegmentor(nn.Module):
    """``backbone(images)`` (4 features) → :class:`ECENetHead` (keys ``backbone.*``, ``decode_head.*``).

    ``model(images)`` → ``seg_logits`` resized to the image (B, K, H, W); ``model.forward_train(images, gt)`` →
    the head's losses prefixed ``decode.`` plus ``loss``, their sum.
    """

    def __init__(self, backbone: nn.Module, decode_head: ECENetHead):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, images):
        out = self.decode_head(self.backbone(images))["seg_logits"]
        return F.interpolate(out, size=images.shape[2:], mode="bilinear", align_corners=self.decode_head.align_corners)

    def forward_train(self, images, gt_semantic_seg) -> dict:
        losses = {f"decode.{k}": v for k, v in self.decode_head.forward_train(self.backbone(images),
                                                                               gt_semantic_seg).items()}
        losses["loss"] = sum(losses.values())
        return losses


def _mscan_ecenet(backbone, num_classes, channels, **head_kw):
    dims = [getattr(backbone, f"norm{i}").normalized_shape[0] for i in (1, 2, 3, 4)]
    return ECENetSegmentor(backbone, ECENetHead(in_channels=dims, channels=channels, num_classes=num_classes,
                                                **head_kw))


def mscan_t_ecenet(num_classes=150, channels=256, fused=False, head_kwargs: dict | None = None, **kw):
    """MSCAN-T (all 4 stages) + the ECENet head (C = 256 as the port's Swin-B config; no official MSCAN config
    exists). ``fused`` applies to the MSCAN backbone only; ``head_kwargs`` go to :class:`ECENetHead`."""
    return _mscan_ecenet(mscan_t(fused=fused, **kw), num_classes, channels, **(head_kwargs or {}))


def mscan_s_ecenet(num_classes=150, channels=256, fused=False, head_kwargs: dict | None = None, **kw):
    return _mscan_ecenet(mscan_s(fused=fused, **kw), num_classes, channels, **(head_kwargs or {}))


def mscan_b_ecenet(num_classes=150, channels=256, fused=False, head_kwargs: dict | None = None, **kw):
    return _mscan_ecenet(mscan_b(fused=fused, **kw), num_classes, channels, **(head_kwargs or {}))


def mscan_l_ecenet(num_classes=150, channels=256, fused=False, head_kwargs: dict | None = None, **kw):
    return _mscan_ecenet(mscan_l(fused=fused, **kw), num_classes, channels, **(head_kwargs or {}))

