"""Pixel decoders: Mask2Former's multi-scale deformable-attention encoder + FPN, and MaskFormer's FPN.

Plain PyTorch. Multi-scale deformable attention is Deformable DETR's ``ms_deform_attn_core_pytorch``
(bilinear ``grid_sample`` per level, zero padding, ``align_corners=False``).
Features are given as a list ordered by increasing stride (e.g. strides 4, 8, 16, 32).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ms_deform_attn import ms_deform_attn_from_offsets
from ..reference.ms_deform_attn import ReferenceMSDeformAttn, ms_deform_attn_core_pytorch
from .common import ConvNormAct, PositionEmbeddingSine, c2_xavier_fill, get_activation_fn

__all__ = [
    "ms_deform_attn", "MSDeformAttn", "MSDeformAttnEncoderLayer", "MSDeformAttnTransformerEncoder",
    "MSDeformAttnEncoder", "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder", "BasePixelDecoder",
]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core (the official ``ms_deform_attn_core_pytorch``,
    :func:`fastseg.reference.ms_deform_attn.ms_deform_attn_core_pytorch`).

    value: (N, S, M, D) with S = Σ H_l·W_l; sampling_locations: (N, Lq, M, L, P, 2) in [0, 1] as (x, y);
    attention_weights: (N, Lq, M, L, P). Returns (N, Lq, M·D).
    """
    return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention module (same parameters and init).

    ``fused`` (attribute, default False; see :meth:`MSDeformAttnPixelDecoder.set_fused`): run softmax, location
    arithmetic and sampling as :func:`fastseg.ops.ms_deform_attn_from_offsets` (Triton forward/backward; no
    locations, weights or (N, Lq, M, L, P, D) samples in memory) instead of the ``grid_sample`` path. Same
    parameters, same function up to rounding (and the official CUDA op's convention at h = -1 exactly).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        self.im2col_step = 64
        self.fused = False
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    _reset_parameters = ReferenceMSDeformAttn._reset_parameters  # the official init, one copy

    def forward(self, query, reference_points, input_flatten, spatial_shapes, input_padding_mask=None):
        """query: (N, Lq, C); reference_points: (N, Lq, L, 2) in [0, 1]; input_flatten: (N, S, C);
        spatial_shapes: list of (H_l, W_l); input_padding_mask: (N, S) bool or None. Returns (N, Lq, C)."""
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        assert sum(h * w for h, w in spatial_shapes) == Len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        if reference_points.shape[-1] != 2:
            raise ValueError(f"reference_points must end in 2, got {reference_points.shape[-1]}")
        if self.fused:  # softmax + location arithmetic + sampling in the kernels
            logits = attention_weights.view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
            output = ms_deform_attn_from_offsets(value, spatial_shapes, None, reference_points, sampling_offsets,
                                                 logits)
            return self.output_proj(output)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        shapes = torch.as_tensor(spatial_shapes, dtype=query.dtype, device=query.device)
        offset_normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        sampling_locations = (reference_points[:, :, None, :, None, :]
                              + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        output = ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)


class MSDeformAttnEncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnTransformerEncoder(nn.Module):
    """The stack of encoder layers (official ``MSDeformAttnTransformerEncoder``: ``layers.N.*``)."""

    def __init__(self, encoder_layer: MSDeformAttnEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, device, dtype):
        refs = []
        for H_, W_ in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_, dtype=dtype, device=device),
                                          torch.linspace(0.5, W_ - 0.5, W_, dtype=dtype, device=device),
                                          indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1)[None] / W_, ref_y.reshape(-1)[None] / H_), -1))
        reference_points = torch.cat(refs, 1)  # (1, S, 2); valid ratios are 1 (no padding)
        return reference_points[:, :, None].expand(-1, -1, len(spatial_shapes), -1)

    def forward(self, src, spatial_shapes, pos):
        """src, pos: (B, S, C); spatial_shapes: list of (H_l, W_l). Returns (B, S, C)."""
        reference_points = self.get_reference_points(spatial_shapes, src.device, src.dtype)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes)
        return output


