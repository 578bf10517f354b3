"""Triton kernels for MaskFormer's full-resolution mask losses (bilinear upsample + sigmoid focal + dice), fwd + bwd.

For matched pair t: ``z = bilinear_resize(x[t], (H, W))`` (PyTorch's ``F.interpolate(mode="bilinear",
align_corners=False)``: source index ``max((o + ½)·n_in/n_out − ½, 0)``, lower tap clamped to n_in − 1, upper
tap = lower at the last row/column) and target ``y = tgt[rows[t]]``. Per pixel, as the official criterion
(any target value, not only {0, 1}):

    p = σ(z),  ce = softplus(z) − z·y,  m = 1 − p_t = y·(1 − p) + (1 − y)·p,
    focal = α_t · ce · m^γ  with α_t = α·y + (1 − α)·(1 − y)  (no α_t when α < 0).

``_mask_loss_fwd_kernel`` (grid (T, tiles of BP output pixels)) writes per-tile partial sums
``part[t, tile] = (Σ focal, Σ p·y, Σ p, Σ y)``; the caller reduces them over tiles (a fixed-order torch sum,
deterministic). Nothing of size (T, H, W) is stored.

``_mask_loss_bwd_kernel`` (grid (T, low-res row tiles, low-res column tiles)): given per-pair gradients
``gf, gi, gp`` of ``Σ focal, Σ p·y, Σ p``, the upsampled-logit gradient is
``dz = gf·∂focal/∂z + p(1 − p)·(gi·y + gp)``; the program *owns* a BI × BJ tile of low-res pixels, walks the
output pixels whose bilinear taps reach it (its rows' and columns' source ranges plus a one-pixel margin) in
BO × BO chunks, and contracts ``dx_tile += Wyᵀ · dz · Wx`` with the chunk's 0/λ/(1 − λ) tap matrices
(two fp32 ``tl.dot``, ``input_precision="ieee"``). Every low-res pixel is written once by its owner: no
atomics, deterministic. Output pixels in the halo between tiles are recomputed by both neighbours.

x: (T, h, w) any strides, fp32/fp16/bf16 (fp64 under the interpreter); targets (N, H, W) any strides, uint8
(bool viewed as uint8) or float; rows (T,) int32/int64 target row per pair (a row outside [0, N) is never read:
that pair's sums and gradient are NaN; no host check). Accumulation in fp32 (fp64 for
fp64 logits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

from .upsample_ce import _source

__all__ = ["mask_loss_fwd", "mask_loss_bwd"]

_NOSPEC = ["N", "h", "w", "H", "W", "sxt", "sxh", "sxw", "stn", "sth", "stw", "n_tiles", "n_ti", "n_tj"]


@triton.jit
def _pixel_terms(x, y, alpha, USE_ALPHA: tl.constexpr, GAMMA: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(focal, p, dfocal/dz) per pixel for logits x and targets y (same dtype)."""
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    pos = x >= 0
    p = tl.where(pos, inv, e * inv)
    q = tl.where(pos, e * inv, inv)  # 1 - p without cancellation
    ce = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + e)
    m = y * q + (1.0 - y) * p
    if GAMMA == 2.0:
        mg = m * m
        dmg = 2.0 * m
    elif GAMMA == 0.0:
        mg = tl.full(m.shape, 1.0, m.dtype)
        dmg = tl.zeros(m.shape, m.dtype)
    else:
        lm = tl.log(tl.where(m > 0, m, 1.0))
        mg = tl.where(m > 0, tl.exp(GAMMA * lm), 0.0)
        dmg = tl.where(m > 0, GAMMA * tl.exp((GAMMA - 1.0) * lm), 0.0)
    if USE_ALPHA:
        at = alpha * y + (1.0 - alpha) * (1.0 - y)
    else:
        at = tl.full(m.shape, 1.0, m.dtype)
    focal = at * ce * mg
    if NEED_GRAD:
        s = p * q
        # dm/dz = s·(1 − 2y); dce/dz = p − y
        dfocal = at * ((p - y) * mg + ce * dmg * s * (1.0 - 2.0 * y))
    else:
        dfocal = focal
    return focal, p, dfocal


@triton.jit
def _upsampled(xt, r0, r1, ly, c0, c1, lx, m, ACC: tl.constexpr):
    """Bilinear value at (row taps r0/r1 (element offsets), weight ly) x (column taps c0/c1, weight lx), as
    PyTorch: (1 − ly)·((1 − lx)·v00 + lx·v01) + ly·((1 − lx)·v10 + lx·v11)."""
    v00 = tl.load(xt + r0 + c0, mask=m, other=0.0).to(ACC)
    v01 = tl.load(xt + r0 + c1, mask=m, other=0.0).to(ACC)
    v10 = tl.load(xt + r1 + c0, mask=m, other=0.0).to(ACC)
    v11 = tl.load(xt + r1 + c1, mask=m, other=0.0).to(ACC)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit(do_not_specialize=_NOSPEC)
