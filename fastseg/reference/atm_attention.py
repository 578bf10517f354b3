"""SegViT's Attention-to-Mask cross-attention, exactly as the official ``Attention`` (zbwxp/SegVit,
``decode_heads/atm_head.py``): separate ``q`` / ``k`` / ``v`` / ``proj`` linears, and besides the attention output
it returns the head-averaged *pre-softmax* scaled similarities, which the ATM head uses as mask logits.

Readable on purpose: it materialises the (B, heads, Nq, Nk) scores, as the original does. fastseg's fused ATM
attention is tested against it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATMAttention", "atm_attention"]


def atm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  keep: torch.Tensor | None = None, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Core ATM attention.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D). Returns ``(out, logits)``: out (B, H, Nq, D) =
    ``dropout(softmax(q kᵀ · scale)) v`` and logits (B, Nq, Nk) = the mean over heads of ``q kᵀ · scale``
    (before the softmax and the dropout). ``keep``: optional bool keep mask broadcastable to (B, H, Nq, Nk)
    (``F.dropout``'s semantics with a given mask: kept probabilities scaled by 1 / (1 − dropout_p)).
    """
    attn = (q @ k.transpose(-2, -1)) * scale
    logits = attn.sum(dim=1) / q.shape[1]
    p = attn.softmax(dim=-1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, logits


class ATMAttention(nn.Module):
    """The official SegViT ``Attention`` (same constructor, parameter names and forward).

    ``forward(xq, xk, xv)``: xq (B, Nq, C), xk / xv (B, Nk, C), batch first. Returns ``(x, attn)`` with
    x (Nq, B, C) — sequence first, as the original's ``x.transpose(0, 1)`` — and attn (B, Nq, Nk), the
    head mean of the scaled pre-softmax similarities. Attention dropout ``attn_drop`` acts on the softmax
    only; ``proj_drop`` on the output.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5  # the original's `or`: qk_scale=0 means the default
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Nq, C = xq.shape
        Nk, Nv = xk.shape[1], xv.shape[1]
        h = self.num_heads
        q = self.q(xq).reshape(B, Nq, h, C // h).permute(0, 2, 1, 3)
        k = self.k(xk).reshape(B, Nk, h, C // h).permute(0, 2, 1, 3)
        v = self.v(xv).reshape(B, Nv, h, C // h).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        logits = attn.sum(dim=1) / h
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, Nq, C)
        x = self.proj_drop(self.proj(x))
        return x.transpose(0, 1), logits
