"""MaskFormer (Cheng et al., 2021) in plain PyTorch, faithful to facebookresearch/MaskFormer.

FPN pixel decoder (:class:`~fastseg.models.pixel_decoder.BasePixelDecoder`), DETR's standard transformer
decoder on the stride-32 feature ("res5"), class and mask heads, Hungarian matching and losses on full
masks (sigmoid focal loss ×20, dice ×1, class CE ×1 with no-object weight 0.1), semantic inference.
Cross-attention is DETR's ``multihead_attn`` (an ``nn.MultiheadAttention`` called by keyword).

:meth:`MaskFormer.set_fused` switches to the fused training path with the same parameters: the predictor
returns mask embeddings + mask features instead of the (L, B, Q, H/4, W/4) mask logits, the mask losses are
:func:`fastseg.ops.mask_losses_from_embeddings` (upsample + focal + dice tile by tile, no (T, H, W) tensor),
the matcher is told ``fused`` and the decoder's cross-attention runs fastseg's fused attention kernel
(docs/models.md, "MaskFormer fused training").
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .common import MLP, PositionEmbeddingSine, c2_xavier_fill, get_activation_fn
from .criterion import SetCriterion, dice_loss, pad_target_masks
from .inference import semantic_inference
from .mask2former import as_feature_list, infer_channels, semantic_inference_from_outputs
from .matcher import batch_dice_loss
from .pixel_decoder import BasePixelDecoder

__all__ = [
    "Transformer", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerPredictor",
    "MaskFormerMatcher", "MaskFormerCriterion", "MaskFormer", "build_maskformer", "sigmoid_focal_loss",
    "batch_sigmoid_focal_loss",
]


def _with_pos(t, pos):
    return t if pos is None else t + pos


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        if self.normalize_before:
            src2 = self.norm1(src)
            q = k = _with_pos(src2, pos)
            src2 = self.self_attn(q, k, value=src2, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
            src = src + self.dropout1(src2)
            src2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm2(src)))))
            return src + self.dropout2(src2)
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerDecoderLayer(nn.Module):
    """DETR decoder layer: self-attention, cross-attention (``multihead_attn``), FFN."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None):
        if self.normalize_before:
            tgt2 = self.norm1(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt2 = self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
            tgt = tgt + self.dropout1(tgt2)
            tgt2 = self.norm2(tgt)
            tgt2 = self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                                       attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
            tgt = tgt + self.dropout2(tgt2)
            tgt2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
            return tgt + self.dropout3(tgt2)
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class Transformer(nn.Module):
    """DETR's transformer. forward(src (B, C, H, W), mask, query_embed (Q, C), pos (B, C, H, W)) ->
    (hs (L, B, Q, C) — every layer's normed output if ``return_intermediate_dec`` —, memory (B, C, H, W))."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", normalize_before=False, return_intermediate_dec=False):
        super().__init__()
        enc = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        dec = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate_dec
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model, self.nhead = d_model, nhead

    def forward(self, src, mask, query_embed, pos_embed):
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        if mask is not None:
            mask = mask.flatten(1)
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, src_key_padding_mask=mask, pos=pos_embed)
        if self.encoder_norm is not None:
            memory = self.encoder_norm(memory)
        output = torch.zeros_like(query_embed)
        intermediate = []
        for layer in self.decoder_layers:
            output = layer(output, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
            if self.return_intermediate:
                intermediate.append(self.decoder_norm(output))
        output = self.decoder_norm(output)
        if self.return_intermediate:
            intermediate[-1] = output
            hs = torch.stack(intermediate)
        else:
            hs = output.unsqueeze(0)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)


class TransformerPredictor(nn.Module):
    """MaskFormer's transformer predictor: forward(x (B, in_channels, h, w), mask_features (B, mask_dim, H, W))
    -> {"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H, W), "aux_outputs": [...] if deep supervision}."""

    def __init__(self, in_channels: int, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dropout: float = 0.1, dim_feedforward: int = 2048, enc_layers: int = 0,
                 dec_layers: int = 6, pre_norm: bool = False, deep_supervision: bool = True, mask_dim: int = 256):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(d_model=hidden_dim, dropout=dropout, nhead=nheads,
                                       dim_feedforward=dim_feedforward, num_encoder_layers=enc_layers,
                                       num_decoder_layers=dec_layers, normalize_before=pre_norm,
                                       return_intermediate_dec=deep_supervision)
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        self.aux_loss = deep_supervision
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        #: fused layout: "pred_embeds" (B, Q, mask_dim) + "mask_features" instead of "pred_masks"
        self.fused = False

    def forward(self, x, mask_features):
        pos = self.pe_layer(x).to(x.dtype)
        hs, _ = self.transformer(self.input_proj(x), None, self.query_embed.weight, pos)
        outputs_class = self.class_embed(hs)
        out = {"pred_logits": outputs_class[-1]}
        if self.fused:
            embeds = self.mask_embed(hs if self.aux_loss else hs[-1:])
            out.update(pred_embeds=embeds[-1], mask_features=mask_features)
            if self.aux_loss:
                out["aux_outputs"] = [{"pred_logits": a, "pred_embeds": e, "mask_features": mask_features}
                                      for a, e in zip(outputs_class[:-1], embeds[:-1])]
            return out
        if self.aux_loss:
            outputs_seg_masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
            out["pred_masks"] = outputs_seg_masks[-1]
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": b}
                                  for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])]
        else:
            out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs[-1]), mask_features)
        return out


