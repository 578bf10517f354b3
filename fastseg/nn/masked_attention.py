"""``MaskedCrossAttention``: a drop-in for ``nn.MultiheadAttention`` backed by fastseg's fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_attention import PackedMask, masked_attention

__all__ = ["MaskedCrossAttention"]


def _as_bool_mask(mask: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks as bool, True = masked out. Float masks must be 0 / -inf."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{what} must be bool or float, got {mask.dtype}")
    neg_inf = torch.isneginf(mask)
    valid = ((mask == 0) | neg_inf).all()
    msg = (f"{what}: the fused kernel takes boolean masks (or float masks of 0 and -inf only); a general "
           "additive float mask is not supported - use fastseg.reference.ReferenceMaskedCrossAttention")
    if mask.device.type == "cuda":  # checked on the device: no device-to-host sync (fails as a device assert)
        torch._assert_async(valid, msg)
    elif not bool(valid):
        raise NotImplementedError(msg)
    return neg_inf


class MaskedCrossAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the same constructor, parameters and state_dict, computed by
    fastseg's fused masked-attention kernel (no (B·heads, Q, L) score matrix in memory; weights only on request).

    Forward takes ``nn.MultiheadAttention``'s arguments, positionally or by keyword, and returns
    ``(output, weights)`` like it:

    * ``need_weights`` (default: :attr:`need_weights_default`, True as in ``nn.MultiheadAttention``): the
      attention weights (after dropout), averaged over heads (B, Q, L) or per head (B, heads, Q, L) per
      ``average_attn_weights``, recomputed by a kernel from the forward's row statistics. With
      ``need_weights=False`` the result is ``(output, None)`` and nothing of size Q·L is built; pass it (or
      set ``need_weights_default = False``, as :func:`fastseg.patch` does where the caller discards the
      weights) to keep the fast path. The weights are differentiable (gradients flow to query and key).
    * Attention dropout (``dropout`` > 0, training mode) is fused: the keep mask comes from a Philox stream
      keyed by a seed drawn from torch's generator per call (:func:`fastseg.ops.dropout_seed`), is
      regenerated in backward and never stored; a different random stream from ``nn.MultiheadAttention``'s,
      same distribution (drop probability ``dropout``, kept weights scaled by 1 / (1 − dropout)).
    * A query whose every key is masked outputs ``out_proj.bias`` (zero attention, zero weights) instead of
      NaN.
    * Not supported (raise): ``add_bias_kv``, ``add_zero_attn``, general additive float masks (float masks
      of 0 / -inf are fine), ``dropout=1`` in training.
    * ``attn_mask`` may also be a :class:`fastseg.ops.PackedMask` (True bits = allowed), e.g. produced
      directly from mask embeddings, so no bool (B·heads, Q, L) tensor is ever built.
    """

    #: what ``need_weights=None`` (the default) means for this instance.
    need_weights_default: bool = True

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MaskedCrossAttention does not support add_bias_kv or add_zero_attn")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "MaskedCrossAttention":
        """A copy of ``mha`` (weights, device, dtype, train/eval mode) as a MaskedCrossAttention."""
        weight = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(mha.state_dict())
        return new.train(mha.training)

    def _projections(self):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is None:
            return (w_q, None), (w_k, None), (w_v, None)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return (w_q, b_q), (w_k, b_k), (w_v, b_v)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=None, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """query: (Q, B, E) or (B, Q, E) if batch_first (or unbatched (Q, E)); key: (L, B, kdim);
        value: (L, B, vdim). attn_mask: bool (Q, L) or (B·heads, Q, L), True = masked out, or a
        PackedMask. key_padding_mask: bool (B, L), True = ignore. Returns (output like query, weights or
        None): weights (B, Q, L), or (B, heads, Q, L) without averaging (unbatched: no B), in query's dtype."""
        if need_weights is None:
            need_weights = self.need_weights_default
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p >= 1.0:
            raise NotImplementedError("dropout=1.0 in training (every weight dropped) is not supported")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 3-D (batched) or 2-D (unbatched); got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        unbatched = query.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        if unbatched:
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            B, M, E = query.shape
            L = key.shape[1]
        else:
            M, B, E = query.shape
            L = key.shape[0]
        if E != self.embed_dim:
            raise ValueError(f"query's embedding dim {E} != embed_dim {self.embed_dim}")
        if key.shape[batch_dim] != B or value.shape[batch_dim] != B or value.shape[1 - batch_dim] != L:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit query "
                             f"{tuple(query.shape)} (batch_first={self.batch_first})")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value feature dims {key.shape[-1]}/{value.shape[-1]} != kdim/vdim "
                             f"{self.kdim}/{self.vdim}")
        H, D = self.num_heads, self.head_dim
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
        # (.., E) -> (B, H, S, D) as strided views, no copies
        if self.batch_first:
            heads = lambda x: x.unflatten(-1, (H, D)).permute(0, 2, 1, 3)  # noqa: E731
        else:
            heads = lambda x: x.unflatten(-1, (H, D)).permute(1, 2, 0, 3)  # noqa: E731
        q = heads(F.linear(query, w_q, b_q))
        k = heads(F.linear(key, w_k, b_k))
        v = heads(F.linear(value, w_v, b_v))
        if not isinstance(attn_mask, PackedMask):
            attn_mask = _as_bool_mask(attn_mask, "attn_mask")
        key_padding_mask = _as_bool_mask(key_padding_mask, "key_padding_mask")
        out = masked_attention(q, k, v, attn_mask, key_padding_mask, masked=True, dropout_p=dropout_p,
                               return_weights=bool(need_weights), average_weights=bool(average_attn_weights))
        weights = None
        if need_weights:
            out, weights = out  # (B, H, M, D), (B, M, L) or (B, H, M, L)
            if unbatched:
                weights = weights.squeeze(0)
        out = out.permute(0, 2, 1, 3) if self.batch_first else out.permute(2, 0, 1, 3)
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(batch_dim)
        return out, weights
