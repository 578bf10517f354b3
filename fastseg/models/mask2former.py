"""Mask2Former (Cheng et al., 2022) in plain PyTorch, faithful to facebookresearch/Mask2Former.

* :class:`MultiScaleMaskedTransformerDecoder` (alias :class:`Mask2FormerDecoder`): the masked-attention
  decoder. Cross-attention is an ``nn.MultiheadAttention`` called by keyword (as the official
  ``CrossAttentionLayer``), so :class:`fastseg.nn.MaskedCrossAttention` drops in.
* :class:`Mask2Former`: backbone + :class:`~fastseg.models.pixel_decoder.MSDeformAttnPixelDecoder` +
  decoder + criterion + inference; :func:`build_mask2former` builds it for a named backbone.

``fused`` (constructor flag or :meth:`set_fused`) switches to the memory-lean path with the same parameters:
attention masks from ``e · resize(F)`` per level, outputs as query embeddings + mask features (no
(B, Q, H/4, W/4) logits), point-sampled matcher/losses and tiled inference (:mod:`fastseg.models.fused`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, PositionEmbeddingSine, c2_xavier_fill, get_activation_fn
from .criterion import SetCriterion
from .fused import level_allowed, resize_mask_features
from .inference import (instance_inference, instance_inference_streaming, panoptic_inference,
                        panoptic_inference_streaming, semantic_inference, semantic_inference_streaming)
from .matcher import HungarianMatcher
from .pixel_decoder import MSDeformAttnPixelDecoder

__all__ = [
    "SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MultiScaleMaskedTransformerDecoder",
    "Mask2FormerDecoder", "Mask2Former", "build_mask2former_criterion", "as_feature_list",
    "semantic_inference_from_outputs",
]


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt2 = self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
            return tgt + self.dropout(tgt2)
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        return self.norm(tgt + self.dropout(tgt2))


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention layer. ``multihead_attn`` is an ``nn.MultiheadAttention`` (or a drop-in)."""

    def __init__(self, d_model, nhead, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            tgt2 = self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                                       attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
            return tgt + self.dropout(tgt2)
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        return self.norm(tgt + self.dropout(tgt2))


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        if self.normalize_before:
            tgt2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm(tgt)))))
            return tgt + self.dropout(tgt2)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(tgt2))


