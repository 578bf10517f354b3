"""Context Clusters: fused center proposal, cosine similarity, sigmoid, argmax assignment, aggregation and
dispatch (forward and backward) as Triton kernels.

One program per (batch, head, region): it streams the region's N = R2*R3 points in chunks of BLOCK_N and keeps
the M = P2*P3 centers of its region as small (M, C) tiles, so neither the (b, M, N) similarity nor anything of
size (b, M, N, C) is ever stored. Per point only the assignment (int32) and its similarity are kept for
backward; per region the pooled centers, the aggregated centers and the normaliser sums.

Tensors: x (similarity features) and v (values) are [B, E*C, D2, D3] (outputs of the 1x1 convs ``f`` and
``v``; E heads of C channels), dense apart from the batch stride (so they may be the two channel halves of
one packed conv output); the regions are the F2 x F3 tiles of size R2 x R3; centers are the
adaptive average pools (PyTorch's bins) of a region to P2 x P3. Output: [B, E*C, D2, D3], or with
``return_center`` [B, E*C, F2*P2, F3*P3]. fp32/fp16/bf16 (fp64 too) inputs, accumulation in fp32 (fp64 for
fp64 inputs).

Aggregate step: agg_m = (sum_{n in m} s_n v_n + vcenter_m) / (S_m + 1) with S_m = sum_{n in m} s_n (the
official code since 2023-05-31, ``SIM_NORM=True``) or S_m = |{n in m}| (before it, ``SIM_NORM=False``); with
the sim normaliser dL/ds_n gets -<dL/dagg_m, agg_m> / (S_m + 1) for n in m.

The small center products: up to 8 centers (``USE_DOT=False``, every CoC model: M = 4) they are loops over
the centers of (BLOCK_N, BLOCK_C) element-wise FMAs and reductions, exact in the accumulation dtype; a
center's row of an (M, C) matrix is read from the program's small, L1-resident scratch block (as are the
gathers agg[a_n], chat[a_n], dL/dagg[a_n] for the points). Beyond 8 centers they are ``tl.dot`` on
zero-padded tiles in ``PRECISION`` ("ieee": exact fp32; "tf32" only when the host allows TF32 for fp32
matmuls, see :func:`_precision`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["cluster_forward", "cluster_backward", "launch_meta"]

_EPS = 1e-12  # F.normalize's eps
_SMALL_M = 8  # centers per region up to which the products are loops over the centers (no tl.dot)
_MAXNREG = 128  # register cap: 16 warps per SM; without one ptxas picked 128-168 registers and spilled 4-32 B


def _configs():
    """BLOCK_N x num_warps keep <= 8 point-tile values per thread (BLOCK_C = 32); measured register, spill and
    shared-memory numbers: benchmarks/results/notes/context_cluster_resources.md."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":  # one config (quick GPU test runs): 0 B spills in every
        return [triton.Config({"BLOCK_N": 16}, num_warps=2, maxnreg=_MAXNREG)]  # dtype at every preset shape
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, maxnreg=_MAXNREG) for bn, w in ((16, 2), (32, 4), (64, 8))]