def _mask_loss_fwd_kernel(x_ptr, t_ptr, rows_ptr, part_ptr, N, h, w, H, W, sxt, sxh, sxw, stn, sth, stw, n_tiles,
                          alpha, USE_ALPHA: tl.constexpr, GAMMA: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr):
    t = tl.program_id(0)
    tile = tl.program_id(1)
    p = tile * BP + tl.arange(0, BP)
    inside = p < H * W
    oy = p // W
    ox = p % W
    y0, y1, ly = _source(oy, h, H, False, ACC)
    x0, x1, lx = _source(ox, w, W, False, ACC)
    xt = x_ptr + t.to(tl.int64) * sxt
    z = _upsampled(xt, y0 * sxh, y1 * sxh, ly, x0 * sxw, x1 * sxw, lx, inside, ACC)
    row = tl.load(rows_ptr + t).to(tl.int64)
    bad = (row < 0) | (row >= N)  # a row outside [0, N): never read, NaN sums
    tt = t_ptr + tl.where(bad, 0, row) * stn
    y = tl.load(tt + oy.to(tl.int64) * sth + ox * stw, mask=inside & ~bad, other=0).to(ACC)
    focal, prob, _ = _pixel_terms(z, y, alpha, USE_ALPHA, GAMMA, False)
    focal = tl.where(inside, focal, 0.0)
    prob = tl.where(inside, prob, 0.0)
    nan = tl.where(bad, float("nan"), 0.0)
    out = part_ptr + (t.to(tl.int64) * n_tiles + tile) * 4
    tl.store(out, tl.sum(focal, 0) + nan)
    tl.store(out + 1, tl.sum(prob * y, 0) + nan)
    tl.store(out + 2, tl.sum(prob, 0) + nan)
    tl.store(out + 3, tl.sum(y, 0) + nan)


