"""SegViT's Attention-to-Mask (ATM) attention as a differentiable op: the fused Triton kernels of
:mod:`fastseg.kernels.masked_attention` (``atm_forward`` / ``atm_backward``) behind an autograd Function and
``torch.library`` custom ops.

``atm_attention(q, k, v, scale)`` returns ``(out, logits)``: out = ``dropout(softmax(q kᵀ · scale)) v`` per
(batch, head) and logits = the mean over heads of the pre-softmax ``q kᵀ · scale`` (SegViT's mask logits),
without the (B, H, M, N) scores or probabilities in memory. Gradients flow from both outputs.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference.atm_attention import atm_attention as _reference
from .masked_attention import _check_qkv, dropout_seed as _draw_seed

__all__ = ["atm_attention"]

_OP = "atm_attention"


def _kernels():
    from ..kernels import masked_attention as k  # imported lazily: triton is optional off Linux

    return k


class _ATMAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seed, scale, dropout_p):
        o, lse, logits = _kernels().atm_forward(q, k, v, scale, seed, dropout_p)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.set_materialize_grads(False)  # a gradient from one output only: no zero-filled other one
        return o, logits

    @staticmethod
    def backward(ctx, do, dlogits):
        q, k, v, o, lse, seed = ctx.saved_tensors
        if do is None and dlogits is None:
            return None, None, None, None, None, None
        dq, dk, dv = _kernels().atm_backward(do, dlogits, q, k, v, o, lse, ctx.scale, seed, ctx.dropout_p)
        return dq, dk, dv, None, None, None


# torch.compile: the same kernels through custom ops (Dynamo traces them without a graph break).


@torch.library.custom_op("fastseg::atm_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None, scale: float,
            dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().atm_forward(q, k, v, scale, seed, dropout_p)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, seed, scale, dropout_p):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, M, _ = q.shape
    return (torch.empty_like(q), q.new_empty((B, H, M), dtype=acc), q.new_empty((B, M, k.shape[2]), dtype=acc))


@torch.library.custom_op("fastseg::atm_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor | None, dlogits: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor | None, scale: float,
            dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().atm_backward(do, dlogits, q, k, v, o, lse, scale, seed, dropout_p)


@_bwd_op.register_fake
def _bwd_fake(do, dlogits, q, k, v, o, lse, seed, scale, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, seed, scale, dropout_p = inputs
    o, lse, _ = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward(ctx, do, _dlse, dlogits):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, dlogits, q, k, v, o, lse, seed, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _torch_atm_attention(q, k, v, scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-PyTorch path. Without dropout nothing of size B·H·M·N is built by this function: out by
    ``F.scaled_dot_product_attention``, and the head-mean logits as one matmul over the concatenated heads
    (Σ_h q_h k_hᵀ = [q_1 … q_H] [k_1 … k_H]ᵀ), in the accumulation dtype. With dropout: the reference (per-head
    weights; PyTorch's own random stream, not the kernels' Philox one)."""
    B, H, M, D = q.shape
    N = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if dropout_p > 0:
        keep = torch.rand((B, H, M, N), device=q.device) >= dropout_p
        out, logits = _reference(q, k, v, scale, keep, dropout_p)
        return out, logits.to(acc)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    qc = q.transpose(1, 2).reshape(B, M, H * D).to(acc)
    kc = k.transpose(1, 2).reshape(B, N, H * D).to(acc)
    return out, torch.matmul(qc, kc.transpose(1, 2)) * (scale / H)


def atm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  dropout_p: float = 0.0, *, dropout_seed: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ATM attention. Differentiable in q, k, v through both outputs.

    q: (B, H, M, D); k, v: (B, H, N, D), fp16 / bf16 / fp32 (fp64 under the interpreter / on CPU); any
    strides with a contiguous last dimension (others are copied once). ``scale`` defaults to 1/√D.
    Returns ``(out, logits)``: out (B, H, M, D) in q's dtype (the autocast dtype under autocast),
    ``dropout(softmax(q kᵀ · scale)) v``; logits (B, M, N), the head mean of ``q kᵀ · scale`` before the
    softmax and the dropout, in fp32 (fp64 for fp64 inputs), accumulated over the heads inside the kernel.

    ``dropout_p`` > 0: attention dropout on the softmax weights (kept ones · 1 / (1 − p)), keep mask generated
    in the kernels from ``dropout_seed`` (int64 (1,) on q's device; default: a fresh
    :func:`fastseg.ops.dropout_seed`), regenerated in backward and never stored; it is the mask
    :func:`fastseg.ops.dropout_keep_mask` returns for (B, H, M, N). Pass 0 in eval mode.
    Without Triton (CPU, no TRITON_INTERPRET): SDPA and one matmul for the logits (with dropout: the
    PyTorch reference).
    """
    if torch.is_autocast_enabled(q.device.type) and q.dtype != torch.float64:
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    _check_qkv(q, k, v)
    device = _backend.check_same_device(_OP, q=q, k=k, v=v)
    D = q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if _backend.select(_OP, device) == "torch":
        return _torch_atm_attention(q, k, v, scale, dropout_p)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seed = None
    if dropout_p > 0:
        seed = _draw_seed(device) if dropout_seed is None else dropout_seed.reshape(1)
        if seed.dtype != torch.int64 or seed.device != device:
            raise TypeError(f"dropout_seed must be an int64 tensor on {device}, got {seed.dtype} on {seed.device}")
    if torch.compiler.is_compiling():
        o, _, logits = _fwd_op(q, k, v, seed, scale, dropout_p)
        return o, logits
    return _ATMAttention.apply(q, k, v, seed, scale, dropout_p)