class MSDeformAttnEncoder(nn.Module):
    """Deformable DETR's encoder only (official ``MSDeformAttnTransformerEncoderOnly``), without padding masks.

    Parameters as the official module: ``level_embed`` (num_feature_levels, d_model) and ``encoder.layers.N.*``.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 activation="relu", num_feature_levels=4, enc_n_points=4):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        layer = MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                         nhead, enc_n_points)
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder layers (``self.encoder.layers``)."""
        return self.encoder.layers

    get_reference_points = staticmethod(MSDeformAttnTransformerEncoder.get_reference_points)

    def forward(self, srcs, pos_embeds):
        """srcs, pos_embeds: lists of (B, C, H_l, W_l). Returns (B, S, C) memory and the spatial shapes."""
        src_flatten, lvl_pos_flatten, spatial_shapes = [], [], []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            spatial_shapes.append((src.shape[2], src.shape[3]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            lvl_pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        lvl_pos_flatten = torch.cat(lvl_pos_flatten, 1)
        return self.encoder(src_flatten, spatial_shapes, lvl_pos_flatten), spatial_shapes


MSDeformAttnTransformerEncoderOnly = MSDeformAttnEncoder


def _add_fpn_level(parent: nn.Module, idx: int, in_channels: int, conv_dim: int, norm: str):
    """One FPN level as both official pixel decoders build it: a 1×1 lateral ``ConvNormAct`` (in_channels ->
    conv_dim) and a 3×3 output one (+ ReLU), created in that order, both c2-xavier-filled and registered on
    ``parent`` as ``adapter_{idx + 1}`` / ``layer_{idx + 1}`` (the official state_dict names). Returns them."""
    use_bias = norm == ""
    lateral = ConvNormAct(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=norm)
    output = ConvNormAct(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias, norm=norm,
                         activation=F.relu)
    c2_xavier_fill(lateral)
    c2_xavier_fill(output)
    parent.add_module(f"adapter_{idx + 1}", lateral)
    parent.add_module(f"layer_{idx + 1}", output)
    return lateral, output


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder.

    in_channels / strides: of the backbone features (increasing stride, e.g. [4, 8, 16, 32]). The deformable
    encoder runs on the ``transformer_in_features`` indices (default: the three coarsest), then an FPN adds
    levels down to ``common_stride``. forward(features list) -> (mask_features (B, mask_dim, H/4, W/4),
    multi_scale_features: 3 maps of ``conv_dim`` channels at strides 32, 16, 8).
    """

    def __init__(self, in_channels: list[int], strides: list[int] = (4, 8, 16, 32), *, conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", transformer_dropout: float = 0.0, transformer_nheads: int = 8,
                 transformer_dim_feedforward: int = 1024, transformer_enc_layers: int = 6,
                 transformer_in_features: list[int] | None = None, common_stride: int = 4, enc_n_points: int = 4):
        super().__init__()
        order = sorted(range(len(in_channels)), key=lambda i: strides[i])
        if list(order) != list(range(len(in_channels))):
            raise ValueError("features must be ordered by increasing stride")
        self.feature_strides = list(strides)
        self.feature_channels = list(in_channels)
        if transformer_in_features is None:
            transformer_in_features = list(range(len(in_channels)))[-3:]
        self.transformer_in_features = list(transformer_in_features)
        t_channels = [in_channels[i] for i in self.transformer_in_features]
        t_strides = [strides[i] for i in self.transformer_in_features]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        # from low resolution to high resolution
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(min(32, conv_dim), conv_dim))
            for c in t_channels[::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnEncoder(
            d_model=conv_dim, dropout=transformer_dropout, nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward, num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels, enc_n_points=enc_n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3  # always 3 scales for the decoder
        self.common_stride = common_stride
        self.num_fpn_levels = int(math.log2(min(t_strides)) - math.log2(common_stride))
        lateral_convs, output_convs = [], []
        for idx, c in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral, output = _add_fpn_level(self, idx, c, conv_dim, norm)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    def set_fused(self, fused: bool = True) -> "MSDeformAttnPixelDecoder":
        """Run the encoder's deformable attention on the fused op (``fused=True``) or on ``grid_sample``."""
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.fused = bool(fused)
        return self

    def forward(self, features: list[torch.Tensor]):
        # As the original (``@autocast(enabled=False)``, features ``.float()``): no autocast; the features are
        # cast to the parameters' dtype (float32 under autocast, float64 / bfloat16 for models converted so).
        dtype = self.mask_features.weight.dtype
        with torch.autocast(features[0].device.type, enabled=False):
            srcs, pos = [], []
            for idx, f in enumerate(self.transformer_in_features[::-1]):
                x = features[f].to(dtype)
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x).to(dtype))
            y, spatial_shapes = self.transformer(srcs, pos)
            bs = y.shape[0]
            y = torch.split(y, [h * w for h, w in spatial_shapes], dim=1)
            out = [z.transpose(1, 2).reshape(bs, -1, h, w) for z, (h, w) in zip(y, spatial_shapes)]
            for idx, f in enumerate(list(range(self.num_fpn_levels))[::-1]):
                x = features[f].to(dtype)
                cur_fpn = self.lateral_convs[idx](x)
                y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
                out.append(self.output_convs[idx](y))
            multi_scale_features = out[: self.maskformer_num_feature_levels]
            return self.mask_features(out[-1]), multi_scale_features


class BasePixelDecoder(nn.Module):
    """MaskFormer's FPN pixel decoder. forward(features list, increasing stride) ->
    (mask_features (B, mask_dim, H/4, W/4), None)."""

    def __init__(self, in_channels: list[int], *, conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN"):
        super().__init__()
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        n = len(in_channels)
        for idx, c in enumerate(in_channels):
            if idx == n - 1:
                output = ConvNormAct(c, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias, norm=norm,
                                     activation=F.relu)
                c2_xavier_fill(output)
                self.add_module(f"layer_{idx + 1}", output)
                lateral_convs.append(None)
                output_convs.append(output)
            else:
                lateral, output = _add_fpn_level(self, idx, c, conv_dim, norm)
                lateral_convs.append(lateral)
                output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: list[torch.Tensor]):
        y = None
        for idx, x in enumerate(features[::-1]):
            lateral, output = self.lateral_convs[idx], self.output_convs[idx]
            if lateral is None:
                y = output(x)
            else:
                cur_fpn = lateral(x)
                y = output(cur_fpn + F.interpolate(y, size=cur_fpn.shape[-2:], mode="nearest"))
        return self.mask_features(y), None