def _accepts_packed_mask(module: nn.Module) -> bool:
    """True for fastseg's MaskedCrossAttention (takes a PackedMask as attn_mask)."""
    if getattr(module, "accepts_packed_mask", False):
        return True
    try:
        from ..nn import MaskedCrossAttention
    except ImportError:
        return False
    return isinstance(module, MaskedCrossAttention)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's transformer decoder.

    forward(x, mask_features): x = 3 maps (B, in_channels, h_l, w_l) at strides 32, 16, 8 (round robin);
    mask_features (B, mask_dim, H/4, W/4). ``dec_layers`` decoder layers (official DEC_LAYERS − 1 = 9),
    plus the prediction from the learnable queries: ``dec_layers + 1`` predictions.

    Returns {"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H/4, W/4), "aux_outputs": [...]} or, fused,
    "pred_embeds" (B, Q, mask_dim) + "mask_features" instead of "pred_masks".
    """

    def __init__(self, in_channels: int = 256, mask_classification: bool = True, *, num_classes: int,
                 hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                 dec_layers: int = 9, pre_norm: bool = False, mask_dim: int = 256,
                 enforce_input_project: bool = False, fused: bool = False, packed_attn_masks: bool = False):
        super().__init__()
        assert mask_classification, "Only support mask classification model"
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0, normalize_before=pre_norm))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(nn.Conv2d(in_channels, hidden_dim, kernel_size=1))
                c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.fused = fused
        # reference path only: build the attention masks as the fused path does (from the embeddings and the
        # mask features resized once per level; bit-packed when the cross-attention is fastseg's kernel)
        # while still returning full (B, Q, H/4, W/4) mask logits. fastseg.patch() switches it on.
        self.packed_attn_masks = packed_attn_masks

    def forward(self, x: list[torch.Tensor], mask_features: torch.Tensor, mask=None) -> dict:
        assert len(x) == self.num_feature_levels
        del mask
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1).to(x[i].dtype))
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        # fused (or packed_attn_masks): mask features resized once per attention level, shared by every layer
        lean_masks = self.fused or self.packed_attn_masks
        level_feats = {} if lean_masks else None

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, size_list[0], level_feats)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            cross = self.transformer_cross_attention_layers[i]
            if lean_masks:
                attn_mask = self.fused_attention_mask(*attn_mask, cross.multihead_attn)
            else:
                attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = cross(output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None,
                           pos=pos[level_index], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, tgt_mask=None, tgt_key_padding_mask=None,
                                                               query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels], level_feats, need_mask=not last)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        assert len(predictions_class) == self.num_layers + 1
        key = "pred_embeds" if self.fused else "pred_masks"
        out = {"pred_logits": predictions_class[-1], key: predictions_mask[-1]}
        aux = [{"pred_logits": a, key: b} for a, b in zip(predictions_class[:-1], predictions_mask[:-1])]
        if self.fused:
            out["mask_features"] = mask_features
            for a in aux:
                a["mask_features"] = mask_features
        out["aux_outputs"] = aux
        return out

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size, level_feats=None,
                                 need_mask: bool = True):
        """Class logits, then (reference) mask logits + bool (B·heads, Q, h·w) attention mask (True = masked),
        or (fused) mask embeddings + (detached embeddings, mask features resized to the level) from which
        :meth:`fused_attention_mask` builds the next layer's mask; with ``packed_attn_masks`` (reference
        path) mask logits + that same (embeddings, level features) state."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        if level_feats is not None:
            state = None
            if need_mask:
                size = tuple(attn_mask_target_size)
                if size not in level_feats:
                    with torch.no_grad():
                        level_feats[size] = resize_mask_features(mask_features.detach(), size)
                state = (mask_embed.detach(), level_feats[size])
            if self.fused:
                return outputs_class, mask_embed, state
            return outputs_class, torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features), state
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5)
        return outputs_class, outputs_mask, attn_mask.bool().detach()

    def fused_attention_mask(self, mask_embed: torch.Tensor, level_features: torch.Tensor, attn_module: nn.Module):
        """The attention mask of one level from ``sign(e · F_level)`` (empty rows reset), in the form the
        cross-attention takes: for fastseg's MaskedCrossAttention a head-shared :class:`fastseg.ops.PackedMask`
        straight from the embeddings (``fastseg.ops.mask_from_embeddings``, no (B, Q, h·w) tensor); for
        ``nn.MultiheadAttention`` its bool (B·heads, Q, h·w), True = masked."""
        if _accepts_packed_mask(attn_module):
            from .. import ops
            if hasattr(ops, "mask_from_embeddings"):
                return ops.mask_from_embeddings(mask_embed, level_features)
            allowed = level_allowed(mask_embed, level_features)
            B, Q, L = allowed.shape
            return ops.pack_mask(allowed[:, None], batch=B, heads=self.num_heads, num_queries=Q, num_keys=L)
        allowed = level_allowed(mask_embed, level_features)
        B, Q, L = allowed.shape
        return (~allowed)[:, None].expand(B, self.num_heads, Q, L).reshape(B * self.num_heads, Q, L)


Mask2FormerDecoder = MultiScaleMaskedTransformerDecoder


