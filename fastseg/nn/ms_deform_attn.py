"""Drop-in multi-scale deformable attention modules running the fused Triton op.

* :class:`MSDeformAttn`: the official Deformable DETR / Mask2Former ``MSDeformAttn`` (same constructor,
  parameters, init, state_dict and forward signature).
* :class:`MSDeformAttnHF`: Hugging Face's ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention``
  (constructor ``(embed_dim, num_heads, n_levels, n_points)``, keyword call convention, returns
  ``(output, attention_weights)``); same state_dict.

The projections run in PyTorch. With 2-coordinate reference points the softmax over L·P, the location
arithmetic ``ref + offset / (W, H)``, the sampling, weighting and sum (and their backward) are one kernel each way
(:func:`fastseg.ops.ms_deform_attn_from_offsets`): neither the sampling locations, the weights nor the
(N, Lq, M, L, P, D) samples are written. 4-coordinate (box) reference points: softmax and locations in
PyTorch, then :func:`fastseg.ops.ms_deform_attn`.
"""
from __future__ import annotations

import torch

from ..ops.ms_deform_attn import level_start_index_of, ms_deform_attn, ms_deform_attn_from_offsets, shapes_tensor
from ..reference.ms_deform_attn import ReferenceMSDeformAttn, sampling_locations_from

__all__ = ["MSDeformAttn", "MSDeformAttnHF"]


def _check_inputs(mod, query, reference_points, input_flatten, n_shapes):
    if query.dim() != 3 or input_flatten.dim() != 3 or query.shape[-1] != mod.d_model \
            or input_flatten.shape[-1] != mod.d_model:
        raise ValueError(f"{type(mod).__name__}(d_model={mod.d_model}): query {tuple(query.shape)} and input "
                         f"{tuple(input_flatten.shape)} must be (N, L, {mod.d_model})")
    if n_shapes != mod.n_levels:
        raise ValueError(f"{type(mod).__name__}(n_levels={mod.n_levels}) got {n_shapes} spatial shapes")
    if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (query.shape[0], query.shape[1],
                                                                              mod.n_levels):
        raise ValueError(f"{type(mod).__name__}: reference_points {tuple(reference_points.shape)} must be "
                         f"(N, Lq, {mod.n_levels}, 2 or 4) for query {tuple(query.shape)}")


class MSDeformAttn(ReferenceMSDeformAttn):
    """``MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)``, the official module on the fused op.

    forward(query (N, Lq, C), reference_points (N, Lq, L, 2) in [0, 1] or (N, Lq, L, 4) boxes,
    input_flatten (N, S, C), input_spatial_shapes (L, 2) long tensor (or list of (H, W)),
    input_level_start_index (L,) long tensor (or None), input_padding_mask (N, S) bool, True = padding)
    -> (N, Lq, C). fp32/fp16/bf16.
    """

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index=None,
                input_padding_mask=None):
        _check_inputs(self, query, reference_points, input_flatten, len(input_spatial_shapes))
        shapes = shapes_tensor(input_spatial_shapes, query.device)
        output, _ = self._core(query, reference_points, input_flatten, shapes, input_level_start_index,
                               input_padding_mask, False)
        return self.output_proj(output)

    def _core(self, query, reference_points, input_flatten, shapes, level_start_index, padding_mask,
              need_weights: bool):
        """(N, Lq, M·D) before output_proj, and the softmaxed weights if ``need_weights`` (else None)."""
        fused = reference_points.shape[-1] == 2
        value, offsets, weights = self._project(query, input_flatten, padding_mask, softmax=not fused)
        if fused:
            output = ms_deform_attn_from_offsets(value, shapes, level_start_index, reference_points, offsets, weights)
            if need_weights:
                weights = weights.flatten(3).softmax(-1).view(weights.shape)
            return output, weights if need_weights else None
        locs = sampling_locations_from(reference_points, offsets, shapes, self.n_points)
        return ms_deform_attn(value, shapes, level_start_index, locs, weights), weights

    @classmethod
    def from_module(cls, m: torch.nn.Module) -> "MSDeformAttn":
        """Same-layout copy (weights, device, dtype, requires_grad, train/eval) of an official-style module."""
        new = cls(*cls._ctor_args(m))
        ref = m.value_proj.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(m.state_dict(), strict=True)
        flags = dict(m.named_parameters())
        for n, p in new.named_parameters():
            p.requires_grad_(flags[n].requires_grad)
        return new.train(m.training)

    @staticmethod
    def _ctor_args(m):
        return m.d_model, m.n_levels, m.n_heads, m.n_points


class MSDeformAttnHF(MSDeformAttn):
    """Hugging Face's ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed_dim, num_heads,
    n_levels, n_points)`` on the fused op: same parameters and state_dict, same keyword call, returns
    ``(output (N, Lq, C), attention_weights (N, Lq, M, L, P))``. Also OneFormer's
    ``OneFormerPixelDecoderEncoderMultiscaleDeformableAttention`` (same module; its caller passes the shapes as a
    tensor ``spatial_shapes`` besides ``spatial_shapes_list``: the list is used, the tensor only when there is no
    list — ``.tolist()``, a host sync on CUDA)."""

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int):
        super().__init__(embed_dim, n_levels, num_heads, n_points)

    def with_pos_embed(self, tensor, position_embeddings):
        return tensor if position_embeddings is None else tensor + position_embeddings

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes_list=None, level_start_index=None,
                output_attentions: bool = False, spatial_shapes=None):
        if spatial_shapes_list is None:
            if spatial_shapes is None:
                raise ValueError("MSDeformAttnHF: pass spatial_shapes_list (or spatial_shapes)")
            spatial_shapes_list = [tuple(s) for s in spatial_shapes.tolist()]
        if position_embeddings is not None:
            hidden_states = self.with_pos_embed(hidden_states, position_embeddings)
        _check_inputs(self, hidden_states, reference_points, encoder_hidden_states, len(spatial_shapes_list))
        total = sum(int(h) * int(w) for h, w in spatial_shapes_list)
        if total != encoder_hidden_states.shape[1]:
            raise ValueError("Make sure to align the spatial shapes with the sequence length of the encoder hidden "
                             f"states ({total} != {encoder_hidden_states.shape[1]})")
        shapes = shapes_tensor(spatial_shapes_list, hidden_states.device)
        if level_start_index is None:
            level_start_index = level_start_index_of(shapes)
        # the softmaxed weights are returned as Hugging Face does (one extra softmax; the kernel fuses its own)
        output, weights = self._core(hidden_states, reference_points, encoder_hidden_states, shapes,
                                     level_start_index, attention_mask, True)
        return self.output_proj(output), weights

    @staticmethod
    def _ctor_args(m):
        return m.d_model, m.n_heads, m.n_levels, m.n_points