def sigmoid_focal_loss(inputs, targets, num_masks, alpha: float = 0.25, gamma: float = 2):
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def batch_sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2):
    hw = inputs.shape[1]
    prob = inputs.sigmoid()
    focal_pos = ((1 - prob) ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs),
                                                                          reduction="none")
    focal_neg = (prob ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs),
                                                                    reduction="none")
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    loss = torch.einsum("nc,mc->nm", focal_pos, targets) + torch.einsum("nc,mc->nm", focal_neg, 1 - targets)
    return loss / hw


def _assign(costs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scipy's linear_sum_assignment of each (Q, T_b) cost matrix (16-bit costs go through float32); one
    device-to-host copy for the whole batch."""
    if not costs:
        return []
    dtype = torch.float32 if costs[0].dtype in (torch.float16, torch.bfloat16) else costs[0].dtype
    flat = torch.cat([C.to(dtype).flatten() for C in costs]).cpu()
    out, start = [], 0
    for C in costs:
        block = flat[start:start + C.numel()].view(C.shape)
        start += C.numel()
        i, j = linear_sum_assignment(block)
        out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
    return out


class MaskFormerMatcher(nn.Module):
    """MaskFormer's matcher: focal + dice costs on full masks (targets downsampled, nearest, to the
    prediction size).

    ``fused=True`` computes the focal and dice costs with :func:`fastseg.ops.matcher_mask_costs_batch` (one
    Triton launch for the batch: no padded / resized target, no (Q, h·w) focal terms; fp32 accumulation) from
    ``pred_masks``, or from ``pred_embeds`` (B, Q, C) + ``mask_features`` (B, C, h, w) when the outputs carry
    no ``pred_masks``. The assignment is scipy's ``linear_sum_assignment`` either way.
    """

    def __init__(self, cost_class: float = 1, cost_mask: float = 1, cost_dice: float = 1, fused: bool = False):
        super().__init__()
        assert cost_class != 0 or cost_mask != 0 or cost_dice != 0, "all costs cant be 0"
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.fused = fused

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """The (Q, T_b) cost matrix of every image (on the outputs' device)."""
        if self.fused:
            return self._fused_cost_matrices(outputs, targets)
        bs, num_queries = outputs["pred_logits"].shape[:2]
        padded = pad_target_masks([t["masks"] for t in targets])
        costs = []
        for b in range(bs):
            out_prob = outputs["pred_logits"][b].softmax(-1)
            out_mask = outputs["pred_masks"][b]
            n = targets[b]["masks"].shape[0]
            tgt_mask = padded[b, :n].to(out_mask)
            cost_class = -out_prob[:, targets[b]["labels"]]
            tgt_mask = F.interpolate(tgt_mask[:, None], size=out_mask.shape[-2:], mode="nearest")
            out_flat, tgt_flat = out_mask.flatten(1), tgt_mask[:, 0].flatten(1)
            C = (self.cost_mask * batch_sigmoid_focal_loss(out_flat, tgt_flat) + self.cost_class * cost_class
                 + self.cost_dice * batch_dice_loss(out_flat, tgt_flat))
            costs.append(C.reshape(num_queries, -1))
        return costs

    def _fused_cost_matrices(self, outputs, targets):
        from fastseg.ops.mask_cost import matcher_mask_costs_batch

        ref = outputs["pred_masks"] if "pred_masks" in outputs else outputs["mask_features"]
        masks = [t["masks"].to(ref.device) for t in targets]  # a copy only across devices
        if "pred_masks" in outputs:
            mask_costs = matcher_mask_costs_batch(masks, logits=outputs["pred_masks"])
        else:
            mask_costs = matcher_mask_costs_batch(masks, embeds=outputs["pred_embeds"],
                                                  features=outputs["mask_features"])
        costs = []
        for b, (focal, dice) in enumerate(mask_costs):
            cost_class = -outputs["pred_logits"][b].softmax(-1)[:, targets[b]["labels"]].to(focal.dtype)
            costs.append(self.cost_mask * focal + self.cost_class * cost_class + self.cost_dice * dice)
        return costs

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w) (or, fused, pred_embeds + mask_features);
        targets: per image {"labels": (T,), "masks": (T, H, W)}. Returns per image (query, target) indices."""
        return _assign(self.cost_matrices(outputs, targets))

    def __repr__(self):
        return (f"MaskFormerMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, fused={self.fused})")


class MaskFormerCriterion(SetCriterion):
    """MaskFormer's criterion: class CE + focal and dice losses on full masks (predictions upsampled
    bilinearly to the target size).

    ``fused``: the mask losses come from :func:`fastseg.ops.mask_losses_from_embeddings` (fused outputs:
    ``pred_embeds`` + ``mask_features``) or :func:`fastseg.ops.mask_losses` (``pred_masks``), computed tile by
    tile at the target resolution (same formulas; fp32 accumulation, fp32 losses for fp16/bf16 logits).
    A matcher without ``fused`` set gets fused outputs' stride-4 logits built under no_grad for the call."""

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses=("labels", "masks")):
        super().__init__(num_classes, matcher, weight_dict, eos_coef, losses)
        self.fused = False
        self._padded = None  # fused path: one padded copy of the targets for every layer of a forward

    def forward(self, outputs: dict, targets: list[dict], return_indices: bool = False):
        try:
            return super().forward(outputs, targets, return_indices)
        finally:
            self._padded = None

    def loss_masks(self, outputs, targets, indices, num_masks):
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        if self.fused or "pred_masks" not in outputs:
            return self._fused_loss_masks(outputs, targets, src_idx, tgt_idx, num_masks,
                                          [len(src) for src, _ in indices])
        src_masks = outputs["pred_masks"][src_idx]
        target_masks = pad_target_masks([t["masks"] for t in targets]).to(src_masks)[tgt_idx]
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        target_masks = target_masks.flatten(1).view(src_masks.shape)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_masks),
                "loss_dice": dice_loss(src_masks, target_masks, num_masks)}

    def _fused_loss_masks(self, outputs, targets, src_idx, tgt_idx, num_masks, pairs_per_image=None):
        from .. import ops

        ref = outputs["pred_masks"] if "pred_masks" in outputs else outputs["mask_features"]
        if self._padded is None or self._padded[0] is not targets:
            padded = pad_target_masks([t["masks"] for t in targets])  # (B, T_max, H, W), the masks' dtype
            self._padded = (targets, padded.flatten(0, 1).to(ref.device), padded.shape[1])
        _, flat, T_max = self._padded  # one copy for every layer (and what their losses save)
        rows = tgt_idx[0] * T_max + tgt_idx[1]  # on the CPU (validated without a device sync)
        if "pred_masks" in outputs:
            loss_mask, loss_dice = ops.mask_losses(outputs["pred_masks"][src_idx], flat, num_masks, rows)
        else:
            embeds = outputs["pred_embeds"][src_idx]
            # src_idx lists the pairs image by image: the host counts group them (no tensor read)
            by_count = pairs_per_image is not None
            loss_mask, loss_dice = ops.mask_losses_from_embeddings(
                embeds, outputs["mask_features"], None if by_count else src_idx[0], flat, num_masks, rows,
                pairs_per_image=pairs_per_image)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def match(self, outputs, targets):
        if "pred_masks" not in outputs and not getattr(self.matcher, "fused", False):
            with torch.no_grad():  # a reference matcher on fused outputs: the logits it needs, for this call only
                masks = torch.einsum("bqc,bchw->bqhw", outputs["pred_embeds"], outputs["mask_features"])
            outputs = {**outputs, "pred_masks": masks}
        return self.matcher(outputs, targets)