def build_mask2former_criterion(num_classes: int, *, class_weight: float = 2.0, mask_weight: float = 5.0,
                                dice_weight: float = 5.0, no_object_weight: float = 0.1, dec_layers: int = 9,
                                deep_supervision: bool = True, train_num_points: int = 12544,
                                oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75) -> SetCriterion:
    """Mask2Former's matcher + criterion with the official defaults. ``criterion.weight_dict`` holds the
    weights of every loss key (aux keys ``_0`` … ``_{dec_layers−1}``)."""
    matcher = HungarianMatcher(cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight,
                               num_points=train_num_points)
    weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    if deep_supervision:
        aux = {}
        for i in range(dec_layers):
            aux.update({k + f"_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux)
    return SetCriterion(num_classes, matcher=matcher, weight_dict=weight_dict, eos_coef=no_object_weight,
                        losses=["labels", "masks"], num_points=train_num_points, oversample_ratio=oversample_ratio,
                        importance_sample_ratio=importance_sample_ratio)


def as_feature_list(features) -> list[torch.Tensor]:
    """A backbone's output (list/tuple, or dict in stride order) as a list ordered by increasing stride."""
    if isinstance(features, dict):
        features = list(features.values())
    features = list(features)
    return sorted(features, key=lambda f: -f.shape[-1])  # stable: larger maps (smaller strides) first


def infer_channels(backbone: nn.Module, size: int = 128) -> list[int]:
    """Channels of a backbone's features: its ``out_channels`` attribute, else one dummy forward."""
    ch = getattr(backbone, "out_channels", None)
    if ch is not None:
        return list(ch)
    p = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feats = as_feature_list(backbone(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)))
    backbone.train(was_training)
    return [f.shape[1] for f in feats]


def _post_sizes(n: int, image_sizes, output_sizes) -> list:
    """Per image None, or (image_size, output_size) for detectron2's ``sem_seg_postprocess``."""
    if image_sizes is None:
        if output_sizes is not None:
            raise ValueError("output_sizes needs image_sizes (the unpadded size of each image)")
        return [None] * n
    output_sizes = output_sizes or image_sizes
    if len(image_sizes) != n or len(output_sizes) != n:
        raise ValueError(f"image_sizes / output_sizes need one (h, w) per image ({n})")
    return [(tuple(i), tuple(o)) for i, o in zip(image_sizes, output_sizes)]


def _sem_seg_postprocess(x: torch.Tensor, image_size, output_size) -> torch.Tensor:
    """detectron2's ``sem_seg_postprocess``: (N, H, W) cropped to ``image_size``, resized (bilinear) to
    ``output_size``."""
    (ih, iw), o = image_size, output_size
    return F.interpolate(x[None, :, :ih, :iw], size=tuple(o), mode="bilinear", align_corners=False)[0]


def _per_image(outputs, size, ref_fn, stream_fn, tile_rows=None, image_sizes=None, output_sizes=None, **kw):
    """Inference per image. With ``image_sizes`` (and ``output_sizes``, default the image sizes) the masks are
    cropped to each image and resized to its output size *before* inference, as the official panoptic and
    instance inference do (``sem_seg_postprocess_before_inference``)."""
    results = []
    post = _post_sizes(len(outputs["pred_logits"]), image_sizes, output_sizes)
    if "pred_masks" in outputs:
        masks = F.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)
        for cls, m, pp in zip(outputs["pred_logits"], masks, post):
            results.append(ref_fn(cls, m if pp is None else _sem_seg_postprocess(m, *pp), **kw))
    else:
        for cls, e, feats, pp in zip(outputs["pred_logits"], outputs["pred_embeds"], outputs["mask_features"], post):
            extra = {} if pp is None else {"post": pp}
            results.append(stream_fn(cls, e, feats, size, tile_rows=tile_rows, **extra, **kw))
    return results


@torch.no_grad()
def semantic_inference_from_outputs(outputs: dict, size: tuple[int, int], tile_rows: int | None = None) -> list:
    """Per image (K, H, W) semantic scores at ``size`` from decoder outputs of either path: reference outputs
    (``pred_masks``) are upsampled to ``size`` then combined, as the official code; fused outputs
    (``pred_embeds`` + ``mask_features``) are streamed ``tile_rows`` output rows at a time (no Q × H × W)."""
    return _per_image(outputs, size, semantic_inference, semantic_inference_streaming, tile_rows)


