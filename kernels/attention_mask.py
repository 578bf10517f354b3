"""Mask2Former's attention mask, bit-packed straight from the query mask embeddings.

Mask2Former masks query q out of pixel p when ``sigmoid(resize(e_q · F)) < 0.5``, i.e. when the mask
logit is negative. Bilinear resizing commutes with the per-query dot product, so with the mask features
resized once per level (F_level: (B, C, h, w)) the mask is ``e_q · F_level[:, p] < 0``. This kernel computes
that GEMM tile by tile and keeps only the sign: packed 1 bit per (query, pixel), bit = 1 means allowed
(logit >= 0). A row with no allowed pixel is, as in Mask2Former, allowed everywhere (a second tiny pass).

Shapes: emb (B, Q, C), feat (B, C, P) any strides, fp32/fp16/bf16 (fp64 under the interpreter);
bits (B, 1, Q, ceil(P / 32)) int32; counts (B, Q) int32 (allowed pixels per row, before the reset).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

from .masked_attention import _dot


def _configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_Q": 16, "BLOCK_W": 2, "BLOCK_C": 16}, num_warps=1)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_Q": 64, "BLOCK_W": 4, "BLOCK_C": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_Q": bq, "BLOCK_W": bw, "BLOCK_C": 32}, num_warps=w, num_stages=s)
            for bq, bw in ((64, 4), (64, 2), (128, 2)) for w, s in ((4, 3), (8, 3))]


@triton.autotune(configs=_configs(), key=["N_Q", "C", "N_P"], reset_to_zero=["Counts"])
@triton.jit
def _sign_pack_kernel(
    E, F, Bits, Counts,
    stride_eb, stride_eq, stride_ec,
    stride_fb, stride_fc, stride_fp,
    N_Q, C, N_P, N_WORDS,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (query block, word block, batch): logits (BLOCK_Q, 32·BLOCK_W) = e · F, packed by sign."""
    pid_q = tl.program_id(0)
    pid_w = tl.program_id(1)
    b = tl.program_id(2)
    BLOCK_P: tl.constexpr = BLOCK_W * 32
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_p = pid_w * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    q_ok = offs_q < N_Q
    p_ok = offs_p < N_P
    logits = tl.zeros([BLOCK_Q, BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + offs_c) < C
        e = tl.load(E + b * stride_eb + offs_q[:, None] * stride_eq + (c0 + offs_c)[None, :] * stride_ec,
                    mask=q_ok[:, None] & c_ok[None, :], other=0.0)
        f = tl.load(F + b * stride_fb + (c0 + offs_c)[:, None] * stride_fc + offs_p[None, :] * stride_fp,
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(E.dtype.element_ty)  # as feat.to(emb.dtype)
        logits += _dot(e, f, PRECISION)
    allowed = ((logits >= 0) & p_ok[None, :]).to(tl.int32)
    bits = tl.reshape(allowed, (BLOCK_Q, BLOCK_W, 32)) << tl.arange(0, 32)[None, None, :]
    words = tl.sum(bits, axis=2)  # distinct bits: sum == or
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    tl.store(Bits + (b * N_Q + offs_q[:, None]) * N_WORDS + offs_w[None, :], words,
             mask=q_ok[:, None] & (offs_w[None, :] < N_WORDS))
    tl.atomic_add(Counts + b * N_Q + offs_q, tl.sum(allowed, axis=1), mask=q_ok, sem="relaxed")


@triton.jit
def _reset_empty_kernel(Bits, Counts, N_WORDS, N_P, BLOCK_W: tl.constexpr):
    """Rows (b, q) with no allowed pixel (count 0) become "allowed everywhere" (the first N_P bits set)."""
    row = tl.program_id(0)  # over B * Q
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    empty = tl.load(Counts + row) == 0
    n_bits = tl.minimum(tl.maximum(N_P - offs_w * 32, 0), 32)  # bits of word w inside the row
    full = tl.where(n_bits == 32, -1, (1 << tl.minimum(n_bits, 31)) - 1)  # int32 with the low n_bits set
    tl.store(Bits + row * N_WORDS + offs_w, full, mask=(offs_w < N_WORDS) & empty)


def sign_pack(emb: torch.Tensor, feat: torch.Tensor, precision: str,
              reset_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """emb (B, Q, C), feat (B, C, P) -> bits (B, 1, Q, ceil(P / 32)) int32, counts (B, Q) int32 (allowed
    pixels per row before the reset). feat may have another float dtype than emb (e.g. fp32 level features,
    bf16 embeddings): it is rounded to emb's dtype in registers, as ``feat.to(emb.dtype)`` would, without that
    copy. ``reset_empty``: rows with none allowed get every bit (a second small kernel). Launches: counts'
    zero fill, the GEMM-and-pack kernel, the reset kernel."""
    B, Q, C = emb.shape
    P = feat.shape[2]
    n_words = triton.cdiv(P, 32)
    bits = torch.empty((B, 1, Q, n_words), device=emb.device, dtype=torch.int32)
    counts = torch.zeros((B, Q), device=emb.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(Q, meta["BLOCK_Q"]), triton.cdiv(n_words, meta["BLOCK_W"]), B)  # noqa: E731
    record_launch("attention_mask_sign_pack")
    _sign_pack_kernel[grid](
        emb, feat, bits, counts, *emb.stride(), *feat.stride(), Q, C, P, n_words, PRECISION=precision,
        ACC=tl.float64 if emb.dtype == torch.float64 else tl.float32,
    )
    if reset_empty:
        block_w = 4 if interpreter_enabled() else 256
        record_launch("attention_mask_reset_empty")
        _reset_empty_kernel[(B * Q, triton.cdiv(n_words, block_w))](bits, counts, n_words, P, BLOCK_W=block_w)
    return bits, counts
