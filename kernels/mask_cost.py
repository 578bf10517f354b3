"""Triton kernels for MaskFormer's matcher costs: the (Q, T) sigmoid-focal and dice cost matrices of one image.

With ``x`` the (Q, P = h·w) mask logits, ``t`` the (T, P) targets resized to (h, w) with nearest (PyTorch's
``F.interpolate(mode="nearest")`` index rule, ``floor(dst · float32(H/h))``, from the zero-padded target of
size (H, W)), σ = sigmoid(x), pos = α(1−σ)^2·softplus(−x), neg = (1−α)σ^2·softplus(x) (α = 0.25, γ = 2):

    focal[q, t] = (Σ_p (pos − neg)[q, p]·t[t, p] + Σ_p neg[q, p]) / P     (= (pos·tᵀ + neg·(1 − t)ᵀ) / P)
    dice[q, t]  = 1 − (2·Σ_p σ[q, p]·t[t, p] + 1) / (Σ_p σ[q, p] + Σ_p t[t, p] + 1)

* ``_mask_cost_kernel``: GEMM-style; a program owns a (BLOCK_Q, BLOCK_T) tile of both matrices and one split
  of the pixels. Per BLOCK_P pixels it forms the logits tile (loaded, or ``E·F`` with ``tl.dot`` over the
  channels when ``FROM_EMBED``), the sigmoid / focal terms in registers, reads the target tile *by index*
  from the full-resolution target (nothing resized or padded is materialised; rows / columns past the
  target's own size read 0, the padding), and accumulates (pos − neg)·tᵀ and σ·tᵀ with ``tl.dot`` plus the
  row sums Σneg, Σσ and Σt. It writes the per-split partials (no atomics: deterministic).
* ``_mask_cost_finalize_kernel``: sums the splits in a fixed order and writes focal and dice.

Dot precision (``COST_PREC``): "ieee" (exact fp32 / fp64), "tf32" (fp32 logits when torch allows TF32 for
fp32 matmuls), "split" (16-bit logits: each fp32 operand is split into hi + lo in the logits' dtype, two
tensor-core dots; the 0/1 targets are exact in any format, so this keeps ~16 mantissa bits).
``LOGIT_PREC`` (E·F): "ieee", "tf32", "native" (16-bit operands, fp32 accumulation) or "upcast" (bf16 through
fp32: the interpreter's bf16 dot is broken in Triton 3.6). Accumulation: fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["mask_costs", "partial_layout", "precisions", "nearest_scale"]

_NOSPEC = ["Q", "T", "h", "w", "C", "Ht", "Wt", "Hp", "Wp", "sxq", "sxh", "sxw", "seq", "sec", "sfc", "sfh",
           "sfw", "stt", "sth", "stw", "n_pb", "per_split", "L"]


@triton.jit
def _dot(a, b, PREC: tl.constexpr, ACC: tl.constexpr):
    """a @ b with ACC accumulation. "upcast": operands through fp32 (the interpreter's bf16 dot is broken)."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == "native":
        out = tl.dot(a, b, out_dtype=ACC)
    else:
        out = tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return out


@triton.jit
def _cost_dot(a, b, COST_PREC: tl.constexpr, OPD: tl.constexpr, ACC: tl.constexpr):
    """a (ACC) @ b (0/1 targets, already in OPD). "split": a = hi + lo in OPD, two tensor-core dots."""
    if COST_PREC == "split":
        hi = a.to(OPD)
        lo = (a - hi.to(ACC)).to(OPD)
        out = tl.dot(hi, b, out_dtype=ACC) + tl.dot(lo, b, out_dtype=ACC)
    else:
        out = tl.dot(a.to(OPD), b, input_precision=COST_PREC, out_dtype=ACC)
    return out


@triton.jit(do_not_specialize=_NOSPEC)
def _mask_cost_kernel(X, E, F, Tg, Part,
                      Q, T, h, w, C, Ht, Wt, Hp, Wp,
                      sxq, sxh, sxw, seq, sec, sfc, sfh, sfw, stt, sth, stw,
                      scale_h, scale_w, n_pb, per_split, L,
                      FROM_EMBED: tl.constexpr, LOGIT_PREC: tl.constexpr, COST_PREC: tl.constexpr,
                      OPD: tl.constexpr, ACC: tl.constexpr, ALPHA: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_qt = tl.program_id(1)
    n_tt = tl.cdiv(T, BLOCK_T)
    q_tile = pid_qt // n_tt
    t_tile = pid_qt % n_tt
    qq = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tt = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    qm = qq < Q
    tm = tt < T
    P = h * w
    g1 = tl.zeros([BLOCK_Q, BLOCK_T], ACC)  # Σ (pos − neg)·t
    g2 = tl.zeros([BLOCK_Q, BLOCK_T], ACC)  # Σ σ·t
    rneg = tl.zeros([BLOCK_Q], ACC)
    rsig = tl.zeros([BLOCK_Q], ACC)
    tsum = tl.zeros([BLOCK_T], ACC)
    t_off = tt.to(tl.int64) * stt
    pb0 = pid_s * per_split
    pb1 = tl.minimum(pb0 + per_split, n_pb)
    for pb in range(pb0, pb1):
        pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = pp < P
        oy = pp // w
        ox = pp % w
        # ---- logits tile (BLOCK_Q, BLOCK_P)
        if FROM_EMBED:
            f_pix = oy.to(tl.int64) * sfh + ox.to(tl.int64) * sfw
            x = tl.zeros([BLOCK_Q, BLOCK_P], ACC)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cm = cc < C
                e = tl.load(E + qq[:, None].to(tl.int64) * seq + cc[None, :] * sec,
                            mask=qm[:, None] & cm[None, :], other=0.0)
                f = tl.load(F + cc[:, None].to(tl.int64) * sfc + f_pix[None, :],
                            mask=cm[:, None] & pm[None, :], other=0.0)
                x += _dot(e, f, LOGIT_PREC, ACC)
        else:
            x_pix = oy.to(tl.int64) * sxh + ox.to(tl.int64) * sxw
            x = tl.load(X + qq[:, None].to(tl.int64) * sxq + x_pix[None, :],
                        mask=qm[:, None] & pm[None, :], other=0.0).to(ACC)
        # ---- sigmoid / focal terms (stable: e = exp(−|x|), softplus(x) = max(x, 0) + log(1 + e))
        ex = tl.exp(-tl.abs(x))
        inv = 1.0 / (1.0 + ex)
        big = inv  # sigmoid(|x|)
        small = ex * inv  # sigmoid(−|x|)
        pos_x = x >= 0
        sig = tl.where(pos_x, big, small)
        one_m = tl.where(pos_x, small, big)
        lg = tl.log(1.0 + ex)
        sp_pos = tl.maximum(x, 0.0) + lg  # softplus(x) = BCE(x, 0)
        sp_neg = tl.maximum(-x, 0.0) + lg  # softplus(−x) = BCE(x, 1)
        valid = qm[:, None] & pm[None, :]
        neg = tl.where(valid, (1.0 - ALPHA) * sig * sig * sp_pos, 0.0)
        a1 = tl.where(valid, ALPHA * one_m * one_m * sp_neg, 0.0) - neg
        sig = tl.where(valid, sig, 0.0)
        rneg += tl.sum(neg, 1)
        rsig += tl.sum(sig, 1)
        # ---- target tile (BLOCK_P, BLOCK_T), nearest by index into the (zero-padded) full-resolution target
        sy = tl.minimum(tl.floor(oy.to(tl.float32) * scale_h).to(tl.int32), Hp - 1)
        sx = tl.minimum(tl.floor(ox.to(tl.float32) * scale_w).to(tl.int32), Wp - 1)
        inside = pm & (sy < Ht) & (sx < Wt)
        t_pix = sy.to(tl.int64) * sth + sx.to(tl.int64) * stw
        tg = tl.load(Tg + t_pix[:, None] + t_off[None, :], mask=inside[:, None] & tm[None, :], other=0).to(ACC)
        tsum += tl.sum(tg, 0)
        tg = tg.to(OPD)
        g1 += _cost_dot(a1, tg, COST_PREC, OPD, ACC)
        g2 += _cost_dot(sig, tg, COST_PREC, OPD, ACC)
    # ---- per-split partials: [g1 (Q·T) | g2 (Q·T) | Σneg (Q) | Σσ (Q) | Σt (T)]
    base = Part + pid_s.to(tl.int64) * L
    QT = Q * T
    m2 = qm[:, None] & tm[None, :]
    off2 = qq[:, None] * T + tt[None, :]
    tl.store(base + off2, g1, mask=m2)
    tl.store(base + QT + off2, g2, mask=m2)
    first_t = t_tile == 0
    tl.store(base + 2 * QT + qq, rneg, mask=qm & first_t)
    tl.store(base + 2 * QT + Q + qq, rsig, mask=qm & first_t)
    tl.store(base + 2 * QT + 2 * Q + tt, tsum, mask=tm & (q_tile == 0))


@triton.jit(do_not_specialize=["Q", "T", "P", "S", "L"])
def _mask_cost_finalize_kernel(Part, Focal, Dice, Q, T, P, S, L, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    QT = Q * T
    m = idx < QT
    q = idx // T
    t = idx % T
    acc_ty = Part.dtype.element_ty
    g1 = tl.zeros([BLOCK], acc_ty)
    g2 = tl.zeros([BLOCK], acc_ty)
    rneg = tl.zeros([BLOCK], acc_ty)
    rsig = tl.zeros([BLOCK], acc_ty)
    tsum = tl.zeros([BLOCK], acc_ty)
    for s in range(0, S):
        base = Part + s * L
        g1 += tl.load(base + idx, mask=m, other=0.0)
        g2 += tl.load(base + QT + idx, mask=m, other=0.0)
        rneg += tl.load(base + 2 * QT + q, mask=m, other=0.0)
        rsig += tl.load(base + 2 * QT + Q + q, mask=m, other=0.0)
        tsum += tl.load(base + 2 * QT + 2 * Q + t, mask=m, other=0.0)
    tl.store(Focal + idx, (g1 + rneg) / P, mask=m)
    tl.store(Dice + idx, 1.0 - (2.0 * g2 + 1.0) / (rsig + tsum + 1.0), mask=m)


# ----------------------------------------------------------------------------------------------- launch
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


#: (BLOCK_Q, BLOCK_P, BLOCK_C, num_warps) on a GPU, from the logits / from embeddings x features.
#: BLOCK_Q = 128 covers the usual 100 queries in one tile, so each target pixel (and, from embeddings, each
#: feature column) is read once; at Q=100, T=30 this compiles for sm_90 without spills in bf16 / fp16 and
#: fp32-TF32 (fp32 "ieee" FMA dots: ~112 B logits / ~228 B embeddings).
GPU_BLOCKS = {False: (128, 32, 32, 8), True: (128, 32, 32, 8)}


def nearest_scale(n_in: int, n_out: int) -> float:
    """PyTorch's nearest scale ``float32(n_in) / n_out`` (the value its kernels multiply by), as a float."""
    return float(np.float32(n_in) / np.float32(n_out))


def partial_layout(Q: int, T: int) -> int:
    """Length of one split's partial row: g1, g2 (Q·T each), Σneg, Σσ (Q each), Σt (T)."""
    return 2 * Q * T + 2 * Q + T


def precisions(dtype: torch.dtype, on_gpu: bool) -> tuple[str, str]:
    """(LOGIT_PREC, COST_PREC) for logits / embeddings of ``dtype``: see the module docstring. fp32 follows
    ``torch.backends.cuda.matmul.allow_tf32`` (what cuBLAS consults for the reference's einsum). Under the
    interpreter fp16 takes the GPU's path (its fp16 dot works), bf16 goes through fp32."""
    if dtype == torch.float64 or (not on_gpu and dtype != torch.float16):
        return ("upcast" if dtype == torch.bfloat16 else "ieee"), "ieee"  # the interpreter's fp16 dot works
    if dtype == torch.float32:
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return p, p
    return "native", "split"


def _split_count(n_pb: int, block_p: int, tiles: int, device: torch.device) -> int:
    """Pixel splits: about one program per SM (one 8-warp program fits per SM at these register counts; the
    kernel is bound by the sigmoid / log / exp per element, not by bytes), at least 256 pixels per split."""
    if interpreter_enabled() or device.type == "cpu":
        return max(1, min(n_pb, 3))  # a few splits, so the split / finalize logic is exercised
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(triton.cdiv(n_pb, triton.cdiv(256, block_p)), triton.cdiv(sms, tiles)))


def mask_costs(target: torch.Tensor, padded_hw: tuple[int, int], *, logits: torch.Tensor | None = None,
               embeds: torch.Tensor | None = None, features: torch.Tensor | None = None,
               alpha: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice), each (Q, T) in fp32 (fp64 for fp64 inputs), of one image.

    logits (Q, h, w), or embeds (Q, C) + features (C, h, w); any strides, fp32/fp16/bf16 (fp64 under the
    interpreter). target (T, Ht, Wt) float / uint8 (bool viewed as uint8 by the caller), any strides, seen
    as the top-left corner of a zero-padded (Hp, Wp) = ``padded_hw`` target. Q, T, h·w > 0 (checked by the op).
    """
    from_embed = logits is None
    ref = features if from_embed else logits
    dtype = ref.dtype
    h, w = ref.shape[-2:]
    Q = embeds.shape[0] if from_embed else logits.shape[0]
    C = embeds.shape[1] if from_embed else 1
    T, Ht, Wt = target.shape
    Hp, Wp = padded_hw
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    on_gpu = ref.device.type != "cpu" and not interpreter_enabled()
    logit_prec, cost_prec = precisions(dtype, on_gpu)
    opd = _TL[dtype] if cost_prec == "split" else _TL[acc_t]
    interp = interpreter_enabled()
    BLOCK_Q, BLOCK_P, BLOCK_C, warps = (32, 32, 32, 4) if interp else GPU_BLOCKS[from_embed]
    BLOCK_T = max(16, min(32, triton.next_power_of_2(T)))  # 64 spills on sm_90 at BLOCK_Q = 128
    P = h * w
    n_pb = triton.cdiv(P, BLOCK_P)
    tiles = triton.cdiv(Q, BLOCK_Q) * triton.cdiv(T, BLOCK_T)
    S = _split_count(n_pb, BLOCK_P, tiles, ref.device)
    per_split = triton.cdiv(n_pb, S)
    S = triton.cdiv(n_pb, per_split)
    L = partial_layout(Q, T)
    part = torch.empty(S, L, dtype=acc_t, device=ref.device)
    if from_embed:
        X, sx = embeds, (0, 0, 0)
        E, se, Fm, sf = embeds, embeds.stride(), features, features.stride()
    else:
        X, sx = logits, logits.stride()
        E, se, Fm, sf = logits, (0, 0), logits, (0, 0, 0)
    record_launch("mask_cost")
    _mask_cost_kernel[(S, tiles)](
        X, E, Fm, target, part, Q, T, h, w, C, Ht, Wt, Hp, Wp, *sx, *se, *sf, *target.stride(),
        nearest_scale(Hp, h), nearest_scale(Wp, w), n_pb, per_split, L,
        FROM_EMBED=from_embed, LOGIT_PREC=logit_prec, COST_PREC=cost_prec, OPD=opd, ACC=_TL[acc_t],
        ALPHA=float(alpha), BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
        num_warps=warps, num_stages=2)
    focal = torch.empty(Q, T, dtype=acc_t, device=ref.device)
    dice = torch.empty_like(focal)
    BLOCK = 256
    record_launch("mask_cost_finalize")
    _mask_cost_finalize_kernel[(triton.cdiv(Q * T, BLOCK),)](part, focal, dice, Q, T, P, S, L, BLOCK=BLOCK,
                                                             num_warps=4)
    return focal, dice