class Mask2Former(nn.Module):
    """Backbone (any module returning 4 feature maps at strides 4, 8, 16, 32) + pixel decoder + decoder.

    ``forward(images)`` -> decoder outputs; ``forward(images, targets)`` -> weighted losses (training).
    targets: per image {"labels": (T,) int64, "masks": (T, H, W)} at the image size.
    Inference: :meth:`semantic_inference`, :meth:`panoptic_inference`, :meth:`instance_inference`.
    Images are expected normalised (the official model subtracts the pixel mean and divides by the std).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: list[int] | None = None,
                 strides=(4, 8, 16, 32), *, hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, pre_norm: bool = False, mask_dim: int = 256,
                 conv_dim: int = 256, enforce_input_project: bool = False, norm: str = "GN", enc_layers: int = 6,
                 enc_nheads: int = 8, enc_dim_feedforward: int = 1024, enc_dropout: float = 0.0,
                 enc_n_points: int = 4, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1, deep_supervision: bool = True,
                 train_num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, test_topk_per_image: int = 100,
                 thing_ids=(), fused: bool = False):
        super().__init__()
        self.backbone = backbone
        if in_channels is None:
            in_channels = infer_channels(backbone)
        self.num_classes = num_classes
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, strides, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm, transformer_dropout=enc_dropout,
            transformer_nheads=enc_nheads, transformer_dim_feedforward=enc_dim_feedforward,
            transformer_enc_layers=enc_layers, enc_n_points=enc_n_points)
        self.predictor = MultiScaleMaskedTransformerDecoder(
            conv_dim, num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries, nheads=nheads,
            dim_feedforward=dim_feedforward, dec_layers=dec_layers, pre_norm=pre_norm, mask_dim=mask_dim,
            enforce_input_project=enforce_input_project, fused=fused)
        self.criterion = build_mask2former_criterion(
            num_classes, class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
            no_object_weight=no_object_weight, dec_layers=dec_layers, deep_supervision=deep_supervision,
            train_num_points=train_num_points, oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio)
        self.deep_supervision = deep_supervision
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.test_topk_per_image = test_topk_per_image
        self.thing_ids = tuple(thing_ids)

    @property
    def fused(self) -> bool:
        return self.predictor.fused

    def set_fused(self, fused: bool = True, pixel_decoder: bool | None = None) -> "Mask2Former":
        """Switch between the reference and the memory-lean path (same parameters). ``pixel_decoder`` (if not
        None) also switches the encoder's deformable attention to the fused op
        (:meth:`MSDeformAttnPixelDecoder.set_fused`; equal up to rounding, so not bit for bit)."""
        self.predictor.fused = bool(fused)
        if pixel_decoder is not None:
            self.pixel_decoder.set_fused(pixel_decoder)
        return self

    def forward_features(self, images: torch.Tensor) -> dict:
        features = as_feature_list(self.backbone(images))
        mask_features, multi_scale_features = self.pixel_decoder(features)
        outputs = self.predictor(multi_scale_features, mask_features)
        if not self.deep_supervision:
            outputs.pop("aux_outputs", None)
        return outputs

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        outputs = self.forward_features(images)
        if targets is None:
            return outputs
        return self.losses(outputs, targets)

    def losses(self, outputs: dict, targets: list[dict]) -> dict:
        """Weighted losses (keys not in ``weight_dict`` dropped), as the official model returns them."""
        losses = self.criterion(outputs, targets)
        return {k: v * self.criterion.weight_dict[k] for k, v in losses.items() if k in self.criterion.weight_dict}

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def semantic_inference(self, outputs: dict, size: tuple[int, int], tile_rows: int | None = None,
                           image_sizes: list | None = None, output_sizes: list | None = None) -> list:
        """Per image (K, H, W) class scores at ``size`` (the padded input size). Fused outputs are upsampled
        ``tile_rows`` output rows at a time (default: about 2**24 values per tile). With ``image_sizes`` and
        ``output_sizes`` (per image (h, w)), each result is cropped to its image and resized bilinearly to its
        output size, as detectron2's ``sem_seg_postprocess``."""
        post = _post_sizes(len(outputs["pred_logits"]), image_sizes, output_sizes)
        results = semantic_inference_from_outputs(outputs, size, tile_rows)
        return [r if pp is None else _sem_seg_postprocess(r, *pp) for r, pp in zip(results, post)]

    @torch.no_grad()
    def panoptic_inference(self, outputs: dict, size: tuple[int, int], tile_rows: int | None = None,
                           image_sizes: list | None = None, output_sizes: list | None = None) -> list:
        """Per image (panoptic_seg (H, W) int32, segments_info), at ``size`` (the padded input size), or, with
        ``image_sizes`` / ``output_sizes``, on masks cropped to each image and resized to its output size before
        inference, as the official model (detectron2's ``sem_seg_postprocess``)."""
        return _per_image(outputs, size, panoptic_inference, panoptic_inference_streaming, tile_rows,
                          image_sizes=image_sizes, output_sizes=output_sizes,
                          num_classes=self.num_classes, thing_ids=self.thing_ids,
                          object_mask_threshold=self.object_mask_threshold,
                          overlap_threshold=self.overlap_threshold)

    @torch.no_grad()
    def instance_inference(self, outputs: dict, size: tuple[int, int], panoptic_on: bool = False,
                           tile_rows: int | None = None, image_sizes: list | None = None,
                           output_sizes: list | None = None) -> list:
        """Per image {"pred_masks", "scores", "pred_classes"}; ``image_sizes`` / ``output_sizes`` as in
        :meth:`panoptic_inference`."""
        return _per_image(outputs, size, instance_inference, instance_inference_streaming, tile_rows,
                          image_sizes=image_sizes, output_sizes=output_sizes,
                          num_classes=self.num_classes, test_topk_per_image=self.test_topk_per_image,
                          thing_ids=self.thing_ids if panoptic_on else None)


def build_mask2former(backbone="tiny", num_classes: int = 150, *, backbone_kwargs: dict | None = None,
                      **kwargs) -> Mask2Former:
    """Mask2Former with a named backbone ("tiny", "mscan_t", "mscan_s", "mscan_b", "mscan_l", "coc_tiny", ...;
    looked up lazily in :mod:`fastseg.models`) or a module. kwargs go to :class:`Mask2Former`
    (official defaults: hidden 256, 100 queries, 9 decoder layers, 6 deformable encoder layers)."""
    from .backbones import backbone_from_name

    channels = kwargs.pop("in_channels", None)
    if isinstance(backbone, str):
        backbone, known = backbone_from_name(backbone, **(backbone_kwargs or {}))
        channels = channels or known
    return Mask2Former(backbone, num_classes, in_channels=channels, **kwargs)
