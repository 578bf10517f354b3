"""Plain PyTorch masked multi-head cross-attention, with exactly ``nn.MultiheadAttention``'s semantics.

Readable on purpose: it materialises the (B, heads, Q, L) scores and probabilities, as eager Mask2Former
does. fastseg's kernels are tested against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_attention", "multi_head_attention", "ReferenceMaskedCrossAttention", "merge_masks"]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    empty_rows: str = "zero",
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Core attention ``dropout(softmax(q kᵀ · scale + bias, masked)) v``.

    q: (B, H, Q, D); k, v: (B, H, L, D). ``allowed``: bool broadcastable to (B, H, Q, L), True = may attend
    (the SDPA convention). ``bias``: float additive bias broadcastable to (B, H, Q, L).
    ``empty_rows``: what a query row with no allowed key gives: ``"zero"`` (fastseg's convention) or
    ``"nan"`` (what ``nn.MultiheadAttention`` gives). ``keep``: bool broadcastable to (B, H, Q, L), the
    attention-dropout keep mask: probabilities where it is False are zeroed, the others scaled by
    1 / (1 − dropout_p) (``F.dropout``'s semantics with a given mask). ``return_weights``: also return the
    (B, H, Q, L) probabilities after dropout (what ``nn.MultiheadAttention`` returns before head averaging).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if empty_rows == "zero":
        # A row whose every score is -inf has no allowed key: define its output as 0.
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = probs.masked_fill(empty, 0.0)
    elif empty_rows != "nan":
        raise ValueError(f"empty_rows must be 'zero' or 'nan', got {empty_rows!r}")
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs, v)
    return (out, probs) if return_weights else out


def merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    num_heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks as one additive float mask of shape (B, H, Q, L) (or None).

    attn_mask: (Q, L) or (B·H, Q, L), bool (True = masked out) or float (added to the scores).
    key_padding_mask: (B, L), bool (True = ignore that key) or float (added).
    """
    merged = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            am = attn_mask.view(1, 1, q_len, k_len)
        else:
            am = attn_mask.view(batch, num_heads, q_len, k_len)
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=dtype, device=am.device).masked_fill(am, float("-inf"))
        merged = am.to(dtype)
    if key_padding_mask is not None:
        kp = key_padding_mask.view(batch, 1, 1, k_len)
        if kp.dtype == torch.bool:
            kp = torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill(kp, float("-inf"))
        kp = kp.to(dtype)
        merged = kp if merged is None else merged + kp
    return merged


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    *,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    batch_first: bool = False,
    empty_rows: str = "nan",
) -> torch.Tensor:
    """Multi-head attention as ``nn.MultiheadAttention`` computes it (no dropout, no bias_k/v).

    query: (Q, B, E) or (B, Q, E) with ``batch_first``; key: (L, B, kdim); value: (L, B, vdim).
    Returns the output in the layout of ``query``.
    """
    if batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    q_len, batch, embed = query.shape
    k_len = key.shape[0]
    head_dim = embed // num_heads
    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)
    # (S, B, E) -> (B, H, S, Dh)
    q, k, v = (x.reshape(x.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
    bias = merge_masks(attn_mask, key_padding_mask, batch, num_heads, q_len, k_len, q.dtype)
    out = masked_attention(q, k, v, None, 1.0 / math.sqrt(head_dim), bias=bias, empty_rows=empty_rows)
    out = out.permute(2, 0, 1, 3).reshape(q_len, batch, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out.transpose(0, 1) if batch_first else out


class ReferenceMaskedCrossAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same constructor and state_dict) computed by :func:`multi_head_attention`.

    ``empty_rows="zero"`` makes a query with no allowed key output ``out_proj.bias`` (as fastseg's kernels
    do); the default ``"nan"`` reproduces ``nn.MultiheadAttention``.
    """

    def __init__(self, *args, empty_rows: str = "nan", **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("the reference covers add_bias_kv=False, add_zero_attn=False")
        self.empty_rows = empty_rows

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            raise NotImplementedError("the reference returns no attention weights")
        if self.training and self.dropout > 0:
            raise NotImplementedError("the reference has no attention dropout")
        out = multi_head_attention(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            batch_first=self.batch_first, empty_rows=self.empty_rows,
        )
        return out, None
