"""Triton kernels for CAC's context-aware classifier (Tian et al., AAAI 2023), forward + backward.

Three families; ``f`` = pixel features (B, C, P) (P = h·w, any strides), ``z`` = logits (B, K, P):

* **class prototypes** ``A[b, k, :] = Σ_p w_kp f_p``, ``d[b, k] = Σ_p w_kp`` with ``w = softmax_k(z)`` (soft,
  ``post_refine_proto_v2``) or ``w = onehot(label)`` (hard, the oracle of ``get_adaptive_perspective``).
  ``_proto_fwd_kernel``: one program = one image, a block of BC channels, a slice of the pixels; all K ≤ 256
  classes of a pixel tile are in registers, so the softmax is computed in the tile and the (B, K, P)
  probabilities are never stored; (K × BP)·(BP × BC) ``tl.dot`` per pixel tile. Per-slice partials (B, S, K, C)
  are summed in a fixed order by the caller (no atomics: deterministic). It also stores the per-pixel
  logsumexp (B, P). ``_proto_bwd_kernel``: one program = one image, one pixel tile, all K: recomputes the
  probabilities from z and the logsumexp, ``dW = dA·f + dd`` (a dot over channel chunks), ``df = Wᵀ·dA``
  written per channel chunk, ``dz = W ⊙ (dW − Σ_k W dW)`` (softmax backward; soft mode only).
* **cosine classifier** ``out = τ · (q_k · f_p) · rq_k · rf_p`` with ``rf = 1/(|f|+eps)`` (``get_pred``) or
  ``1/max(|f|, eps)`` (``F.normalize``, CLAMP), ``rq`` the same for the prototypes, computed by the caller.
  ``_cos_fwd_kernel``: a GEMM over channel chunks with the pixel norms accumulated in the prologue and the
  scaling in the epilogue (stores |f| (B, P)). Backward from the saved output (``r = Σ G ⊙ out``):
  ``_cos_bwd_df_kernel`` (df = τ rf Σ_k (G rq)ᵀ q + f · c_f · r, and the per-tile Σ_p G ⊙ out partials for dq),
  ``_cos_bwd_dq_kernel`` (Σ_p (G rf) fᵀ per image, pixel slices as deterministic partials).
* **entropy-aware distillation** (``get_distill_loss``): ``_distill_fwd_kernel``: per pixel tile, the two
  logsumexps (online over class chunks), the cross-entropy against ``s·softmax(t) + (1−s)·onehot`` (optionally
  label-smoothed by ``eps``), the teacher's entropy; per-class sums of entropy·loss, entropy and pixel count
  for the tile (a (3, K) partial per tile, reduced by the caller in a fixed order). ``_distill_bwd_kernel``:
  ``dx = coef_p · (softmax(x) − target)``, ``coef_p = g · entropy_p · w[label_p]``.

Labels outside [0, K) that are not ``ignore_index`` are never used as an index: they make the label
prototypes (all classes), the distillation loss and those pixels' gradients NaN (no host check: it would make
every call wait for the GPU).

Dtypes: fp32 / fp16 / bf16 (fp64 under the interpreter), accumulation fp32 (fp64 for fp64). 16-bit dots take
16-bit operands (the probabilities / gradients are rounded to the feature dtype, as PyTorch's bf16 bmm does);
fp32 dots are IEEE unless ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["MAX_CLASSES", "soft_proto_fwd", "soft_proto_bwd", "label_proto_fwd", "label_proto_bwd", "cos_fwd",
           "cos_bwd", "distill_fwd", "distill_bwd"]

#: the prototype kernels keep all classes of a pixel tile in registers
MAX_CLASSES = 256

_NOSPEC = ["K", "C", "P", "sfb", "sfc", "sfp", "szb", "szk", "szp", "sqb", "srb", "n_split", "tps", "n_pt"]


# --------------------------------------------------------------------------------------------- prototypes
@triton.jit
def _probs(z_ptr, y_ptr, b, pp, pm, kk, km, K, P, szb, szk, szp, ignore_index, HARD: tl.constexpr,
           ACC: tl.constexpr):
    """(KP, BP) weights of a pixel tile (softmax over the classes, or the label's onehot) and the logsumexp."""
    if HARD:  # a label outside [0, K) (not ignore_index): a NaN weight for every class (loud, never indexed)
        y64 = tl.load(y_ptr + b.to(tl.int64) * P + pp, mask=pm, other=ignore_index)
        bad = pm & (y64 != ignore_index) & ((y64 < 0) | (y64 >= K))
        y = y64.to(tl.int32)
        w = ((kk[:, None] == y[None, :]) & (y64 != ignore_index)[None, :] & pm[None, :]).to(ACC)
        w = tl.where(bad[None, :], float("nan"), w)
        lse = tl.zeros(pp.shape, ACC)
    else:
        m = km[:, None] & pm[None, :]
        z = tl.load(z_ptr + b.to(tl.int64) * szb + kk[:, None].to(tl.int64) * szk + pp[None, :].to(tl.int64) * szp,
                    mask=m, other=float("-inf")).to(ACC)
        mx = tl.where(pm, tl.max(z, 0), 0.0)
        e = tl.where(m, tl.exp(z - mx[None, :]), 0.0)
        s = tl.where(pm, tl.sum(e, 0), 1.0)
        w = e / s[None, :]
        lse = mx + tl.log(s)
    return w, lse


@triton.jit(do_not_specialize=_NOSPEC)
def _proto_fwd_kernel(f_ptr, z_ptr, y_ptr, acc_ptr, den_ptr, lse_ptr, K, C, P, sfb, sfc, sfp, szb, szk, szp,
                      n_split, tps, ignore_index, HARD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                      KP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pc = tl.program_id(0)  # channel blocks fastest: the programs sharing a logits slice run together (L2)
    pid = tl.program_id(1)
    b = pid // n_split
    s = pid % n_split
    kk = tl.arange(0, KP)
    km = kk < K
    cc = pc * BC + tl.arange(0, BC)
    cm = cc < C
    acc = tl.zeros([KP, BC], ACC)
    den = tl.zeros([KP], ACC)
    p_lo = s * tps * BP
    p_hi = tl.minimum(P, p_lo + tps * BP)
    fb = f_ptr + b.to(tl.int64) * sfb
    for p0 in range(p_lo, p_hi, BP):
        pp = p0 + tl.arange(0, BP)
        pm = pp < p_hi
        w, lse = _probs(z_ptr, y_ptr, b, pp, pm, kk, km, K, P, szb, szk, szp, ignore_index, HARD, ACC)
        if not HARD:
            if pc == 0:
                tl.store(lse_ptr + b.to(tl.int64) * P + pp, lse, mask=pm)
        f = tl.load(fb + cc[None, :].to(tl.int64) * sfc + pp[:, None].to(tl.int64) * sfp,
                    mask=pm[:, None] & cm[None, :], other=0.0)  # (BP, BC)
        acc += tl.dot(w.to(f.dtype), f, input_precision=PREC, out_dtype=ACC)
        den += tl.sum(w, 1)
    out = (pid.to(tl.int64) * K + kk[:, None]) * C + cc[None, :]
    tl.store(acc_ptr + out, acc, mask=km[:, None] & cm[None, :])
    if pc == 0:
        tl.store(den_ptr + pid.to(tl.int64) * K + kk, den, mask=km)


@triton.jit(do_not_specialize=_NOSPEC)
def _proto_bwd_kernel(f_ptr, z_ptr, y_ptr, lse_ptr, da_ptr, dd_ptr, df_ptr, dz_ptr, K, C, P, sfb, sfc, sfp,
                      szb, szk, szp, sdb, ignore_index, HARD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                      KP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(0)
    pp = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = pp < P
    kk = tl.arange(0, KP)
    km = kk < K
    if HARD:
        w, lse = _probs(z_ptr, y_ptr, b, pp, pm, kk, km, K, P, szb, szk, szp, ignore_index, HARD, ACC)
    else:
        m = km[:, None] & pm[None, :]
        z = tl.load(z_ptr + b.to(tl.int64) * szb + kk[:, None].to(tl.int64) * szk + pp[None, :].to(tl.int64) * szp,
                    mask=m, other=float("-inf")).to(ACC)
        lse = tl.load(lse_ptr + b.to(tl.int64) * P + pp, mask=pm, other=0.0)
        w = tl.where(m, tl.exp(z - lse[None, :]), 0.0)
    fb = f_ptr + b.to(tl.int64) * sfb
    dab = da_ptr + b.to(tl.int64) * sdb
    dfb = df_ptr + b.to(tl.int64) * C * P  # df contiguous (B, C, P)
    dw = tl.zeros([KP, BP], ACC)
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < C
        f = tl.load(fb + cc[:, None].to(tl.int64) * sfc + pp[None, :].to(tl.int64) * sfp,
                    mask=cm[:, None] & pm[None, :], other=0.0)  # (BC, BP)
        da = tl.load(dab + kk[:, None] * C + cc[None, :], mask=km[:, None] & cm[None, :], other=0.0).to(f.dtype)
        if not HARD:
            dw += tl.dot(da, f, input_precision=PREC, out_dtype=ACC)
        df = tl.dot(tl.trans(w.to(f.dtype)), da, input_precision=PREC, out_dtype=ACC)  # (BP, BC)
        tl.store(dfb + cc[None, :].to(tl.int64) * P + pp[:, None], df.to(df_ptr.dtype.element_ty),
                 mask=pm[:, None] & cm[None, :])
    if not HARD:
        dd = tl.load(dd_ptr + b.to(tl.int64) * K + kk, mask=km, other=0.0)
        dw += dd[:, None]
        dz = w * (dw - tl.sum(w * dw, 0)[None, :])
        tl.store(dz_ptr + (b.to(tl.int64) * K + kk[:, None]) * P + pp[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=km[:, None] & pm[None, :])


# ------------------------------------------------------------------------------------------ cosine classifier
@triton.jit
def _inv_norm(n, eps, CLAMP: tl.constexpr):
    """(inv, coef): inv = 1/(n + eps), or 1/max(n, eps) (F.normalize); coef = (∂inv/∂n) / (n · inv), 0 where
    undefined (the gradient factor of f's own direction)."""
    if CLAMP:
        inv = 1.0 / tl.maximum(n, eps)
        coef = tl.where(n > eps, -inv * inv, 0.0)
    else:
        inv = 1.0 / (n + eps)
        coef = tl.where(n > 0, -inv / tl.where(n > 0, n, 1.0), 0.0)
    return inv, coef


@triton.jit(do_not_specialize=_NOSPEC)
def _cos_fwd_kernel(f_ptr, q_ptr, rq_ptr, out_ptr, nf_ptr, K, C, P, sfb, sfc, sfp, sqb, srb, tau, eps,
                    CLAMP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
                    BC: tl.constexpr):
    pk = tl.program_id(0)  # class blocks fastest: the programs sharing a feature tile run together (L2)
    b = tl.program_id(2)
    kk = pk * BK + tl.arange(0, BK)
    km = kk < K
    pp = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = pp < P
    fb = f_ptr + b.to(tl.int64) * sfb
    qb = q_ptr + b.to(tl.int64) * sqb
    acc = tl.zeros([BK, BP], ACC)
    nf2 = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < C
        f = tl.load(fb + cc[:, None].to(tl.int64) * sfc + pp[None, :].to(tl.int64) * sfp,
                    mask=cm[:, None] & pm[None, :], other=0.0)  # (BC, BP)
        q = tl.load(qb + kk[:, None] * C + cc[None, :], mask=km[:, None] & cm[None, :], other=0.0).to(f.dtype)
        acc += tl.dot(q, f, input_precision=PREC, out_dtype=ACC)
        fa = f.to(ACC)
        nf2 += tl.sum(fa * fa, 0)
    nf = tl.where(pm, tl.sqrt(nf2), 1.0)  # 1 in masked lanes: no 1/0 there
    inv, coef = _inv_norm(nf, eps, CLAMP)
    rq = tl.load(rq_ptr + b.to(tl.int64) * srb + kk, mask=km, other=0.0)
    out = acc * (tau * rq)[:, None] * inv[None, :]
    tl.store(out_ptr + (b.to(tl.int64) * K + kk[:, None]) * P + pp[None, :], out.to(out_ptr.dtype.element_ty),
             mask=km[:, None] & pm[None, :])
    if pk == 0:
        tl.store(nf_ptr + b.to(tl.int64) * P + pp, nf, mask=pm)


@triton.jit(do_not_specialize=_NOSPEC)
def _cos_bwd_df_kernel(f_ptr, q_ptr, rq_ptr, nf_ptr, g_ptr, o_ptr, df_ptr, t_ptr, K, C, P, sfb, sfc, sfp, sqb, srb,
                       n_pt, tau, eps, CLAMP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, BK: tl.constexpr,
                       BP: tl.constexpr, BC: tl.constexpr):
    pc = tl.program_id(0)  # channel blocks fastest: the programs sharing G / out tiles run together (L2)
    pt = tl.program_id(1)
    b = tl.program_id(2)
    pp = pt * BP + tl.arange(0, BP)
    pm = pp < P
    cc = pc * BC + tl.arange(0, BC)
    cm = cc < C
    fb = f_ptr + b.to(tl.int64) * sfb
    f = tl.load(fb + cc[None, :].to(tl.int64) * sfc + pp[:, None].to(tl.int64) * sfp,
                mask=pm[:, None] & cm[None, :], other=0.0)  # (BP, BC)
    qb = q_ptr + b.to(tl.int64) * sqb
    acc = tl.zeros([BP, BC], ACC)
    r = tl.zeros([BP], ACC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        m = km[:, None] & pm[None, :]
        go_off = (b.to(tl.int64) * K + kk[:, None]) * P + pp[None, :]  # G and out contiguous (B, K, P)
        g = tl.load(g_ptr + go_off, mask=m, other=0.0).to(ACC)
        o = tl.load(o_ptr + go_off, mask=m, other=0.0).to(ACC)
        go = g * o
        r += tl.sum(go, 0)
        if pc == 0:
            tl.store(t_ptr + (b.to(tl.int64) * n_pt + pt) * K + kk, tl.sum(go, 1), mask=km)
        rq = tl.load(rq_ptr + b.to(tl.int64) * srb + kk, mask=km, other=0.0)
        q = tl.load(qb + kk[:, None] * C + cc[None, :], mask=km[:, None] & cm[None, :], other=0.0).to(f.dtype)
        gb = (g * rq[:, None]).to(f.dtype)
        acc += tl.dot(tl.trans(gb), q, input_precision=PREC, out_dtype=ACC)  # (BP, BC)
    nf = tl.load(nf_ptr + b.to(tl.int64) * P + pp, mask=pm, other=1.0)
    inv, coef = _inv_norm(nf, eps, CLAMP)
    df = acc * (tau * inv)[:, None] + f.to(ACC) * (coef * r)[:, None]
    tl.store(df_ptr + (b.to(tl.int64) * C + cc[None, :]) * P + pp[:, None], df.to(df_ptr.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


@triton.jit(do_not_specialize=_NOSPEC)
def _cos_bwd_dq_kernel(f_ptr, g_ptr, nf_ptr, acc_ptr, K, C, P, sfb, sfc, sfp, n_split, tps, eps,
                       CLAMP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
                       BC: tl.constexpr):
    pid = tl.program_id(2)  # (channel, class) blocks fastest: they share the G and feature tiles (L2)
    b = pid // n_split
    s = pid % n_split
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    km = kk < K
    cc = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = cc < C
    fb = f_ptr + b.to(tl.int64) * sfb
    acc = tl.zeros([BK, BC], ACC)
    p_lo = s * tps * BP
    p_hi = tl.minimum(P, p_lo + tps * BP)
    for p0 in range(p_lo, p_hi, BP):
        pp = p0 + tl.arange(0, BP)
        pm = pp < p_hi
        f = tl.load(fb + cc[None, :].to(tl.int64) * sfc + pp[:, None].to(tl.int64) * sfp,
                    mask=pm[:, None] & cm[None, :], other=0.0)  # (BP, BC)
        g = tl.load(g_ptr + (b.to(tl.int64) * K + kk[:, None]) * P + pp[None, :], mask=km[:, None] & pm[None, :],
                    other=0.0).to(ACC)
        nf = tl.load(nf_ptr + b.to(tl.int64) * P + pp, mask=pm, other=1.0)
        inv, coef = _inv_norm(nf, eps, CLAMP)
        acc += tl.dot((g * inv[None, :]).to(f.dtype), f, input_precision=PREC, out_dtype=ACC)
    tl.store(acc_ptr + (pid.to(tl.int64) * K + kk[:, None]) * C + cc[None, :], acc, mask=km[:, None] & cm[None, :])


# ---------------------------------------------------------------------------------- entropy-aware distillation
@triton.jit
def _target(soft, kk, km, y, smooth, ls_eps, K):
    oh = (kk[:, None] == y[None, :]).to(soft.dtype)
    tgt = smooth * soft + (1.0 - smooth) * oh
    if ls_eps > 0:
        tgt = tgt * (1.0 - ls_eps) + (1.0 - tgt) * ls_eps / (K - 1)
    return tl.where(km[:, None], tgt, 0.0)


@triton.jit(do_not_specialize=_NOSPEC)
def _distill_fwd_kernel(x_ptr, t_ptr, y_ptr, part_ptr, stat_ptr, K, P, sxb, sxk, sxp, stb, stk, stp, n_pt,
                        ignore_index, smooth, ls_eps, ACC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0)
    pt = tl.program_id(1)
    pp = pt * BP + tl.arange(0, BP)
    pm = pp < P
    y64 = tl.load(y_ptr + b.to(tl.int64) * P + pp, mask=pm, other=ignore_index)
    valid = pm & (y64 != ignore_index)
    bad = valid & ((y64 < 0) | (y64 >= K))  # outside [0, K): NaN (never used as an index)
    y = y64.to(tl.int32)
    xb = x_ptr + b.to(tl.int64) * sxb
    tb = t_ptr + b.to(tl.int64) * stb
    mx = tl.full([BP], float("-inf"), ACC)
    sx = tl.zeros([BP], ACC)
    mt = tl.full([BP], float("-inf"), ACC)
    st = tl.zeros([BP], ACC)
    for k0 in range(0, K, BK):  # online logsumexp of student and teacher
        kk = k0 + tl.arange(0, BK)
        m = (kk < K)[:, None] & pm[None, :]
        x = tl.load(xb + kk[:, None].to(tl.int64) * sxk + pp[None, :].to(tl.int64) * sxp, mask=m,
                    other=float("-inf")).to(ACC)
        t = tl.load(tb + kk[:, None].to(tl.int64) * stk + pp[None, :].to(tl.int64) * stp, mask=m,
                    other=float("-inf")).to(ACC)
        nx = tl.where(pm, tl.maximum(mx, tl.max(x, 0)), 0.0)
        sx = sx * tl.exp(mx - nx) + tl.sum(tl.where(m, tl.exp(x - nx[None, :]), 0.0), 0)
        mx = nx
        nt = tl.where(pm, tl.maximum(mt, tl.max(t, 0)), 0.0)
        st = st * tl.exp(mt - nt) + tl.sum(tl.where(m, tl.exp(t - nt[None, :]), 0.0), 0)
        mt = nt
    lx = mx + tl.log(tl.where(pm, sx, 1.0))
    lt = mt + tl.log(tl.where(pm, st, 1.0))
    loss = tl.zeros([BP], ACC)
    ent = tl.zeros([BP], ACC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        m = km[:, None] & pm[None, :]
        x = tl.load(xb + kk[:, None].to(tl.int64) * sxk + pp[None, :].to(tl.int64) * sxp, mask=m, other=0.0).to(ACC)
        t = tl.load(tb + kk[:, None].to(tl.int64) * stk + pp[None, :].to(tl.int64) * stp, mask=m, other=0.0).to(ACC)
        soft = tl.where(m, tl.exp(t - lt[None, :]), 0.0)
        tgt = _target(soft, kk, km, y, smooth, ls_eps, K)
        loss += tl.sum(tl.where(m, tgt * (lx[None, :] - x), 0.0), 0)
        ent -= tl.sum(soft * tl.log(soft + 1e-12), 0)
    ent = tl.where(valid, ent, 0.0)
    wl = tl.where(bad, float("nan"), ent * loss)  # a bad label: NaN in every class's sum, so in the loss
    so = b.to(tl.int64) * P + pp
    tl.store(stat_ptr + so, lx, mask=pm)  # stats (3, B, P): lse(student), lse(teacher), entropy
    tl.store(stat_ptr + so + tl.num_programs(0).to(tl.int64) * P, lt, mask=pm)
    tl.store(stat_ptr + so + 2 * tl.num_programs(0).to(tl.int64) * P, ent, mask=pm)
    pb = part_ptr + (b.to(tl.int64) * n_pt + pt) * 3 * K  # partials (B·n_pt, 3, K)
    for k0 in range(0, K, BK):  # per-class sums of this tile
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        oh = ((kk[:, None] == y[None, :]) | bad[None, :]) & valid[None, :]
        tl.store(pb + kk, tl.sum(tl.where(oh, wl[None, :], 0.0), 1), mask=km)
        tl.store(pb + K + kk, tl.sum(tl.where(oh, ent[None, :], 0.0), 1), mask=km)
        tl.store(pb + 2 * K + kk, tl.sum(oh.to(ACC), 1), mask=km)


@triton.jit(do_not_specialize=_NOSPEC)
def _distill_bwd_kernel(x_ptr, t_ptr, y_ptr, stat_ptr, w_ptr, dx_ptr, K, P, sxb, sxk, sxp, stb, stk, stp,
                        ignore_index, smooth, ls_eps, ACC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0)
    pp = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = pp < P
    y64 = tl.load(y_ptr + b.to(tl.int64) * P + pp, mask=pm, other=ignore_index)
    valid = pm & (y64 != ignore_index)
    bad = valid & ((y64 < 0) | (y64 >= K))  # outside [0, K): NaN (never used as an index)
    y = y64.to(tl.int32)
    so = b.to(tl.int64) * P + pp
    nB = tl.num_programs(0).to(tl.int64)
    lx = tl.load(stat_ptr + so, mask=pm, other=0.0)
    lt = tl.load(stat_ptr + so + nB * P, mask=pm, other=0.0)
    ent = tl.load(stat_ptr + so + 2 * nB * P, mask=pm, other=0.0)
    ok = valid & ~bad
    wy = tl.load(w_ptr + tl.where(ok, y, 0), mask=ok, other=0.0)  # g / (Σ entropy of the class + 1e-12) / n
    wy = tl.where(bad, float("nan"), wy)
    coef = tl.where(valid, ent * wy, 0.0)
    xb = x_ptr + b.to(tl.int64) * sxb
    tb = t_ptr + b.to(tl.int64) * stb
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        m = km[:, None] & pm[None, :]
        x = tl.load(xb + kk[:, None].to(tl.int64) * sxk + pp[None, :].to(tl.int64) * sxp, mask=m, other=0.0).to(ACC)
        t = tl.load(tb + kk[:, None].to(tl.int64) * stk + pp[None, :].to(tl.int64) * stp, mask=m, other=0.0).to(ACC)
        soft = tl.where(m, tl.exp(t - lt[None, :]), 0.0)
        tgt = _target(soft, kk, km, y, smooth, ls_eps, K)
        dx = coef[None, :] * (tl.exp(x - lx[None, :]) - tgt)  # Σ_k target = 1
        tl.store(dx_ptr + (b.to(tl.int64) * K + kk[:, None]) * P + pp[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=m)


# ------------------------------------------------------------------------------------------------ launchers
def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _prec(t: torch.Tensor) -> str:
    """fp32 dots follow torch's matmul TF32 switch (the reference is a bmm); meta tensors stand for CUDA ones."""
    on_gpu = t.is_cuda or t.device.type == "meta"
    return "tf32" if (t.dtype == torch.float32 and on_gpu and torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if device.type == "meta" else 2


def _splits(n_tiles: int, programs: int, device) -> tuple[int, int]:
    """(slices, tiles per slice): split the pixel loop until about two programs per SM."""
    want = max(1, min(n_tiles, triton.cdiv(2 * _sms(device), max(programs, 1))))
    tps = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, tps), tps


def _kp(K):
    return max(16, triton.next_power_of_2(K))


#: block sizes (the interpreter uses small tiles so the tests cross tile and chunk edges). GPU choices from
#: ptxas for sm_90 at K = 150 / 171, C = 512 (``fastseg inspect --family cac``; not tuned on a GPU).
def _blocks(name: str, K: int, dtype=torch.bfloat16):
    it = interpreter_enabled()
    wide = dtype in (torch.float32, torch.float64)  # fp32 dots are FMA loops: more registers per element
    if name == "proto_fwd":  # (BP, BC, warps): fp32 (32, 32, 16) 128 regs 72 B spill; bf16 (32, 32, 8) no spill
        return (16, 16, 4) if it else (32, 32, 16 if wide else 8)
    if name == "proto_bwd":  # fp32 (32, 32, 8) 8 B spill; bf16 (16, 32, 8) 247 regs, no spill
        return (16, 16, 4) if it else ((32, 32, 8) if wide else (16, 32, 8))
    if name == "cos_fwd":  # (BK, BP, BC, warps)
        return (16, 16, 16, 4) if it else (64, 64, 32, 4)
    if name == "cos_df":  # (BK, BP, BC, warps)
        return (16, 16, 16, 4) if it else (32, 64, 64, 4)
    if name == "cos_dq":  # (BK, BP, BC, warps)
        return (16, 16, 16, 4) if it else (64, 32, 64, 4)
    if name == "distill":  # (BK, BP, warps)
        return (16, 16, 4) if it else (min(_kp(K), 32), 64, 4)
    raise KeyError(name)


def _fstrides(f):
    """(B, C, P) strides of (B, C, h, w) features whose h, w fold into one pixel axis."""
    B, C, h, w = f.shape
    sb, sc, sh, sw = f.stride()
    if h > 1 and w > 1 and sh != sw * w:
        raise ValueError("cac kernels: the pixel axes of a (B, C, h, w) tensor must fold (stride_h == stride_w·w); "
                         "call .contiguous() or use channels_last / NCHW")
    return sb, sc, (sw if w > 1 else sh)


def _proto_fwd(feat, logits, labels, K, ignore_index):
    B, C, h, w = feat.shape
    P = h * w
    hard = logits is None
    acc_tl, acc_t = _acc(feat.dtype)
    BP, BC, warps = _blocks("proto_fwd", K, feat.dtype)
    KP = _kp(K)
    n_c = triton.cdiv(C, BC)
    S, tps = _splits(triton.cdiv(P, BP), B * n_c, feat.device)
    part = torch.empty(B, S, K, C, dtype=acc_t, device=feat.device)
    den = torch.empty(B, S, K, dtype=acc_t, device=feat.device)
    lse = torch.empty(0 if hard else B * P, dtype=acc_t, device=feat.device)
    z = feat if hard else logits
    szb, szk, szp = (0, 0, 0) if hard else _fstrides(logits)
    y = labels if hard else lse
    record_launch("cac_proto_fwd")
    _proto_fwd_kernel[(n_c, B * S)](feat, z, y, part, den, lse, K, C, P, *_fstrides(feat), szb, szk, szp, S, tps,
                                    ignore_index, HARD=hard, PREC=_prec(feat), ACC=acc_tl, KP=KP, BP=BP, BC=BC,
                                    num_warps=warps)
    return part, den, lse


def soft_proto_fwd(feat, logits):
    """Soft prototype sums. feat (B, C, h, w), logits (B, K, h, w) (K ≤ 256), same float dtype → (A (B, K, C),
    d (B, K), lse (B, h·w)) in the accumulation dtype; A / (d + 1e-12) are the prototypes."""
    part, den, lse = _proto_fwd(feat, logits, None, logits.shape[1], 0)
    return part.sum(1), den.sum(1), lse


def label_proto_fwd(feat, labels, K: int, ignore_index: int):
    """Per-class feature sums and pixel counts over the whole batch: feat (B, C, h, w), labels (B, h·w) int64
    in [0, K) or ``ignore_index`` → (A (K, C), count (K,)) in the accumulation dtype."""
    part, den, _ = _proto_fwd(feat, None, labels, K, ignore_index)
    return part.sum((0, 1)), den.sum((0, 1))


def _proto_bwd(feat, logits, labels, lse, da, dd, K, ignore_index):
    B, C, h, w = feat.shape
    P = h * w
    hard = logits is None
    acc_tl, _ = _acc(feat.dtype)
    BP, BC, warps = _blocks("proto_bwd", K, feat.dtype)
    df = torch.empty(B, C, h, w, dtype=feat.dtype, device=feat.device)
    dz = None if hard else torch.empty(B, K, h, w, dtype=logits.dtype, device=feat.device)
    sdb = 0 if da.dim() == 2 else K * C
    record_launch("cac_proto_bwd")
    grid = (B, triton.cdiv(P, BP))
    common = dict(HARD=hard, PREC=_prec(feat), ACC=acc_tl, KP=_kp(K), BP=BP, BC=BC, num_warps=warps)
    if hard:  # z, lse, dd and dz are not read: any pointer
        _proto_bwd_kernel[grid](feat, feat, labels, da, da, da, df, df, K, C, P, *_fstrides(feat), 0, 0, 0, sdb,
                                ignore_index, **common)
    else:
        _proto_bwd_kernel[grid](feat, logits, lse, lse, da, dd, df, dz, K, C, P, *_fstrides(feat),
                                *_fstrides(logits), sdb, ignore_index, **common)
    return df, dz


def soft_proto_bwd(feat, logits, lse, da, dd):
    """Gradients of the soft prototype sums: da (B, K, C) = ∂L/∂A, dd (B, K) = ∂L/∂d (contiguous, accumulation
    dtype) → (dfeat (B, C, h, w) in feat's dtype, dlogits (B, K, h, w) in logits' dtype)."""
    return _proto_bwd(feat, logits, None, lse, da, dd, logits.shape[1], 0)


def label_proto_bwd(feat, labels, da, ignore_index: int):
    """∂L/∂feat of the label prototype sums: da (K, C) contiguous → dfeat (B, C, h, w): da[label_p] per pixel."""
    return _proto_bwd(feat, None, labels, None, da, None, da.shape[0], ignore_index)[0]


def cos_fwd(feat, q, rq, tau: float, eps: float, clamp: bool):
    """Cosine logits: feat (B, C, h, w), q (B or 1, K, C) contiguous in feat's dtype, rq (B or 1, K) contiguous
    accumulation dtype (1/(|q|+eps) or 1/max(|q|, eps)) → (out (B, K, h, w) in feat's dtype, |f| (B, h·w))."""
    B, C, h, w = feat.shape
    K = q.shape[1]
    P = h * w
    acc_tl, acc_t = _acc(feat.dtype)
    BK, BP, BC, warps = _blocks("cos_fwd", K)
    out = torch.empty(B, K, h, w, dtype=feat.dtype, device=feat.device)
    nf = torch.empty(B, P, dtype=acc_t, device=feat.device)
    sqb = 0 if q.shape[0] == 1 else K * C
    srb = 0 if rq.shape[0] == 1 else K
    record_launch("cac_cos_fwd")
    _cos_fwd_kernel[(triton.cdiv(K, BK), triton.cdiv(P, BP), B)](
        feat, q, rq, out, nf, K, C, P, *_fstrides(feat), sqb, srb, float(tau), float(eps), CLAMP=bool(clamp),
        PREC=_prec(feat), ACC=acc_tl, BK=BK, BP=BP, BC=BC, num_warps=warps)
    return out, nf


def cos_bwd(feat, q, rq, nf, out, g, tau: float, eps: float, clamp: bool):
    """Cosine backward: g (B, K, h, w) contiguous → (dfeat (B, C, h, w) feat's dtype, Σ_p (G·rf) f (B, K, C),
    t = Σ_p G ⊙ out (B, K)), the last two in the accumulation dtype (the caller forms dq from them)."""
    B, C, h, w = feat.shape
    K = q.shape[1]
    P = h * w
    acc_tl, acc_t = _acc(feat.dtype)
    sqb = 0 if q.shape[0] == 1 else K * C
    srb = 0 if rq.shape[0] == 1 else K
    BK, BP, BC, warps = _blocks("cos_df", K)
    n_pt = triton.cdiv(P, BP)
    df = torch.empty(B, C, h, w, dtype=feat.dtype, device=feat.device)
    tpart = torch.empty(B, n_pt, K, dtype=acc_t, device=feat.device)
    record_launch("cac_cos_bwd_df")
    _cos_bwd_df_kernel[(triton.cdiv(C, BC), n_pt, B)](
        feat, q, rq, nf, g, out, df, tpart, K, C, P, *_fstrides(feat), sqb, srb, n_pt, float(tau), float(eps),
        CLAMP=bool(clamp), PREC=_prec(feat), ACC=acc_tl, BK=BK, BP=BP, BC=BC, num_warps=warps)
    BK, BP, BC, warps = _blocks("cos_dq", K)
    n_k, n_c = triton.cdiv(K, BK), triton.cdiv(C, BC)
    S, tps = _splits(triton.cdiv(P, BP), B * n_k * n_c, feat.device)
    part = torch.empty(B, S, K, C, dtype=acc_t, device=feat.device)
    record_launch("cac_cos_bwd_dq")
    _cos_bwd_dq_kernel[(n_c, n_k, B * S)](
        feat, g, nf, part, K, C, P, *_fstrides(feat), S, tps, float(eps), CLAMP=bool(clamp), PREC=_prec(feat),
        ACC=acc_tl, BK=BK, BP=BP, BC=BC, num_warps=warps)
    return df, part.sum(1), tpart.sum(1)


def distill_fwd(pred, teacher, labels, smoothness: float, ignore_index: int, eps: float):
    """Entropy-aware distillation statistics: pred, teacher (B, K, h, w), labels (B, h·w) int64 →
    (per-class sums (3, K): Σ entropy·loss, Σ entropy, pixel count; stats (3, B, h·w): lse(pred), lse(teacher),
    entropy (0 at ignored pixels)), accumulation dtype."""
    B, K, h, w = pred.shape
    P = h * w
    acc_tl, acc_t = _acc(pred.dtype)
    BK, BP, warps = _blocks("distill", K)
    n_pt = triton.cdiv(P, BP)
    part = torch.empty(B * n_pt, 3, K, dtype=acc_t, device=pred.device)
    stats = torch.empty(3, B, P, dtype=acc_t, device=pred.device)
    record_launch("cac_distill_fwd")
    _distill_fwd_kernel[(B, n_pt)](pred, teacher, labels, part, stats, K, P, *_fstrides(pred), *_fstrides(teacher),
                                   n_pt, ignore_index, float(smoothness), float(eps), ACC=acc_tl, BK=BK, BP=BP,
                                   num_warps=warps)
    return part.sum(0), stats


def distill_bwd(pred, teacher, labels, stats, w, smoothness: float, ignore_index: int, eps: float):
    """∂L/∂pred (B, K, h, w) in pred's dtype; w (K,) accumulation dtype: g·[present] / (Σ entropy + 1e-12) / n."""
    B, K, h, w_ = pred.shape
    P = h * w_
    acc_tl, _ = _acc(pred.dtype)
    BK, BP, warps = _blocks("distill", K)
    dx = torch.empty(B, K, h, w_, dtype=pred.dtype, device=pred.device)
    record_launch("cac_distill_bwd")
    _distill_bwd_kernel[(B, triton.cdiv(P, BP))](pred, teacher, labels, stats, w, dx, K, P, *_fstrides(pred),
                                                 *_fstrides(teacher), ignore_index, float(smoothness), float(eps),
                                                 ACC=acc_tl, BK=BK, BP=BP, num_warps=warps)
    return dx