class MaskFormer(nn.Module):
    """Backbone (4 maps at strides 4..32) + FPN pixel decoder + transformer predictor on the stride-32 map.

    ``forward(images)`` -> outputs; ``forward(images, targets)`` -> weighted losses.
    Defaults are the official ADE20k R50 config: 100 queries, 6 decoder layers, dropout 0.1, mask weight 20
    (focal), dice 1, class 1, no-object 0.1, deep supervision.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: list[int] | None = None, *,
                 hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8, dropout: float = 0.1,
                 dim_feedforward: int = 2048, enc_layers: int = 0, dec_layers: int = 6, pre_norm: bool = False,
                 deep_supervision: bool = True, conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN",
                 mask_weight: float = 20.0, dice_weight: float = 1.0, no_object_weight: float = 0.1,
                 fused: bool = False):
        super().__init__()
        self.backbone = backbone
        in_channels = in_channels or infer_channels(backbone)
        self.num_classes = num_classes
        self.pixel_decoder = BasePixelDecoder(in_channels, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        self.predictor = TransformerPredictor(
            in_channels[-1], num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries,
            nheads=nheads, dropout=dropout, dim_feedforward=dim_feedforward, enc_layers=enc_layers,
            dec_layers=dec_layers, pre_norm=pre_norm, deep_supervision=deep_supervision, mask_dim=mask_dim)
        matcher = MaskFormerMatcher(cost_class=1, cost_mask=mask_weight, cost_dice=dice_weight)
        weight_dict = {"loss_ce": 1, "loss_mask": mask_weight, "loss_dice": dice_weight}
        if deep_supervision:
            for i in range(dec_layers - 1):
                weight_dict.update({k + f"_{i}": v for k, v in list(weight_dict.items())[:3]})
        self.criterion = MaskFormerCriterion(num_classes, matcher, weight_dict, no_object_weight)
        if fused:
            self.set_fused(True)

    @property
    def fused(self) -> bool:
        return self.predictor.fused

    def set_fused(self, fused: bool = True) -> "MaskFormer":
        """Switch between the reference and the fused training path (same parameters, same random numbers
        except the attention dropout's; see docs/models.md "MaskFormer fused training"):

        * predictor outputs ``pred_embeds`` + ``mask_features`` instead of ``pred_masks`` (no (L, B, Q, H/4,
          W/4) mask logits); the criterion's mask losses run :func:`fastseg.ops.mask_losses_from_embeddings`;
          ``criterion.matcher.fused`` is set where the matcher has that attribute (its fused costs; a matcher
          without it is handed the stride-4 logits, built under no_grad for the call).
        * the decoder layers' cross-attention (``multihead_attn``) becomes :class:`fastseg.nn.MaskedCrossAttention`
          in place (its class changes; the same parameter tensors, so optimizers keep them) with
          ``need_weights_default = False`` (the layer discards the weights); attention dropout is fused (a
          different random stream from ``nn.MultiheadAttention``'s). ``set_fused(False)`` restores the classes.
        """
        fused = bool(fused)
        self.predictor.fused = fused
        self.criterion.fused = fused
        if hasattr(self.criterion.matcher, "fused"):  # a matcher without fused costs gets stride-4 logits
            self.criterion.matcher.fused = fused
        self._set_fused_attention(fused)
        return self

    def _set_fused_attention(self, fused: bool) -> None:
        from ..nn import MaskedCrossAttention

        for layer in self.predictor.transformer.decoder_layers:
            mha = layer.multihead_attn
            if fused and type(mha) is nn.MultiheadAttention:
                if mha.bias_k is not None or mha.add_zero_attn or mha.dropout >= 1.0:
                    raise NotImplementedError("fused attention: add_bias_kv, add_zero_attn and dropout=1 are not "
                                              "supported")
                mha.__class__ = MaskedCrossAttention
                mha.need_weights_default = False
            elif not fused and type(mha) is MaskedCrossAttention:
                mha.__dict__.pop("need_weights_default", None)
                mha.__class__ = nn.MultiheadAttention

    def forward_features(self, images):
        features = as_feature_list(self.backbone(images))
        mask_features, _ = self.pixel_decoder(features)
        return self.predictor(features[-1], mask_features)

    def forward(self, images, targets=None):
        outputs = self.forward_features(images)
        if targets is None:
            return outputs
        losses = self.criterion(outputs, targets)
        return {k: v * self.criterion.weight_dict[k] for k, v in losses.items() if k in self.criterion.weight_dict}

    @torch.no_grad()
    def semantic_inference(self, outputs: dict, size: tuple[int, int], tile_rows: int | None = None
                           ) -> list[torch.Tensor]:
        """Per image (K, H, W) scores at ``size``; fused outputs are upsampled ``tile_rows`` rows at a time."""
        if "pred_masks" not in outputs:
            return semantic_inference_from_outputs(outputs, size, tile_rows)
        masks = F.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)
        return [semantic_inference(c, m) for c, m in zip(outputs["pred_logits"], masks)]


def build_maskformer(backbone="tiny", num_classes: int = 150, *, backbone_kwargs: dict | None = None,
                     **kwargs) -> MaskFormer:
    """MaskFormer with a named backbone (see :func:`fastseg.models.build_mask2former`) or a module."""
    from .backbones import backbone_from_name

    channels = kwargs.pop("in_channels", None)
    if isinstance(backbone, str):
        backbone, known = backbone_from_name(backbone, **(backbone_kwargs or {}))
        channels = channels or known
    return MaskFormer(backbone, num_classes, in_channels=channels, **kwargs)
