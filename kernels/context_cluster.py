"""Context Clusters: fused center proposal, cosine similarity, sigmoid, argmax assignment, aggregation and
dispatch (forward and backward) as Triton kernels.

One program per (batch, head, region): it holds the M = P2*P3 centers of its region as an (M, C) register tile
and streams the region's N = R2*R3 points in chunks of BLOCK_N, so neither the (b, M, N) similarity nor
anything of size (b, M, N, C) is ever stored. Per point only the assignment (int32) and its similarity are
kept for backward; per region the pooled centers, the aggregated centers and the cluster sizes.

Tensors: x (similarity features) and v (values) are [B, E*C, D2, D3] (outputs of the 1x1 convs ``f`` and
``v``; E heads of C channels), dense apart from the batch stride (so they may be the two channel halves of
one packed conv output); the regions are the F2 x F3 tiles of size R2 x R3; centers are the
adaptive average pools (PyTorch's bins) of a region to P2 x P3. Output: [B, E*C, D2, D3], or with
``return_center`` [B, E*C, F2*P2, F3*P3]. fp32/fp16/bf16 (fp64 too) inputs, accumulation in fp32 (fp64 for
fp64 inputs). The small (M, N_chunk) x (N_chunk, C) products are register broadcast-sums for M <= 8 and
``tl.dot`` in IEEE precision on zero-padded tiles beyond; gathers of per-center rows for the points
(agg[a_n], center[a_n], dL/dagg[a_n]) are loads from the program's small, L1-resident scratch block.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["cluster_forward", "cluster_backward"]

_EPS = 1e-12  # F.normalize's eps
_SMALL_M = 8  # centers per region up to which the small products avoid tl.dot


def _configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":  # one config (quick GPU test runs)
        return [triton.Config({"BLOCK_N": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((32, 2), (64, 2), (64, 4), (128, 4))]


@triton.jit
def _region_setup(pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Decode the program's (b, e, f2, f3), its region's base offsets in the inputs (batch stride SB_IN) and
    in out/grad-out (batch stride SB_OUT), and the pooling bins."""
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
    pi = offs_m // P3
    pj = offs_m % P3
    rs = (pi * R2) // P2
    re = ((pi + 1) * R2 + P2 - 1) // P2
    cs = (pj * R3) // P3
    ce = ((pj + 1) * R3 + P3 - 1) // P3
    area = tl.where(mmask, (re - rs) * (ce - cs), 1)
    inv_area = tl.where(mmask, 1.0 / area.to(ACC), 0.0)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    return b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask


@triton.jit
def _load_points(ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_C) tile of the region's points offs_n (row-major over the R2 x R3 region)."""
    i = offs_n // R3
    j = offs_n % R3
    off = base + (i * D3 + j)[:, None] + (offs_c * hw)[None, :]
    return tl.load(ptr + off, mask=nmask[:, None] & cmask[None, :], other=0.0).to(ACC), off


@triton.jit
def _pool_weights_nm(offs_n, nmask, R3, rs, re, cs, ce, inv_area):
    """(BLOCK_N, BLOCK_M): 1/|bin m| where point n lies in pooling bin m, else 0."""
    i = offs_n // R3
    j = offs_n % R3
    inside = (i[:, None] >= rs[None, :]) & (i[:, None] < re[None, :]) & (j[:, None] >= cs[None, :]) \
        & (j[:, None] < ce[None, :]) & nmask[:, None]
    return tl.where(inside, inv_area[None, :], 0.0)


@triton.jit
def _pool_weights_mn(offs_n, nmask, R3, rs, re, cs, ce, inv_area):
    """(BLOCK_M, BLOCK_N): transpose of :func:`_pool_weights_nm`."""
    i = offs_n // R3
    j = offs_n % R3
    inside = (i[None, :] >= rs[:, None]) & (i[None, :] < re[:, None]) & (j[None, :] >= cs[:, None]) \
        & (j[None, :] < ce[:, None]) & nmask[None, :]
    return tl.where(inside, inv_area[:, None], 0.0)