@triton.jit
def _out_range(a, n_tile, n_in, n_out):
    """Output indices [lo, hi] whose bilinear taps (align_corners=False) can reach input indices
    [a, a + n_tile), with one index of margin each side (the taps themselves decide the weights)."""
    lo_num = tl.maximum((2 * a - 1) * n_out - n_in, 0)
    lo = tl.maximum((lo_num + 2 * n_in - 1) // (2 * n_in) - 1, 0)
    hi_num = (2 * (a + n_tile) + 1) * n_out - n_in
    hi = tl.minimum((hi_num + 2 * n_in - 1) // (2 * n_in), n_out - 1)
    hi = tl.where(a + n_tile >= n_in, n_out - 1, hi)
    return lo, hi


@triton.jit
def _taps(o, lo_valid, hi_valid, idx, n_in, n_out, ACC: tl.constexpr):
    """(BO, BN) matrix of the bilinear weights of output indices o onto input indices idx (0 outside)."""
    i0, i1, lam = _source(o, n_in, n_out, False, ACC)
    valid = (o >= lo_valid) & (o <= hi_valid)
    w0 = tl.where(valid, 1.0 - lam, 0.0)
    w1 = tl.where(valid, lam, 0.0)
    return (tl.where(i0[:, None] == idx[None, :], w0[:, None], 0.0)
            + tl.where(i1[:, None] == idx[None, :], w1[:, None], 0.0)), i0, i1, lam, valid


@triton.jit(do_not_specialize=_NOSPEC)
def _mask_loss_bwd_kernel(x_ptr, t_ptr, rows_ptr, g_ptr, dx_ptr, N, h, w, H, W, sxt, sxh, sxw, stn, sth, stw,
                          n_ti, n_tj, alpha, USE_ALPHA: tl.constexpr, GAMMA: tl.constexpr, ACC: tl.constexpr,
                          BI: tl.constexpr, BJ: tl.constexpr, BO: tl.constexpr):
    t = tl.program_id(0)
    a = tl.program_id(1) * BI
    c = tl.program_id(2) * BJ
    ii = a + tl.arange(0, BI)
    jj = c + tl.arange(0, BJ)
    oy_lo, oy_hi = _out_range(a, BI, h, H)
    ox_lo, ox_hi = _out_range(c, BJ, w, W)
    xt = x_ptr + t.to(tl.int64) * sxt
    row = tl.load(rows_ptr + t).to(tl.int64)
    bad = (row < 0) | (row >= N)  # a row outside [0, N): never read, NaN gradient
    tt = t_ptr + tl.where(bad, 0, row) * stn
    gf = tl.load(g_ptr + t * 3).to(ACC) + tl.where(bad, float("nan"), 0.0)
    gi = tl.load(g_ptr + t * 3 + 1).to(ACC)
    gp = tl.load(g_ptr + t * 3 + 2).to(ACC)
    acc = tl.zeros([BI, BJ], ACC)
    for oy0 in range(oy_lo, oy_hi + 1, BO):
        oy = oy0 + tl.arange(0, BO)
        wy, y0, y1, ly, vy = _taps(oy, oy_lo, oy_hi, ii, h, H, ACC)
        for ox0 in range(ox_lo, ox_hi + 1, BO):
            ox = ox0 + tl.arange(0, BO)
            wx, x0, x1, lx, vx = _taps(ox, ox_lo, ox_hi, jj, w, W, ACC)
            m = vy[:, None] & vx[None, :]
            z = _upsampled(xt, (y0 * sxh)[:, None], (y1 * sxh)[:, None], ly[:, None], (x0 * sxw)[None, :],
                           (x1 * sxw)[None, :], lx[None, :], m, ACC)
            y = tl.load(tt + oy.to(tl.int64)[:, None] * sth + ox[None, :] * stw, mask=m & ~bad, other=0).to(ACC)
            _, prob, dfocal = _pixel_terms(z, y, alpha, USE_ALPHA, GAMMA, True)
            dz = gf * dfocal + prob * (1.0 - prob) * (gi * y + gp)
            dz = tl.where(m, dz, 0.0)
            tmp = tl.dot(dz, wx, input_precision="ieee")  # (BO, BJ)
            acc += tl.dot(tl.trans(wy), tmp, input_precision="ieee")  # (BI, BJ)
    out = dx_ptr + t.to(tl.int64) * h * w + ii[:, None] * w + jj[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(ii[:, None] < h) & (jj[None, :] < w))


def _acc(x):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


#: interpreter block sizes (few, large programs: the interpreter's cost is per op); tests shrink them to
#: cover several tiles, halos and chunks
INTERPRETER_BLOCKS = {"BP": 4096, "BI": 32, "BJ": 32, "BO": 64}


def _fwd_block(HW: int) -> int:
    # sm_90 (ptxas, 4 warps, BP=1024): 77 registers (bf16) / 78 (fp32), 0 spills. Not tuned on a GPU.
    cap = INTERPRETER_BLOCKS["BP"] if interpreter_enabled() else 1024
    return min(triton.next_power_of_2(max(HW, 16)), cap)


def _bwd_blocks():
    """(BI, BJ, BO, num_stages). sm_90 (ptxas, 4 warps, 128x256 -> 512x1024): 128 registers, 0 spills in bf16
    and fp32 (num_stages=1; the default 3 pipelines the gathers and spills in fp32). Not tuned on a GPU."""
    if interpreter_enabled():
        b = INTERPRETER_BLOCKS
        return b["BI"], b["BJ"], b["BO"], 1
    return 32, 32, 16, 1


def _target_view(targets: torch.Tensor) -> torch.Tensor:
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def mask_loss_fwd(x, targets, rows, alpha: float, gamma: float):
    """Per-pair sums (T, 4) = (Σ focal, Σ σ(z)·y, Σ σ(z), Σ y) in the accumulation dtype."""
    T, h, w = x.shape
    H, W = targets.shape[1:]
    acc_tl, acc_t = _acc(x)
    BP = _fwd_block(H * W)
    n_tiles = triton.cdiv(H * W, BP)
    part = torch.empty(T, n_tiles, 4, dtype=acc_t, device=x.device)
    tg = _target_view(targets)
    record_launch("mask_loss_fwd")
    _mask_loss_fwd_kernel[(T, n_tiles)](x, tg, rows, part, tg.shape[0], h, w, H, W, *x.stride(), *tg.stride(), n_tiles,
                                        float(alpha), USE_ALPHA=alpha >= 0, GAMMA=float(gamma), ACC=acc_tl, BP=BP,
                                        num_warps=4)
    return part.sum(1)


def mask_loss_bwd(x, targets, rows, g, alpha: float, gamma: float, out_dtype=None):
    """dx (T, h, w) contiguous in ``out_dtype`` (default x's dtype); g (T, 3) contiguous = gradients of
    (Σ focal, Σ σ·y, Σ σ) per pair, in the accumulation dtype."""
    T, h, w = x.shape
    H, W = targets.shape[1:]
    acc_tl, _ = _acc(x)
    BI, BJ, BO, stages = _bwd_blocks()
    n_ti, n_tj = triton.cdiv(h, BI), triton.cdiv(w, BJ)
    dx = torch.empty(T, h, w, dtype=out_dtype or x.dtype, device=x.device)
    tg = _target_view(targets)
    record_launch("mask_loss_bwd")
    _mask_loss_bwd_kernel[(T, n_ti, n_tj)](x, tg, rows, g, dx, tg.shape[0], h, w, H, W, *x.stride(), *tg.stride(), n_ti,
                                           n_tj, float(alpha), USE_ALPHA=alpha >= 0, GAMMA=float(gamma), ACC=acc_tl,
                                           BI=BI, BJ=BJ, BO=BO, num_warps=4, num_stages=stages)
    return dx
