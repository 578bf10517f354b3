"""``ATMAttention``: a drop-in for SegViT's ATM ``Attention`` (zbwxp/SegVit ``decode_heads/atm_head.py``)
backed by fastseg's fused ATM attention kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.atm_attention import atm_attention
from ..reference.atm_attention import ATMAttention as ReferenceATMAttention

__all__ = ["ATMAttention"]


class ATMAttention(ReferenceATMAttention):
    """SegViT's ``Attention`` (the reference, subclassed) with the same constructor, submodules (``q``, ``k``, ``v``, ``attn_drop``,
    ``proj``, ``proj_drop``), attributes (``num_heads``, ``scale``) and state_dict, computed by the fused ATM
    attention (:func:`fastseg.ops.atm_attention`): no (B, heads, Nq, Nk) scores or probabilities in memory.

    ``forward(xq, xk, xv)``: xq (B, Nq, C), xk / xv (B, Nk, C), batch first. Returns ``(x, attn)`` as the
    original: x (Nq, B, C), sequence first; attn (B, Nq, Nk), the head mean of the scaled pre-softmax
    similarities — here in fp32 (fp64 for fp64 inputs) whatever the input dtype (the original returns it in
    the compute dtype), accumulated over the heads inside the kernel. Attention dropout (``attn_drop.p`` in
    training) is fused: keep mask from a Philox stream keyed by a seed drawn from torch's generator per
    call, regenerated in backward (a different random stream from ``nn.Dropout``'s, same distribution);
    ``proj_drop`` is the ordinary ``nn.Dropout`` on the output.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    @classmethod
    def from_module(cls, m: nn.Module) -> "ATMAttention":
        """A copy of an official ``Attention`` ``m`` (weights, ``scale``, dropout rates, device, dtype,
        requires_grad and train/eval mode)."""
        from ..records import finish

        new = cls(m.q.in_features, m.num_heads, qkv_bias=m.q.bias is not None, qk_scale=float(m.scale),
                  attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p)
        return finish(new, m)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if xq.dim() != 3 or xk.dim() != 3 or xv.dim() != 3:
            raise ValueError(f"xq, xk, xv must be (B, N, C); got {xq.dim()}-D, {xk.dim()}-D, {xv.dim()}-D")
        B, Nq, C = xq.shape
        if xk.shape[0] != B or xv.shape[0] != B or xk.shape[1] != xv.shape[1]:
            raise ValueError(f"xk {tuple(xk.shape)} and xv {tuple(xv.shape)} do not fit xq {tuple(xq.shape)} "
                             "(same batch, and as many keys as values)")
        h = self.num_heads
        dropout_p = self.attn_drop.p if self.training else 0.0
        if dropout_p >= 1.0:
            raise NotImplementedError("attn_drop=1.0 in training (every weight dropped) is not supported")
        # (B, N, C) -> (B, h, N, C / h) as strided views, no copies
        q = self.q(xq).unflatten(-1, (h, C // h)).transpose(1, 2)
        k = self.k(xk).unflatten(-1, (h, C // h)).transpose(1, 2)
        v = self.v(xv).unflatten(-1, (h, C // h)).transpose(1, 2)
        x, logits = atm_attention(q, k, v, self.scale, dropout_p)
        x = self.proj_drop(F.linear(x.transpose(1, 2).reshape(B, Nq, C), self.proj.weight, self.proj.bias))
        return x.transpose(0, 1), logits
