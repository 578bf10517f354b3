"""Multi-scale deformable attention in plain PyTorch, as Deformable DETR / Mask2Former publish it.

* :func:`ms_deform_attn_core_pytorch`: the official ``ms_deform_attn_core_pytorch`` (one bilinear
  ``grid_sample`` per level, zero padding, ``align_corners=False``); it materialises the samples of every level
  and point, (N·M, D, Lq, L·P).
* :class:`ReferenceMSDeformAttn`: the official ``MSDeformAttn`` module (``ops/modules/ms_deform_attn.py``):
  same parameters, init and forward signature, running the core above.

Shapes: value (N, S, M, D), S = Σ_l H_l·W_l; sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1];
attention_weights (N, Lq, M, L, P); output (N, Lq, M·D).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ms_deform_attn_core_pytorch", "ReferenceMSDeformAttn", "sampling_locations_from"]


def ms_deform_attn_core_pytorch(value: torch.Tensor, value_spatial_shapes, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor) -> torch.Tensor:
    """The official PyTorch core. value_spatial_shapes: (L, 2) tensor or list of (H, W)."""
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    value_list = value.split([H_ * W_ for H_, W_ in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(shapes):
        # (N, H·W, M, D) -> (N·M, D, H, W)
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        # (N, Lq, M, P, 2) -> (N·M, Lq, P, 2)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear",
                                                 padding_mode="zeros", align_corners=False))
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


def sampling_locations_from(reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
                            input_spatial_shapes: torch.Tensor, n_points: int) -> torch.Tensor:
    """The official location arithmetic. reference_points (N, Lq, L, 2) in [0, 1], or (N, Lq, L, 4) boxes
    (cx, cy, w, h); sampling_offsets (N, Lq, M, L, P, 2) in pixels of each level (2 coords) or box units (4)."""
    if reference_points.shape[-1] == 2:
        offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        return (reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
    if reference_points.shape[-1] == 4:
        return (reference_points[:, :, None, :, None, :2]
                + sampling_offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
    raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead.")


class ReferenceMSDeformAttn(nn.Module):
    """The official ``MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)``.

    forward(query (N, Lq, C), reference_points (N, Lq, L, 2|4), input_flatten (N, S, C),
    input_spatial_shapes (L, 2) long, input_level_start_index (L,) long, input_padding_mask (N, S) bool or None)
    -> (N, Lq, C).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        d_per_head = d_model // n_heads
        if d_per_head & (d_per_head - 1):
            warnings.warn("You'd better set d_model in MSDeformAttn to make the dimension of each attention head "
                          "a power of 2 which is more efficient in our CUDA implementation.")
        self.im2col_step = 128
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def _project(self, query, input_flatten, input_padding_mask, softmax: bool = True):
        """value (N, S, M, D), sampling offsets (N, Lq, M, L, P, 2), softmaxed weights (N, Lq, M, L, P) (or,
        ``softmax=False``, the logits)."""
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        if softmax:
            attention_weights = F.softmax(attention_weights, -1)
        attention_weights = attention_weights.view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        return value, sampling_offsets, attention_weights

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        assert (input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum() == input_flatten.shape[1]
        value, offsets, attention_weights = self._project(query, input_flatten, input_padding_mask)
        locs = sampling_locations_from(reference_points, offsets, input_spatial_shapes, self.n_points)
        output = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locs, attention_weights)
        return self.output_proj(output)
