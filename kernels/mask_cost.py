"""Triton kernels for MaskFormer's matcher costs: the (Q, T_b) sigmoid-focal and dice cost matrices of every
image of a batch, in one launch of each kernel.

With ``x`` the (Q, P = h·w) mask logits, ``t`` the (T, P) targets resized to (h, w) with nearest (PyTorch's
``F.interpolate(mode="nearest")`` index rule, ``floor(dst · float32(H/h))``, from the zero-padded target of
size (H, W)), σ = sigmoid(x), pos = α(1−σ)^2·softplus(−x), neg = (1−α)σ^2·softplus(x) (α = 0.25, γ = 2):

    focal[q, t] = (Σ_p (pos − neg)[q, p]·t[t, p] + Σ_p neg[q, p]) / P     (= (pos·tᵀ + neg·(1 − t)ᵀ) / P)
    dice[q, t]  = 1 − (2·Σ_p σ[q, p]·t[t, p] + 1) / (Σ_p σ[q, p] + Σ_p t[t, p] + 1)

* ``_mask_cost_kernel``: GEMM-style; grid (splits, query x target tiles, images): a program owns a
  (BLOCK_Q, BLOCK_T) tile of both matrices of one image and one split of its pixels. The images' targets
  (different T, sizes, strides, one dtype) are found through a per-image int64 table (address, T, H, W,
  strides, output offsets); target tiles past an image's T do nothing. Per BLOCK_P pixels it forms the logits tile (loaded, or ``E·F`` with ``tl.dot`` over the
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

_NOSPEC = ["Q", "h", "w", "C", "Hp", "Wp", "sxb", "sxq", "sxh", "sxw", "seb", "seq", "sec", "sfb", "sfc", "sfh",
           "sfw", "n_pb", "per_split", "n_tt"]


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


#: per-image row of the metadata table (int64): target address, T, H, W, target strides (T, H, W), offset of
#: the image's partials, offset of its costs in the flat outputs
META_W = 9


@triton.jit
def _image_meta(Meta, b, TG: tl.constexpr):
    row = Meta + b * 9
    tg = tl.load(row).to(tl.pointer_type(TG), bitcast=True)
    return (tg, tl.load(row + 1).to(tl.int32), tl.load(row + 2).to(tl.int32), tl.load(row + 3).to(tl.int32),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8))


@triton.jit(do_not_specialize=_NOSPEC)
def _mask_cost_kernel(X, E, F, Meta, Part,
                      Q, h, w, C, Hp, Wp,
                      sxb, sxq, sxh, sxw, seb, seq, sec, sfb, sfc, sfh, sfw,
                      scale_h, scale_w, n_pb, per_split, n_tt,
                      FROM_EMBED: tl.constexpr, TG: tl.constexpr, LOGIT_PREC: tl.constexpr,
                      COST_PREC: tl.constexpr, OPD: tl.constexpr, ACC: tl.constexpr, ALPHA: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_qt = tl.program_id(1)
    b = tl.program_id(2)
    Tg, T, Ht, Wt, stt, sth, stw, part_off, _ = _image_meta(Meta, b, TG)
    q_tile = pid_qt // n_tt
    t_tile = pid_qt % n_tt
    qq = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tt = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    qm = qq < Q
    tm = tt < T
    P = h * w
    X += b.to(tl.int64) * sxb
    E += b.to(tl.int64) * seb
    F += b.to(tl.int64) * sfb
    g1 = tl.zeros([BLOCK_Q, BLOCK_T], ACC)  # Σ (pos − neg)·t
    g2 = tl.zeros([BLOCK_Q, BLOCK_T], ACC)  # Σ σ·t
    rneg = tl.zeros([BLOCK_Q], ACC)
    rsig = tl.zeros([BLOCK_Q], ACC)
    tsum = tl.zeros([BLOCK_T], ACC)
    t_off = tt.to(tl.int64) * stt
    pb0 = pid_s * per_split
    # a target tile past this image's T (images have different T): nothing to do
    pb1 = tl.where(t_tile * BLOCK_T < T, tl.minimum(pb0 + per_split, n_pb), pb0)
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
        small = ex * inv  # sigmoid(−|x|); inv = sigmoid(|x|)
        pos_x = x >= 0
        sig = tl.where(pos_x, inv, small)
        one_m = tl.where(pos_x, small, inv)
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
    # ---- per-split partials of this image: [g1 (Q·T) | g2 (Q·T) | Σneg (Q) | Σσ (Q) | Σt (T)]
    QT = Q * T
    base = Part + part_off + pid_s.to(tl.int64) * (2 * QT + 2 * Q + T)
    m2 = qm[:, None] & tm[None, :]
    off2 = qq[:, None] * T + tt[None, :]
    tl.store(base + off2, g1, mask=m2)
    tl.store(base + QT + off2, g2, mask=m2)
    first_t = (t_tile == 0) & (T > 0)
    tl.store(base + 2 * QT + qq, rneg, mask=qm & first_t)
    tl.store(base + 2 * QT + Q + qq, rsig, mask=qm & first_t)
    tl.store(base + 2 * QT + 2 * Q + tt, tsum, mask=tm & (q_tile == 0))


@triton.jit(do_not_specialize=["Q", "P", "S"])
def _mask_cost_finalize_kernel(Part, Meta, Focal, Dice, Q, P, S, TG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    _, T, _, _, _, _, _, part_off, out_off = _image_meta(Meta, b, TG)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    QT = Q * T
    L = 2 * QT + 2 * Q + T
    m = idx < QT
    q = idx // tl.maximum(T, 1)
    t = idx % tl.maximum(T, 1)
    acc_ty = Part.dtype.element_ty
    g1 = tl.zeros([BLOCK], acc_ty)
    g2 = tl.zeros([BLOCK], acc_ty)
    rneg = tl.zeros([BLOCK], acc_ty)
    rsig = tl.zeros([BLOCK], acc_ty)
    tsum = tl.zeros([BLOCK], acc_ty)
    for s in range(0, S):
        base = Part + part_off + s * L
        g1 += tl.load(base + idx, mask=m, other=0.0)
        g2 += tl.load(base + QT + idx, mask=m, other=0.0)
        rneg += tl.load(base + 2 * QT + q, mask=m, other=0.0)
        rsig += tl.load(base + 2 * QT + Q + q, mask=m, other=0.0)
        tsum += tl.load(base + 2 * QT + 2 * Q + t, mask=m, other=0.0)
    tl.store(Focal + out_off + idx, (g1 + rneg) / P, mask=m)
    tl.store(Dice + out_off + idx, 1.0 - (2.0 * g2 + 1.0) / (rsig + tsum + 1.0), mask=m)


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


_TG = {torch.uint8: tl.uint8, torch.int8: tl.int8, torch.int16: tl.int16, torch.int32: tl.int32,
       torch.int64: tl.int64, **_TL}


def mask_costs(targets: list[torch.Tensor], padded_hw: tuple[int, int], *, logits: torch.Tensor | None = None,
               embeds: torch.Tensor | None = None, features: torch.Tensor | None = None,
               alpha: float = 0.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(focal, dice)] per image, each (Q, T_b) in fp32 (fp64 for fp64 inputs), for a batch: one launch of
    each kernel.

    logits (B, Q, h, w), or embeds (B, Q, C) + features (B, C, h, w); any strides, fp32/fp16/bf16 (fp64 under
    the interpreter). targets: B tensors (T_b, H_b, W_b) of one dtype (float / integer; bool viewed as uint8 by
    the caller) on the logits' device, any strides, each the top-left corner of a zero-padded (Hp, Wp) =
    ``padded_hw`` target. Q, h·w > 0 and some T_b > 0 (checked by the op).
    """
    from_embed = logits is None
    ref = features if from_embed else logits
    dtype, device = ref.dtype, ref.device
    B, h, w = ref.shape[0], ref.shape[-2], ref.shape[-1]
    Q = embeds.shape[1] if from_embed else logits.shape[1]
    C = embeds.shape[2] if from_embed else 1
    Ts = [t.shape[0] for t in targets]
    Hp, Wp = padded_hw
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    interp = interpreter_enabled()
    logit_prec, cost_prec = precisions(dtype, device.type != "cpu" and not interp)
    opd = _TL[dtype] if cost_prec == "split" else _TL[acc_t]
    BLOCK_Q, BLOCK_P, BLOCK_C, warps = (32, 32, 32, 4) if interp else GPU_BLOCKS[from_embed]
    BLOCK_T = max(16, min(32, triton.next_power_of_2(max(Ts))))  # 64 spills on sm_90 at BLOCK_Q = 128
    P = h * w
    n_pb = triton.cdiv(P, BLOCK_P)
    n_tt = triton.cdiv(max(Ts), BLOCK_T)
    n_qt = triton.cdiv(Q, BLOCK_Q)
    busy = sum(n_qt * triton.cdiv(T, BLOCK_T) for T in Ts)
    S = _split_count(n_pb, BLOCK_P, busy, device)
    per_split = triton.cdiv(n_pb, S)
    S = triton.cdiv(n_pb, per_split)
    rows, part_n, out_n = [], 0, 0
    for t in targets:
        T = t.shape[0]
        rows.append([t.data_ptr(), T, t.shape[1], t.shape[2], *t.stride(), part_n, out_n])
        part_n += S * partial_layout(Q, T)
        out_n += Q * T
    if device.type == "meta":
        meta = torch.empty(B, META_W, dtype=torch.int64, device=device)
    elif device.type == "cuda":  # pinned + non_blocking: no host sync (PyTorch keeps the pinned block alive)
        meta = torch.tensor(rows, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    else:
        meta = torch.tensor(rows, dtype=torch.int64)
    part = torch.empty(part_n, dtype=acc_t, device=device)
    if from_embed:
        X, sx = embeds, (0, 0, 0, 0)
        E, se, Fm, sf = embeds, embeds.stride(), features, features.stride()
    else:
        X, sx = logits, logits.stride()
        E, se, Fm, sf = logits, (0, 0, 0), logits, (0, 0, 0, 0)
    TG = _TG[targets[0].dtype]
    record_launch("mask_cost")
    _mask_cost_kernel[(S, n_qt * n_tt, B)](
        X, E, Fm, meta, part, Q, h, w, C, Hp, Wp, *sx, *se, *sf,
        nearest_scale(Hp, h), nearest_scale(Wp, w), n_pb, per_split, n_tt,
        FROM_EMBED=from_embed, TG=TG, LOGIT_PREC=logit_prec, COST_PREC=cost_prec, OPD=opd, ACC=_TL[acc_t],
        ALPHA=float(alpha), BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
        num_warps=warps, num_stages=2)
    focal = torch.empty(out_n, dtype=acc_t, device=device)
    dice = torch.empty_like(focal)
    BLOCK = 256
    record_launch("mask_cost_finalize")
    _mask_cost_finalize_kernel[(triton.cdiv(Q * max(Ts), BLOCK), B)](part, meta, focal, dice, Q, P, S, TG=TG,
                                                                     BLOCK=BLOCK, num_warps=4)
    out, start = [], 0
    for T in Ts:
        out.append((focal[start:start + Q * T].view(Q, T), dice[start:start + Q * T].view(Q, T)))
        start += Q * T
    return out