def _prune(configs, named_args, **kw):
    """Drop configs whose (BLOCK_N, BLOCK_C) point tiles hold more than 8 values per thread: the backward keeps
    about a dozen such tiles (and their offsets) live and spills beyond that. Keep at least the smallest
    config. The tl.dot path (> 8 centers) runs without the register cap."""
    bc = kw.get("BLOCK_C", named_args.get("BLOCK_C", 32))
    ok = [c for c in configs if c.kwargs["BLOCK_N"] * bc <= 8 * 32 * c.num_warps]
    if getattr(named_args.get("x_ptr"), "dtype", None) == torch.float16:  # sm_90: the fp16 backward at 32 x 4 warps spilled 4 B (ADE
        ok = [c for c in ok if c.num_warps != 4] or ok  # 512, 16 x 16 regions; bf16 / fp32 0 B), the others 0 B
    ok = ok or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]
    if kw.get("USE_DOT", False):
        ok = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages) for c in ok]
    return ok


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _region_setup(pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Decode the program's (b, e, f2, f3), its region's base offsets in the inputs (batch stride SB_IN) and
    in out/grad-out (batch stride SB_OUT), and the pooling bins as (BLOCK_M,) vectors."""
    f3 = pid % F3
    t = pid // F3
    f2 = t % F2
    t = t // F2
    e = t % E
    b = t // E
    hw = D2 * D3
    base = b.to(tl.int64) * SB_IN + e * C * hw + (f2 * R2) * D3 + f3 * R3
    base_out = b.to(tl.int64) * SB_OUT + e * C * hw + (f2 * R2) * D3 + f3 * R3
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    rs, re, cs, ce, inv_area = _bins(offs_m, R2, R3, P2, P3, ACC)
    inv_area = tl.where(mmask, inv_area, 0.0)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    return b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask


@triton.jit
def _bins(m, R2, R3, P2, P3, ACC: tl.constexpr):
    """Adaptive-average-pool bin of center(s) m: rows [rs, re), cols [cs, ce), 1/area."""
    pi = m // P3
    pj = m % P3
    rs = (pi * R2) // P2
    re = ((pi + 1) * R2 + P2 - 1) // P2
    cs = (pj * R3) // P3
    ce = ((pj + 1) * R3 + P3 - 1) // P3
    area = (re - rs) * (ce - cs)
    return rs, re, cs, ce, 1.0 / tl.maximum(area, 1).to(ACC)


@triton.jit
def _pool_col(m, i, j, nmask, R2, R3, P2, P3, ACC: tl.constexpr):
    """(BLOCK_N,): 1/|bin m| where point (i, j) lies in pooling bin m (a runtime scalar), else 0."""
    rs, re, cs, ce, inv = _bins(m, R2, R3, P2, P3, ACC)
    return tl.where((i >= rs) & (i < re) & (j >= cs) & (j < ce) & nmask, inv, 0.0)


@triton.jit
def _pool_mn(i, j, nmask, rs, re, cs, ce, inv_area):
    """(BLOCK_M, BLOCK_N) pooling weights (tl.dot path)."""
    inside = (i[None, :] >= rs[:, None]) & (i[None, :] < re[:, None]) & (j[None, :] >= cs[:, None]) \
        & (j[None, :] < ce[:, None]) & nmask[None, :]
    return tl.where(inside, inv_area[:, None], 0.0)


@triton.jit
def _pool_nm(i, j, nmask, rs, re, cs, ce, inv_area):
    """(BLOCK_N, BLOCK_M): transpose of :func:`_pool_mn`."""
    inside = (i[:, None] >= rs[None, :]) & (i[:, None] < re[None, :]) & (j[:, None] >= cs[None, :]) \
        & (j[:, None] < ce[None, :]) & nmask[:, None]
    return tl.where(inside, inv_area[None, :], 0.0)


@triton.jit
def _load_points(ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_C) tile of the region's points offs_n (row-major over the R2 x R3 region), its int32
    offsets from the region's base (int64 scalar), and the points' (row, col) in the region."""
    i = offs_n // R3
    j = offs_n % R3
    off = (i * D3 + j)[:, None] + (offs_c * hw)[None, :]
    return tl.load((ptr + base) + off, mask=nmask[:, None] & cmask[None, :], other=0.0).to(ACC), off, i, j


@triton.jit
def _normalize_rows(t, EPS: tl.constexpr):
    nrm = tl.sqrt(tl.sum(t * t, axis=1))
    den = tl.maximum(nrm, EPS)
    return t / den[:, None], nrm, den


@triton.jit
def _gather_rows(blk, M, C, a, nmask, offs_c, cmask):
    """(BLOCK_N, BLOCK_C) rows a_n of the program's [M, C] scratch block ``blk`` (L1-resident)."""
    return tl.load(blk + a[:, None] * C + offs_c[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _pick(vec, a, offs_m):
    """(BLOCK_N,): vec[a_n] of a (BLOCK_M,) vector."""
    return tl.sum(tl.where(a[:, None] == offs_m[None, :], vec[None, :], 0.0), axis=1)


@triton.jit
def _add_rows(acc, t, a, s, i, j, nmask, offs_m, M, R2, R3, P2, P3, rs, re, cs, ce, inv_area,
              ONEHOT: tl.constexpr, POOL: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
              PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_C) += W @ t for the (M, BLOCK_N) weights W[m, n] = [a_n == m] s_n (ONEHOT) +
    pool[m, n] (POOL); t: (BLOCK_N, BLOCK_C)."""
    if USE_DOT:
        w = tl.zeros((acc.shape[0], t.shape[0]), dtype=ACC)
        if ONEHOT:
            w += tl.where((offs_m[:, None] == a[None, :]) & nmask[None, :], s[None, :], 0.0)
        if POOL:
            w += _pool_mn(i, j, nmask, rs, re, cs, ce, inv_area).to(ACC)
        acc = tl.dot(w, t, acc, input_precision=PRECISION, out_dtype=ACC)
    else:
        for m in range(M):
            w = tl.zeros((t.shape[0],), dtype=ACC)
            if ONEHOT:
                w += tl.where((a == m) & nmask, s, 0.0)
            if POOL:
                w += _pool_col(m, i, j, nmask, R2, R3, P2, P3, ACC)
            row = tl.sum(w[:, None] * t, axis=0)
            acc = tl.where(offs_m[:, None] == m, acc + row[None, :], acc)
    return acc


@triton.jit
def _add_pooled(out, blk, tile, i, j, nmask, offs_c, cmask, M, C, R2, R3, P2, P3, rs, re, cs, ce, inv_area,
                ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """out (BLOCK_N, BLOCK_C) += pool^T @ X for the program's (M, C) matrix X, stored in scratch ``blk`` (read
    row by row, loop path) and given as the (BLOCK_M, BLOCK_C) register tile ``tile`` (tl.dot path)."""
    if USE_DOT:
        out = tl.dot(_pool_nm(i, j, nmask, rs, re, cs, ce, inv_area).to(ACC), tile, out, input_precision=PRECISION,
                     out_dtype=ACC)
    else:
        for m in range(M):
            row = tl.load(blk + m * C + offs_c, mask=cmask, other=0.0)
            out += _pool_col(m, i, j, nmask, R2, R3, P2, P3, ACC)[:, None] * row[None, :]
    return out


@triton.jit
def _assign(xhat, chat_blk, chat, offs_m, mmask, M, C, offs_c, cmask, alpha, beta,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
            PRECISION: tl.constexpr):
    """Sigmoid similarity of the points xhat (BLOCK_N, BLOCK_C; normalised) to the normalised centers
    (scratch ``chat_blk`` / tile ``chat``) and the argmax: (a_n, s_n). Ties go to the first center and a NaN
    similarity wins (first NaN), as torch.max does; a_n is always < M."""
    if USE_DOT:
        cos = tl.dot(xhat, tl.trans(chat), input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_M)
        s = 1.0 / (1.0 + tl.exp(-(beta + alpha * cos)))
        s = tl.where(mmask[None, :], s, -1.0)
        smax = tl.max(s, axis=1)
        a = tl.min(tl.where(s == smax[:, None], offs_m[None, :], BLOCK_M), axis=1)
        a_nan = tl.min(tl.where(s != s, offs_m[None, :], BLOCK_M), axis=1)
        a = tl.minimum(tl.where(a_nan < BLOCK_M, a_nan, a), M - 1)
        best = tl.sum(tl.where(offs_m[None, :] == a[:, None], s, 0.0), axis=1)
    else:
        best = tl.full((BLOCK_N,), -1.0, ACC)
        a = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for m in range(M):
            row = tl.load(chat_blk + m * C + offs_c, mask=cmask, other=0.0)
            s_m = 1.0 / (1.0 + tl.exp(-(beta + alpha * tl.sum(xhat * row[None, :], axis=1))))
            take = (s_m > best) | ((s_m != s_m) & (best == best))
            best = tl.where(take, s_m, best)
            a = tl.where(take, m, a)
    return a, best


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs(), key=["N", "M", "C", "RETURN_CENTER"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _coc_fwd_kernel(x_ptr, v_ptr, alpha_ptr, beta_ptr, out_ptr,
                    assign_ptr, sim_ptr, cen_ptr, agg_ptr, den_ptr,
                    SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
                    RETURN_CENTER: tl.constexpr, SIM_NORM: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask = _region_setup(
        pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M, BLOCK_M, BLOCK_C, ACC)
    hw = D2 * D3
    inst = pid.to(tl.int64)
    mc_off = inst * M * C + offs_m[:, None] * C + offs_c[None, :]
    mc_mask = mmask[:, None] & cmask[None, :]
    agg_blk = agg_ptr + inst * M * C
    # 1) center proposal: adaptive average pooling of the region's points.
    cen = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, _o1, i, j = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        cen = _add_rows(cen, xt, offs_n, offs_n.to(ACC), i, j, nmask, offs_m, M, R2, R3, P2, P3, rs, re, cs, ce,
                        inv_area, False, True, ACC, USE_DOT, PRECISION)
    tl.store(cen_ptr + mc_off, cen, mask=mc_mask)
    chat, _n1, _d1 = _normalize_rows(cen, EPS)
    tl.store(agg_ptr + mc_off, chat, mask=mc_mask)  # the agg block holds chat until the aggregates are known
    tl.debug_barrier()
    alpha = tl.load(alpha_ptr).to(ACC)
    beta = tl.load(beta_ptr).to(ACC)
    # 2) similarity, sigmoid, argmax (first index on ties) and aggregation (+ the pooled value centers).
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, _o2, i, j = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        xhat, _n2, _d2 = _normalize_rows(xt, EPS)
        a, s = _assign(xhat, agg_blk, chat, offs_m, mmask, M, C, offs_c, cmask, alpha, beta, BLOCK_N, BLOCK_M,
                       ACC, USE_DOT, PRECISION)
        tl.store(assign_ptr + inst * N + offs_n, a, mask=nmask)
        tl.store(sim_ptr + inst * N + offs_n, s, mask=nmask)
        vt, _o3, _i3, _j3 = _load_points(v_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        acc = _add_rows(acc, vt, a, s, i, j, nmask, offs_m, M, R2, R3, P2, P3, rs, re, cs, ce, inv_area,
                        True, True, ACC, USE_DOT, PRECISION)
        hit = (offs_m[:, None] == a[None, :]) & nmask[None, :]
        if SIM_NORM:
            den += tl.sum(tl.where(hit, s[None, :], 0.0), axis=1)
        else:
            den += tl.sum(hit.to(ACC), axis=1)
    agg = acc / (den + 1.0)[:, None]
    tl.debug_barrier()  # every point has read chat from the agg block
    tl.store(agg_ptr + mc_off, agg, mask=mc_mask)
    tl.store(den_ptr + inst * M + offs_m, den, mask=mmask)
    if RETURN_CENTER:
        # [B, E*C, F2*P2, F3*P3]
        W3 = F3 * P3
        o_hw = F2 * P2 * W3
        o_off = (b.to(tl.int64) * E + e) * C * o_hw + ((f2 * P2 + offs_m // P3) * W3 + f3 * P3 + offs_m % P3)[:, None] \
            + (offs_c * o_hw)[None, :]
        tl.store(out_ptr + o_off, agg.to(out_ptr.dtype.element_ty), mask=mc_mask)
    else:
        # 3) dispatch: out_n = s_n * agg[a_n] (the assignment/similarity written above are re-read).
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=0)
            s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
            o = _gather_rows(agg_blk, M, C, a, nmask, offs_c, cmask) * s[:, None]
            i = offs_n // R3
            j = offs_n % R3
            off = (i * D3 + j)[:, None] + (offs_c * hw)[None, :]
            tl.store((out_ptr + base_out) + off, o.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


@triton.autotune(configs=_configs(), key=["N", "M", "C", "RETURN_CENTER"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _coc_bwd_kernel(x_ptr, v_ptr, g_ptr, alpha_ptr, dx_ptr, dv_ptr, dalpha_ptr, dbeta_ptr,
                    assign_ptr, sim_ptr, cen_ptr, agg_ptr, den_ptr, tmp_ptr, dcos_ptr, dmat_ptr, chat_ptr,
                    SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
                    RETURN_CENTER: tl.constexpr, SIM_NORM: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask = _region_setup(
        pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M, BLOCK_M, BLOCK_C, ACC)
    hw = D2 * D3
    inst = pid.to(tl.int64)
    mc_off = inst * M * C + offs_m[:, None] * C + offs_c[None, :]
    mc_mask = mmask[:, None] & cmask[None, :]
    agg_blk = agg_ptr + inst * M * C
    dmat_blk = dmat_ptr + inst * M * C
    chat_blk = chat_ptr + inst * M * C
    cen = tl.load(cen_ptr + mc_off, mask=mc_mask, other=0.0)
    agg = tl.load(agg_ptr + mc_off, mask=mc_mask, other=0.0)
    den1 = tl.load(den_ptr + inst * M + offs_m, mask=mmask, other=0.0) + 1.0
    chat, cnrm, cden = _normalize_rows(cen, EPS)
    tl.store(chat_ptr + mc_off, chat, mask=mc_mask)
    alpha = tl.load(alpha_ptr).to(ACC)
    # grad of the aggregated centers: D = dL/d(sum + value_center) = dL/dagg / (S + 1)
    if RETURN_CENTER:
        W3 = F3 * P3
        o_hw = F2 * P2 * W3
        o_off = (b.to(tl.int64) * E + e) * C * o_hw + ((f2 * P2 + offs_m // P3) * W3 + f3 * P3 + offs_m % P3)[:, None] \
            + (offs_c * o_hw)[None, :]
        gagg = tl.load(g_ptr + o_off, mask=mc_mask, other=0.0).to(ACC)
    else:
        # pass 1: dagg = sum_{n in m} s_n g_n ; ds_n (dispatch part) = <agg[a_n], g_n>
        gagg = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            gt, _o1, i, j = _load_points(g_ptr, base_out, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
            a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=0)
            s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
            gagg = _add_rows(gagg, gt, a, s, i, j, nmask, offs_m, M, R2, R3, P2, P3, rs, re, cs, ce, inv_area,
                             True, False, ACC, USE_DOT, PRECISION)
            agg_n = _gather_rows(agg_blk, M, C, a, nmask, offs_c, cmask)
            tl.store(tmp_ptr + inst * N + offs_n, tl.sum(agg_n * gt, axis=1), mask=nmask)
    dmat = gagg / den1[:, None]
    tl.store(dmat_ptr + mc_off, dmat, mask=mc_mask)
    # sim normaliser: dL/dS_m = -<dL/dagg_m, agg_m> / (S_m + 1) = -<D_m, agg_m>, added to ds_n for n in m
    rnorm = tl.sum(dmat * agg, axis=1)
    tl.debug_barrier()
    # pass 2a: dv, ds -> dz = ds * s(1-s) (kept in the dcos scratch). Two passes instead of one keep fewer
    # (BLOCK_N, BLOCK_C) tiles live at once (registers; see benchmarks/results/notes/context_cluster_resources.md).
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=0)
        s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        if RETURN_CENTER:
            ds = tl.zeros((BLOCK_N,), dtype=ACC)
        else:
            ds = tl.load(tmp_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        vt, off, i, j = _load_points(v_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        d_n = _gather_rows(dmat_blk, M, C, a, nmask, offs_c, cmask)
        ds += tl.sum(vt * d_n, axis=1)
        if SIM_NORM:
            ds -= _pick(rnorm, a, offs_m)
        dvt = _add_pooled(s[:, None] * d_n, dmat_blk, dmat, i, j, nmask, offs_c, cmask, M, C, R2, R3, P2, P3,
                          rs, re, cs, ce, inv_area, ACC, USE_DOT, PRECISION)
        tl.store((dv_ptr + base) + off, dvt.to(dv_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])
        tl.store(dcos_ptr + inst * N + offs_n, tl.where(nmask, ds * s * (1.0 - s), 0.0), mask=nmask)
    tl.debug_barrier()
    # pass 2b: dz -> dalpha, dbeta, dcos = alpha * dz; dchat accumulated over the region.
    dchat = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    dal = tl.zeros((BLOCK_N,), dtype=ACC)
    dbe = tl.zeros((BLOCK_N,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=0)
        dz = tl.load(dcos_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        xt, _o2, i, j = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        xhat, _n1, _d1 = _normalize_rows(xt, EPS)
        cos = tl.sum(xhat * _gather_rows(chat_blk, M, C, a, nmask, offs_c, cmask), axis=1)
        dal += dz * cos
        dbe += dz
        dchat = _add_rows(dchat, xhat, a, alpha * dz, i, j, nmask, offs_m, M, R2, R3, P2, P3, rs, re, cs, ce,
                          inv_area, True, False, ACC, USE_DOT, PRECISION)
    tl.store(dalpha_ptr + pid, tl.sum(dal, axis=0))
    tl.store(dbeta_ptr + pid, tl.sum(dbe, axis=0))
    # F.normalize backward for the centers, then through the pooling in pass 3 (dcen replaces dmat in scratch).
    cdot = tl.sum(dchat * cen, axis=1)
    ccoef = tl.where(cnrm > EPS, cdot / (cden * cden * tl.maximum(cnrm, EPS)), 0.0)
    dcen = dchat / cden[:, None] - ccoef[:, None] * cen
    tl.debug_barrier()  # every point has read dmat
    tl.store(dmat_ptr + mc_off, dcen, mask=mc_mask)
    tl.debug_barrier()
    # pass 3: dx = normalize-backward(dcos * chat[a]) + pool-backward(dcen)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, off, i, j = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=0)
        dcos = alpha * tl.load(dcos_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        dxhat = dcos[:, None] * _gather_rows(chat_blk, M, C, a, nmask, offs_c, cmask)
        xn = tl.sqrt(tl.sum(xt * xt, axis=1))
        xden = tl.maximum(xn, EPS)
        xdot = tl.sum(dxhat * xt, axis=1)
        dxt = dxhat / xden[:, None] - tl.where(xn > EPS, xdot / (xden * xden * xden), 0.0)[:, None] * xt
        dxt = _add_pooled(dxt, dmat_blk, dcen, i, j, nmask, offs_c, cmask, M, C, R2, R3, P2, P3, rs, re, cs, ce,
                          inv_area, ACC, USE_DOT, PRECISION)
        tl.store((dx_ptr + base) + off, dxt.to(dx_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------- launch


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """Input precision of the tl.dot products (more than 8 centers per region; up to 8 there is no tl.dot):
    "tf32" for fp32 inputs on a GPU when torch allows TF32 for fp32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision() != "highest"``), as
    torch's own matmuls would; "ieee" (exact fp32 products) otherwise and for the fp32 accumulators of half
    inputs."""
    if interpreter_enabled() or dtype != torch.float32:
        return "ieee"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _dims(x: torch.Tensor, heads: int, folds, proposals):
    B, EC, D2, D3 = x.shape
    F2, F3 = folds
    P2, P3 = proposals
    C = EC // heads
    R2, R3 = D2 // F2, D3 // F3
    M = P2 * P3
    return B, C, D2, D3, F2, F3, R2, R3, P2, P3, R2 * R3, M


def launch_meta(dtype: torch.dtype, C: int, M: int, return_center: bool, normalizer: str = "sim") -> dict:
    """The constexprs both kernels are launched with (BLOCK_N and num_warps come from the autotuner): block
    sizes, the product path (loops over up to 8 centers, else tl.dot on tiles padded to 16) and its
    precision, the normaliser."""
    if normalizer not in ("sim", "mask"):
        raise ValueError(f"normalizer must be 'sim' or 'mask', got {normalizer!r}")
    use_dot = M > _SMALL_M
    return dict(RETURN_CENTER=bool(return_center), SIM_NORM=normalizer == "sim", ACC=_acc_dtype(dtype), EPS=_EPS,
                BLOCK_M=max(16, triton.next_power_of_2(M)) if use_dot else triton.next_power_of_2(M),
                BLOCK_C=max(16, triton.next_power_of_2(C)), USE_DOT=use_dot, PRECISION=_precision(dtype))


def _check_layout(*ts: torch.Tensor) -> int:
    """All of ts: same shape/strides, dense (channel stride D2*D3, row stride D3, unit stride); -> batch stride."""
    t0 = ts[0]
    B, EC, D2, D3 = t0.shape
    # the kernels index with these strides; a size-1 dim's stride is never used (torch calls such tensors
    # contiguous whatever that stride is, e.g. a transposed [B, C, 1, W] map), so it is not compared
    want = (t0.stride(0), D2 * D3, D3, 1)
    for t in ts:
        if t.shape != t0.shape or any(n > 1 and s != w for n, s, w in zip(t.shape, t.stride(), want)):
            raise ValueError("context_cluster kernels need dense [B, E*C, D2, D3] tensors with equal strides")
    return t0.stride(0)


def cluster_forward(x, v, alpha, beta, heads: int, folds, proposals, return_center: bool, normalizer: str = "sim"):
    """x, v: [B, heads*C, D2, D3] with dense channel/spatial strides (equal strides; they may be the two
    channel halves of one packed tensor); alpha, beta: [1]. folds = (F2, F3) dividing (D2, D3),
    proposals = (P2, P3), normalizer "sim" (official) or "mask" (pre-2023-05-31). Returns out (contiguous
    [B, heads*C, D2, D3], or [B, heads*C, F2*P2, F3*P3] with return_center) and the saved state
    (assign, sim, cen, agg, den) for :func:`cluster_backward`."""
    sb_in = _check_layout(x, v)
    B, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M = _dims(x, heads, folds, proposals)
    meta = launch_meta(x.dtype, C, M, return_center, normalizer)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_inst = B * heads * F2 * F3
    dev = x.device
    assign = torch.empty(n_inst * N, device=dev, dtype=torch.int32)
    sim = torch.empty(n_inst * N, device=dev, dtype=acc)
    cen = torch.empty(n_inst * M * C, device=dev, dtype=acc)
    agg = torch.empty(n_inst * M * C, device=dev, dtype=acc)
    den = torch.empty(n_inst * M, device=dev, dtype=acc)
    if return_center:
        out = torch.empty(B, heads * C, F2 * P2, F3 * P3, device=dev, dtype=x.dtype)
    else:
        out = torch.empty(B, heads * C, D2, D3, device=dev, dtype=x.dtype)
    record_launch("coc_fwd_kernel")
    _coc_fwd_kernel[(n_inst,)](
        x, v, alpha, beta, out, assign, sim, cen, agg, den,
        sb_in, heads * C * D2 * D3, heads, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M, **meta)
    return out, (assign, sim, cen, agg, den)


def cluster_backward(g, x, v, alpha, saved, heads: int, folds, proposals, return_center: bool, dx=None, dv=None,
                     normalizer: str = "sim"):
    """Gradients (dx, dv, dalpha, dbeta) of :func:`cluster_forward` given g = dL/dout (contiguous, out's
    shape) and the same normalizer. dx/dv may be given (e.g. the halves of one packed buffer; strides as
    x's), else they are allocated like x. dalpha/dbeta are fp32 (fp64 for fp64 inputs) tensors of shape [1]."""
    assign, sim, cen, agg, den = saved
    B, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M = _dims(x, heads, folds, proposals)
    meta = launch_meta(x.dtype, C, M, return_center, normalizer)
    dx = torch.empty_like(x) if dx is None else dx
    dv = torch.empty_like(v) if dv is None else dv
    sb_in = _check_layout(x, v, dx, dv)
    if not g.is_contiguous():
        raise ValueError("context_cluster backward needs a contiguous grad_output")
    n_inst = B * heads * F2 * F3
    dalpha = torch.empty(n_inst, device=x.device, dtype=sim.dtype)
    dbeta = torch.empty(n_inst, device=x.device, dtype=sim.dtype)
    tmp = torch.empty(n_inst * N, device=x.device, dtype=sim.dtype)
    dcos = torch.empty(n_inst * N, device=x.device, dtype=sim.dtype)
    dmat = torch.empty(n_inst * M * C, device=x.device, dtype=sim.dtype)
    chat = torch.empty(n_inst * M * C, device=x.device, dtype=sim.dtype)
    record_launch("coc_bwd_kernel")
    _coc_bwd_kernel[(n_inst,)](
        x, v, g, alpha, dx, dv, dalpha, dbeta, assign, sim, cen, agg, den, tmp, dcos, dmat, chat,
        sb_in, heads * C * D2 * D3, heads, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M, **meta)
    return dx, dv, dalpha.sum().reshape(1), dbeta.sum().reshape(1)
