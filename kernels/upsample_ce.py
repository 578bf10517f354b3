"""Triton kernels for a bilinear upsample fused with per-pixel cross-entropy, forward + backward.

``loss[b, p] = logsumexp_k z[b, k, p] − z[b, t_p, p]`` with ``z = bilinear_resize(x, (H, W))`` (PyTorch's
``F.interpolate(mode="bilinear")`` index and weight rules, ``align_corners`` either way), 0 where
``t_p == ignore_index``, NaN (loss and the gradient it sends back) where ``t_p`` is neither ``ignore_index`` nor
in [0, K) (the kernels never index with it; no host check). The (B, K, H, W) upsampled logits are never stored.

x: (B, K, h, w) any strides, fp32/fp16/bf16 (fp64 under the interpreter); target (B, H, W) int64.
* ``_upce_fwd_kernel``: one block = BP output pixels of one image; loops over classes in chunks of BK,
  interpolating the 4 neighbours, with an online logsumexp; stores loss and lse (accumulation dtype).
* ``_upce_bwd_kernel``: recomputes z, ``dz = g · (softmax(z) − onehot(t))`` and scatters ``dz`` times the 4
  bilinear weights into dx (accumulation dtype) with atomic adds (like PyTorch's CUDA upsample backward:
  the summation order is not deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["upsample_ce_fwd", "upsample_ce_bwd"]

_NOSPEC = ["K", "h", "w", "H", "W", "sxb", "sxk", "sxh", "sxw", "n_pb"]


@triton.jit
def _source(o, n_in, n_out, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """PyTorch's area_pixel_compute_source_index + guard_index_and_lambda for one axis, from the exact ratio
    (align_corners: o·(n_in − 1)/(n_out − 1); else max((o + ½)·n_in/n_out − ½, 0))."""
    if ALIGN:
        src = (o * (n_in - 1)).to(ACC) / tl.maximum(n_out - 1, 1).to(ACC)
    else:
        src = tl.maximum(((2 * o + 1) * n_in - n_out).to(ACC) / (2 * n_out).to(ACC), 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _pixels(pid, n_pb, h, w, H, W, ALIGN: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr):
    b = pid // n_pb
    p = (pid % n_pb) * BP + tl.arange(0, BP)
    inside = p < H * W
    oy = p // W
    ox = p % W
    y0, y1, ly = _source(oy, h, H, ALIGN, ACC)
    x0, x1, lx = _source(ox, w, W, ALIGN, ACC)
    return b, p, inside, y0, y1, ly, x0, x1, lx


@triton.jit
def _interp(xb, kk, sxk, sxh, sxw, y0, y1, ly, x0, x1, lx, m, ACC: tl.constexpr):
    """z[p, k] for a (BP, BK) tile: h0λ·(w0λ·v00 + w1λ·v01) + h1λ·(w0λ·v10 + w1λ·v11), as PyTorch."""
    kof = kk.to(tl.int64)[None, :] * sxk
    r0 = (y0 * sxh)[:, None]
    r1 = (y1 * sxh)[:, None]
    c0 = (x0 * sxw)[:, None]
    c1 = (x1 * sxw)[:, None]
    v00 = tl.load(xb + kof + r0 + c0, mask=m, other=0.0).to(ACC)
    v01 = tl.load(xb + kof + r0 + c1, mask=m, other=0.0).to(ACC)
    v10 = tl.load(xb + kof + r1 + c0, mask=m, other=0.0).to(ACC)
    v11 = tl.load(xb + kof + r1 + c1, mask=m, other=0.0).to(ACC)
    lyc = ly[:, None]
    lxc = lx[:, None]
    return (1.0 - lyc) * ((1.0 - lxc) * v00 + lxc * v01) + lyc * ((1.0 - lxc) * v10 + lxc * v11)


@triton.jit(do_not_specialize=_NOSPEC)
def _upce_fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, K, h, w, H, W, sxb, sxk, sxh, sxw, n_pb, ignore_index,
                     ALIGN: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    b, p, inside, y0, y1, ly, x0, x1, lx = _pixels(pid, n_pb, h, w, H, W, ALIGN, ACC, BP)
    t64 = tl.load(t_ptr + b.to(tl.int64) * H * W + p, mask=inside, other=0)
    bad = (t64 != ignore_index) & ((t64 < 0) | (t64 >= K))  # compared in int64: no wrap-around into [0, K)
    t = t64.to(tl.int32)
    xb = x_ptr + b.to(tl.int64) * sxb
    mx = tl.full([BP], float("-inf"), ACC)
    s = tl.zeros([BP], ACC)
    zt = tl.zeros([BP], ACC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = inside[:, None] & (kk < K)[None, :]
        z = _interp(xb, kk, sxk, sxh, sxw, y0, y1, ly, x0, x1, lx, m, ACC)
        z = tl.where(m, z, float("-inf"))
        new = tl.maximum(mx, tl.max(z, 1))
        new = tl.where(inside, new, 0.0)
        s = s * tl.exp(mx - new) + tl.sum(tl.exp(z - new[:, None]), 1)
        mx = new
        zt += tl.sum(tl.where(kk[None, :] == t[:, None], z, 0.0), 1)
    lse = tl.where(inside, mx + tl.log(tl.where(inside, s, 1.0)), 0.0)
    keep = inside & (t != ignore_index)
    out = b.to(tl.int64) * H * W + p
    loss = tl.where(keep, lse - zt, 0.0)
    tl.store(loss_ptr + out, tl.where(bad, float("nan"), loss), mask=inside)  # a label outside [0, K): NaN
    tl.store(lse_ptr + out, lse, mask=inside)


@triton.jit(do_not_specialize=_NOSPEC)
def _upce_bwd_kernel(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, K, h, w, H, W, sxb, sxk, sxh, sxw, n_pb, ignore_index,
                     ALIGN: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    b, p, inside, y0, y1, ly, x0, x1, lx = _pixels(pid, n_pb, h, w, H, W, ALIGN, ACC, BP)
    out = b.to(tl.int64) * H * W + p
    t64 = tl.load(t_ptr + out, mask=inside, other=0)
    bad = (t64 != ignore_index) & ((t64 < 0) | (t64 >= K))
    t = t64.to(tl.int32)
    keep = inside & (t64 != ignore_index)
    lse = tl.load(lse_ptr + out, mask=inside, other=0.0)
    g = tl.load(g_ptr + out, mask=keep, other=0.0).to(ACC)
    g = tl.where(bad, float("nan"), g)  # a label outside [0, K): NaN gradient at its 4 source pixels
    xb = x_ptr + b.to(tl.int64) * sxb
    # dx is contiguous (B, K, h, w)
    db = dx_ptr + b.to(tl.int64) * K * h * w
    lyc = ly[:, None]
    lxc = lx[:, None]
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = keep[:, None] & (kk < K)[None, :]
        z = _interp(xb, kk, sxk, sxh, sxw, y0, y1, ly, x0, x1, lx, m, ACC)
        dz = g[:, None] * (tl.exp(z - lse[:, None]) - tl.where(kk[None, :] == t[:, None], 1.0, 0.0))
        kof = kk.to(tl.int64)[None, :] * h * w
        r0 = (y0 * w)[:, None]
        r1 = (y1 * w)[:, None]
        c0 = x0[:, None]
        c1 = x1[:, None]
        tl.atomic_add(db + kof + r0 + c0, dz * (1.0 - lyc) * (1.0 - lxc), mask=m, sem="relaxed")
        tl.atomic_add(db + kof + r0 + c1, dz * (1.0 - lyc) * lxc, mask=m, sem="relaxed")
        tl.atomic_add(db + kof + r1 + c0, dz * lyc * (1.0 - lxc), mask=m, sem="relaxed")
        tl.atomic_add(db + kof + r1 + c1, dz * lyc * lxc, mask=m, sem="relaxed")


def _acc(x):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _blocks(K, HW, bwd: bool):
    if interpreter_enabled():
        return min(triton.next_power_of_2(HW), 128), min(triton.next_power_of_2(K), 64)
    # sm_90 (ptxas, bf16 logits): fwd 64x32 111 registers, bwd 64x16 134 registers, no spills; not tuned on a GPU
    return 64, min(triton.next_power_of_2(K), 16 if bwd else 32)


def upsample_ce_fwd(x, target, align_corners: bool, ignore_index: int):
    """(loss, lse), each (B, H, W) in the accumulation dtype; target (B, H, W) int64 (contiguous)."""
    B, K, h, w = x.shape
    H, W = target.shape[1:]
    acc_tl, acc_t = _acc(x)
    BP, BK = _blocks(K, H * W, False)
    n_pb = triton.cdiv(H * W, BP)
    loss = torch.empty(B, H, W, dtype=acc_t, device=x.device)
    lse = torch.empty_like(loss)
    record_launch("upsample_ce_fwd")
    _upce_fwd_kernel[(B * n_pb,)](x, target, loss, lse, K, h, w, H, W, *x.stride(), n_pb, ignore_index,
                                  ALIGN=bool(align_corners), ACC=acc_tl, BP=BP, BK=BK, num_warps=4)
    return loss, lse


def upsample_ce_bwd(x, target, lse, grad, align_corners: bool, ignore_index: int):
    """dx (B, K, h, w) contiguous in the accumulation dtype; grad (B, H, W) of the per-pixel loss."""
    B, K, h, w = x.shape
    H, W = target.shape[1:]
    acc_tl, acc_t = _acc(x)
    BP, BK = _blocks(K, H * W, True)
    n_pb = triton.cdiv(H * W, BP)
    dx = torch.zeros(B, K, h, w, dtype=acc_t, device=x.device)
    record_launch("upsample_ce_bwd")
    _upce_bwd_kernel[(B * n_pb,)](x, target, lse, grad, dx, K, h, w, H, W, *x.stride(), n_pb, ignore_index,
                                  ALIGN=bool(align_corners), ACC=acc_tl, BP=BP, BK=BK, num_warps=4)
    return dx