@triton.jit
def _normalize_rows(t, EPS: tl.constexpr):
    nrm = tl.sqrt(tl.sum(t * t, axis=1))
    den = tl.maximum(nrm, EPS)
    return t / den[:, None], nrm, den


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    """a @ b for small tiles: tl.dot (IEEE fp32) when the center tile is large, else a register broadcast-sum
    (no padding of M to 16 and no shared-memory layout round trip)."""
    if USE_DOT:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _gather_rows(ptr, inst, M, C, a, nmask, offs_c, cmask):
    """(BLOCK_N, BLOCK_C) rows a_n of the program's [M, C] scratch block (L1-resident)."""
    return tl.load(ptr + inst * M * C + a[:, None] * C + offs_c[None, :], mask=nmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _pooled_centers(x_ptr, base, N, R3, D3, hw, offs_c, cmask, rs, re, cs, ce, inv_area,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                    USE_DOT: tl.constexpr):
    cen = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, _unused1 = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        wt = _pool_weights_mn(offs_n, nmask, R3, rs, re, cs, ce, inv_area).to(ACC)
        cen += _mm(wt, xt, USE_DOT, ACC)
    return cen


@triton.autotune(configs=_configs(), key=["N", "M", "C", "RETURN_CENTER"])
@triton.jit
def _coc_fwd_kernel(x_ptr, v_ptr, alpha_ptr, beta_ptr, out_ptr,
                    assign_ptr, sim_ptr, cen_ptr, agg_ptr, cnt_ptr,
                    SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
                    RETURN_CENTER: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0)
    b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask = _region_setup(
        pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M, BLOCK_M, BLOCK_C, ACC)
    hw = D2 * D3
    inst = pid.to(tl.int64)
    # 1) center proposal: adaptive average pooling of the region's points.
    cen = _pooled_centers(x_ptr, base, N, R3, D3, hw, offs_c, cmask, rs, re, cs, ce, inv_area,
                          BLOCK_N, BLOCK_M, BLOCK_C, ACC, USE_DOT)
    chat, _unused2, _unused3 = _normalize_rows(cen, EPS)
    alpha = tl.load(alpha_ptr).to(ACC)
    beta = tl.load(beta_ptr).to(ACC)
    # 2) similarity, sigmoid, argmax (first index on ties) and aggregation (+ the pooled value centers).
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    cnt = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, _unused4 = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        vt, _unused5 = _load_points(v_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        xhat, _unused6, _unused7 = _normalize_rows(xt, EPS)
        cos = _mm(xhat, tl.trans(chat), USE_DOT, ACC)  # (BLOCK_N, BLOCK_M)
        s = 1.0 / (1.0 + tl.exp(-(beta + alpha * cos)))
        s = tl.where(mmask[None, :], s, -1.0)
        smax = tl.max(s, axis=1)
        a = tl.min(tl.where(s == smax[:, None], offs_m[None, :], BLOCK_M), axis=1)
        # torch.max treats NaN as the maximum (first NaN wins); tl.max may not, and a row without a match
        # must never index past the program's M centers (no out-of-bounds gathers below).
        a_nan = tl.min(tl.where(s != s, offs_m[None, :], BLOCK_M), axis=1)
        a = tl.minimum(tl.where(a_nan < BLOCK_M, a_nan, a), M - 1)
        smax = tl.sum(tl.where(offs_m[None, :] == a[:, None], s, 0.0), axis=1)
        tl.store(assign_ptr + inst * N + offs_n, a, mask=nmask)
        tl.store(sim_ptr + inst * N + offs_n, smax, mask=nmask)
        onehot = (offs_m[:, None] == a[None, :]) & nmask[None, :]  # (BLOCK_M, BLOCK_N)
        p = tl.where(onehot, smax[None, :], 0.0) + _pool_weights_mn(offs_n, nmask, R3, rs, re, cs, ce, inv_area)
        acc += _mm(p.to(ACC), vt, USE_DOT, ACC)
        cnt += tl.sum(onehot.to(ACC), axis=1)
    agg = acc / (cnt + 1.0)[:, None]
    mc_off = inst * M * C + offs_m[:, None] * C + offs_c[None, :]
    mc_mask = mmask[:, None] & cmask[None, :]
    tl.store(cen_ptr + mc_off, cen, mask=mc_mask)
    tl.store(agg_ptr + mc_off, agg, mask=mc_mask)
    tl.store(cnt_ptr + inst * M + offs_m, cnt, mask=mmask)
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
            a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=BLOCK_M)
            s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
            o = _gather_rows(agg_ptr, inst, M, C, a, nmask, offs_c, cmask) * s[:, None]
            i = offs_n // R3
            j = offs_n % R3
            off = base_out + (i * D3 + j)[:, None] + (offs_c * hw)[None, :]
            tl.store(out_ptr + off, o.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


@triton.autotune(configs=_configs(), key=["N", "M", "C", "RETURN_CENTER"])
@triton.jit
def _coc_bwd_kernel(x_ptr, v_ptr, g_ptr, alpha_ptr, dx_ptr, dv_ptr, dalpha_ptr, dbeta_ptr,
                    assign_ptr, sim_ptr, cen_ptr, agg_ptr, cnt_ptr, tmp_ptr, dcos_ptr, dmat_ptr,
                    SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
                    RETURN_CENTER: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0)
    b, e, f2, f3, base, base_out, offs_m, mmask, rs, re, cs, ce, inv_area, offs_c, cmask = _region_setup(
        pid, SB_IN, SB_OUT, E, C, D2, D3, F2, F3, R2, R3, P2, P3, M, BLOCK_M, BLOCK_C, ACC)
    hw = D2 * D3
    inst = pid.to(tl.int64)
    mc_off = inst * M * C + offs_m[:, None] * C + offs_c[None, :]
    mc_mask = mmask[:, None] & cmask[None, :]
    cen = tl.load(cen_ptr + mc_off, mask=mc_mask, other=0.0)
    agg = tl.load(agg_ptr + mc_off, mask=mc_mask, other=0.0)
    cnt = tl.load(cnt_ptr + inst * M + offs_m, mask=mmask, other=0.0)
    _unused8, cnrm, cden = _normalize_rows(cen, EPS)
    alpha = tl.load(alpha_ptr).to(ACC)
    # grad of the aggregated centers: D = dL/d(sum + value_center) = dL/dagg / (cnt + 1)
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
            gt, _unused9 = _load_points(g_ptr, base_out, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
            a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=BLOCK_M)
            s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
            p = tl.where(offs_m[:, None] == a[None, :], s[None, :], 0.0).to(ACC)  # (BLOCK_M, BLOCK_N)
            gagg += _mm(p, gt, USE_DOT, ACC)
            agg_n = _gather_rows(agg_ptr, inst, M, C, a, nmask, offs_c, cmask)
            tl.store(tmp_ptr + inst * N + offs_n, tl.sum(agg_n * gt, axis=1), mask=nmask)
        tl.debug_barrier()
    dmat = gagg / (cnt + 1.0)[:, None]
    tl.store(dmat_ptr + mc_off, dmat, mask=mc_mask)
    tl.debug_barrier()
    # pass 2: dv, ds -> dz = ds * s(1-s) -> dalpha, dbeta, dcos; dchat accumulated over the region.
    dchat = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    dal = tl.zeros((BLOCK_N,), dtype=ACC)
    dbe = tl.zeros((BLOCK_N,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, off = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        vt, _unused10 = _load_points(v_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=BLOCK_M)
        s = tl.load(sim_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        if RETURN_CENTER:
            ds = tl.zeros((BLOCK_N,), dtype=ACC)
        else:
            ds = tl.load(tmp_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        onehot = tl.where(a[:, None] == offs_m[None, :], 1.0, 0.0).to(ACC)  # (BLOCK_N, BLOCK_M)
        q = onehot * s[:, None] + _pool_weights_nm(offs_n, nmask, R3, rs, re, cs, ce, inv_area).to(ACC)
        dvt = _mm(q, dmat, USE_DOT, ACC)
        tl.store(dv_ptr + off, dvt.to(dv_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])
        d_n = _gather_rows(dmat_ptr, inst, M, C, a, nmask, offs_c, cmask)
        ds += tl.sum(vt * d_n, axis=1)
        dz = tl.where(nmask, ds * s * (1.0 - s), 0.0)
        xhat, _unused11, _unused12 = _normalize_rows(xt, EPS)
        chat_n, _unused13, _unused14 = _normalize_rows(_gather_rows(cen_ptr, inst, M, C, a, nmask, offs_c, cmask), EPS)
        cos = tl.sum(xhat * chat_n, axis=1)
        dal += dz * cos
        dbe += dz
        dcos = alpha * dz
        tl.store(dcos_ptr + inst * N + offs_n, dcos, mask=nmask)
        pc = tl.where(offs_m[:, None] == a[None, :], dcos[None, :], 0.0).to(ACC)  # (BLOCK_M, BLOCK_N)
        dchat += _mm(pc, xhat, USE_DOT, ACC)
    tl.store(dalpha_ptr + pid, tl.sum(dal, axis=0))
    tl.store(dbeta_ptr + pid, tl.sum(dbe, axis=0))
    # F.normalize backward for the centers, then through the pooling in pass 3.
    cdot = tl.sum(dchat * cen, axis=1)
    ccoef = tl.where(cnrm > EPS, cdot / (cden * cden * tl.maximum(cnrm, EPS)), 0.0)
    dcen = dchat / cden[:, None] - ccoef[:, None] * cen
    tl.debug_barrier()
    # pass 3: dx = normalize-backward(dcos * chat[a]) + pool-backward(dcen)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        xt, off = _load_points(x_ptr, base, offs_n, nmask, offs_c, cmask, R3, D3, hw, ACC)
        a = tl.load(assign_ptr + inst * N + offs_n, mask=nmask, other=BLOCK_M)
        dcos = tl.load(dcos_ptr + inst * N + offs_n, mask=nmask, other=0.0)
        chat_n, _unused15, _unused16 = _normalize_rows(_gather_rows(cen_ptr, inst, M, C, a, nmask, offs_c, cmask), EPS)
        dxhat = dcos[:, None] * chat_n
        xn = tl.sqrt(tl.sum(xt * xt, axis=1))
        xden = tl.maximum(xn, EPS)
        xdot = tl.sum(dxhat * xt, axis=1)
        dxt = dxhat / xden[:, None] - tl.where(xn > EPS, xdot / (xden * xden * xden), 0.0)[:, None] * xt
        wnm = _pool_weights_nm(offs_n, nmask, R3, rs, re, cs, ce, inv_area).to(ACC)
        dxt += _mm(wnm, dcen, USE_DOT, ACC)
        tl.store(dx_ptr + off, dxt.to(dx_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dims(x: torch.Tensor, heads: int, folds, proposals):
    B, EC, D2, D3 = x.shape
    F2, F3 = folds
    P2, P3 = proposals
    C = EC // heads
    R2, R3 = D2 // F2, D3 // F3
    M = P2 * P3
    return B, C, D2, D3, F2, F3, R2, R3, P2, P3, R2 * R3, M


def _blocks(C: int, M: int):
    """BLOCK_M, BLOCK_C, USE_DOT: up to 8 centers the products are register broadcast-sums over the exact
    (power-of-2) center count; more centers use tl.dot, whose tiles are padded to 16."""
    if M <= _SMALL_M:
        return triton.next_power_of_2(M), max(16, triton.next_power_of_2(C)), False
    return max(16, triton.next_power_of_2(M)), max(16, triton.next_power_of_2(C)), True


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


def cluster_forward(x, v, alpha, beta, heads: int, folds, proposals, return_center: bool):
    """x, v: [B, heads*C, D2, D3] with dense channel/spatial strides (equal strides; they may be the two
    channel halves of one packed tensor); alpha, beta: [1]. folds = (F2, F3) dividing (D2, D3),
    proposals = (P2, P3). Returns out (contiguous [B, heads*C, D2, D3], or [B, heads*C, F2*P2, F3*P3] with
    return_center) and the saved state (assign, sim, cen, agg, cnt) for :func:`cluster_backward`."""
    sb_in = _check_layout(x, v)
    B, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M = _dims(x, heads, folds, proposals)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_inst = B * heads * F2 * F3
    dev = x.device
    assign = torch.empty(n_inst * N, device=dev, dtype=torch.int32)
    sim = torch.empty(n_inst * N, device=dev, dtype=acc)
    cen = torch.empty(n_inst * M * C, device=dev, dtype=acc)
    agg = torch.empty(n_inst * M * C, device=dev, dtype=acc)
    cnt = torch.empty(n_inst * M, device=dev, dtype=acc)
    if return_center:
        out = torch.empty(B, heads * C, F2 * P2, F3 * P3, device=dev, dtype=x.dtype)
    else:
        out = torch.empty(B, heads * C, D2, D3, device=dev, dtype=x.dtype)
    BLOCK_M, BLOCK_C, USE_DOT = _blocks(C, M)
    record_launch("coc_fwd_kernel")
    _coc_fwd_kernel[(n_inst,)](
        x, v, alpha, beta, out, assign, sim, cen, agg, cnt,
        sb_in, heads * C * D2 * D3, heads, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
        RETURN_CENTER=return_center, ACC=_acc_dtype(x.dtype), EPS=_EPS, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
        USE_DOT=USE_DOT)
    return out, (assign, sim, cen, agg, cnt)


def cluster_backward(g, x, v, alpha, saved, heads: int, folds, proposals, return_center: bool, dx=None, dv=None):
    """Gradients (dx, dv, dalpha, dbeta) of :func:`cluster_forward` given g = dL/dout (contiguous, out's
    shape). dx/dv may be given (e.g. the halves of one packed buffer; strides as x's), else they are
    allocated like x. dalpha/dbeta are fp32 (fp64 for fp64 inputs) tensors of shape [1]."""
    assign, sim, cen, agg, cnt = saved
    B, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M = _dims(x, heads, folds, proposals)
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
    BLOCK_M, BLOCK_C, USE_DOT = _blocks(C, M)
    record_launch("coc_bwd_kernel")
    _coc_bwd_kernel[(n_inst,)](
        x, v, g, alpha, dx, dv, dalpha, dbeta, assign, sim, cen, agg, cnt, tmp, dcos, dmat,
        sb_in, heads * C * D2 * D3, heads, C, D2, D3, F2, F3, R2, R3, P2, P3, N, M,
        RETURN_CENTER=return_center, ACC=_acc_dtype(x.dtype), EPS=_EPS, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
        USE_DOT=USE_DOT)
    return dx, dv, dalpha.sum().reshape(1), dbeta.sum().reshape(1)
