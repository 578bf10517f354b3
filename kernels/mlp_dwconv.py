"""Triton kernels for MSCAN's MLP middle: y = GELU(depthwise 3x3 conv(x) + b) (exact erf GELU), fwd + bwd.

x: (N, C, H, W) NCHW or channels_last strides, fp32/fp16/bf16 (fp64 under the interpreter); weight (C, 9) and
bias (C,) in the accumulation dtype (fp32, fp64 for fp64 x). Blocks are (BC channels, BP pixels of one image).
* ``_dwgelu_fwd_kernel``: 9 shifted loads, bias, GELU, store (the pre-activation is not kept).
* ``_dwgelu_bwd_dz_kernel``: recomputes z, dz = gy * GELU'(z) (stored in x's dtype for fp16 / bf16, as MSCA's
  ds, else fp32; the weight partials use the fp32 value), and partial sums of dW (9 taps) and db over each
  program's G pixel blocks, reduced afterwards in a fixed order by one :func:`sum_rows` launch (deterministic, no atomics) straight
  into the parameters' dtype and layout.
All shifted accesses are ``p + scalar offset`` from one pointer tensor per operand, in runtime tap loops:
fully unrolled, every tap's addresses were computed up front and held (the channels_last backward spilled).
* ``_dwgelu_bwd_dx_kernel``: dx = transposed 3x3 depthwise conv of dz.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

from .partial_sums import sum_rows

__all__ = ["dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd"]

_NOSPEC = ["C", "H", "W", "sxn", "sxc", "sxh", "syn", "syc", "syh", "n_pb"]


@triton.jit
def _tile(pid_p, n_pb, pid_c, C, H, W, BC: tl.constexpr, BP: tl.constexpr):
    n = pid_p // n_pb
    p = (pid_p % n_pb) * BP + tl.arange(0, BP)[None, :]
    c = pid_c * BC + tl.arange(0, BC)[:, None]
    h = p // W
    w = p % W
    inside = (c < C) & (p < H * W)
    return n.to(tl.int64), c, h, w, inside


@triton.jit
def _conv3x3(px, sxh, sxw, h, w, H, W, wb, cm, inside, ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    """3x3 depthwise conv (no bias) of zero-padded planes; px points at (h, w) of each block position."""
    z = tl.zeros([BC, BP], ACC)
    for u in range(3):
        mh = inside & (h >= 1 - u) & (h < H + 1 - u)
        for v in range(3):
            m = mh & (w >= 1 - v) & (w < W + 1 - v)
            z += tl.load(wb + u * 3 + v, mask=cm, other=0.0) * tl.load(px + ((u - 1) * sxh + (v - 1) * sxw), mask=m,
                                                                       other=0.0).to(ACC)
    return z


@triton.jit(do_not_specialize=_NOSPEC)
def _dwgelu_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, n_pb,
                       ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    n, c, h, w, inside = _tile(tl.program_id(0), n_pb, tl.program_id(1), C, H, W, BC, BP)
    cm = c < C
    px = x_ptr + n * sxn + c.to(tl.int64) * sxc + h * sxh + w * sxw
    z = _conv3x3(px, sxh, sxw, h, w, H, W, w_ptr + c * 9, cm, inside, ACC, BC, BP)
    z += tl.load(b_ptr + c, mask=cm, other=0.0)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + n * syn + c.to(tl.int64) * syc + h * syh + w * syw, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=_NOSPEC + ["n_pg"])
def _dwgelu_bwd_dz_kernel(x_ptr, gy_ptr, w_ptr, b_ptr, dz_ptr, part_ptr, C, H, W, sxn, sxc, sxh, sxw,
                          syn, syc, syh, syw, n_pb, n_pg, G, ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    """gy and dz share the strides (syn, syc, syh, syw). A program takes G consecutive pixel blocks of one image
    (group pid_g % n_pg of image pid_g // n_pg) and writes one partial row: (N * n_pg, 10 * C), dW (C, 9) then
    db (C,), summed over its blocks in registers."""
    pid_g = tl.program_id(0)
    n_img = pid_g // n_pg
    c1 = tl.program_id(1) * BC + tl.arange(0, BC)
    pm = c1 < C
    tap = tl.arange(0, 16)[None, :]
    acc_w = tl.zeros([BC, 16], ACC)  # the 9 taps' sums (columns 0..8)
    acc_b = tl.zeros([BC], ACC)
    for i in range(G):
        pb_i = (pid_g % n_pg) * G + i
        n, c, h, w, inside = _tile(n_img * n_pb + pb_i, n_pb, tl.program_id(1), C, H, W, BC, BP)
        inside = inside & (pb_i < n_pb)
        cm = c < C
        px = x_ptr + n * sxn + c.to(tl.int64) * sxc + h * sxh + w * sxw
        z = _conv3x3(px, sxh, sxw, h, w, H, W, w_ptr + c * 9, cm, inside, ACC, BC, BP)
        z += tl.load(b_ptr + c, mask=cm, other=0.0)
        off = n * syn + c.to(tl.int64) * syc + h * syh + w * syw
        gy = tl.load(gy_ptr + off, mask=inside, other=0.0).to(ACC)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = tl.where(inside, gy * (cdf + z * pdf), 0.0)
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=inside)
        for u in range(3):
            mh = inside & (h >= 1 - u) & (h < H + 1 - u)
            for v in range(3):
                m = mh & (w >= 1 - v) & (w < W + 1 - v)
                xv = tl.load(px + ((u - 1) * sxh + (v - 1) * sxw), mask=m, other=0.0).to(ACC)
                acc_w += tl.where(tap == u * 3 + v, tl.sum(dz * xv, axis=1)[:, None], 0.0)
        acc_b += tl.sum(dz, axis=1)
    pb = part_ptr + pid_g.to(tl.int64) * (10 * C)
    tl.store(pb + c1[:, None] * 9 + tap, acc_w, mask=pm[:, None] & (tap < 9))
    tl.store(pb + 9 * C + c1, acc_b, mask=pm)


@triton.jit(do_not_specialize=_NOSPEC)
def _dwgelu_bwd_dx_kernel(dz_ptr, w_ptr, dx_ptr, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, n_pb,
                          ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    """dz strides (sxn..), dx strides (syn..)."""
    n, c, h, w, inside = _tile(tl.program_id(0), n_pb, tl.program_id(1), C, H, W, BC, BP)
    cm = c < C
    pz = dz_ptr + n * sxn + c.to(tl.int64) * sxc + h * sxh + w * sxw
    dx = tl.zeros([BC, BP], ACC)
    for u in range(3):
        mh = inside & (h >= u - 1) & (h < H + u - 1)
        for v in range(3):
            m = mh & (w >= v - 1) & (w < W + v - 1)
            dx += tl.load(w_ptr + c * 9 + u * 3 + v, mask=cm, other=0.0) * tl.load(
                pz + ((1 - u) * sxh + (1 - v) * sxw), mask=m, other=0.0).to(ACC)
    tl.store(dx_ptr + n * syn + c.to(tl.int64) * syc + h * syh + w * syw, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _blocks(x: torch.Tensor):
    N, C, H, W = x.shape
    if interpreter_enabled():
        BC, BP = min(triton.next_power_of_2(C), 64), min(triton.next_power_of_2(H * W), 256)
    elif x.stride(1) == 1:  # channels_last: channels are the contiguous dim
        BC, BP = min(triton.next_power_of_2(C), 64), 32
    else:
        BC, BP = 1, min(triton.next_power_of_2(H * W), 1024)
    return BC, BP, triton.cdiv(H * W, BP)


def _group(BP: int, n_pb: int) -> int:
    """Pixel blocks per program of the dz kernel (each program writes one (10 * C,) partial row): at least 512
    pixels per row, so channels_last's 32-pixel blocks give 16 blocks a row (MSCAN-T stage 1: 512 rows, 5.2 MB,
    instead of 8 192 rows, 84 MB, written and read back); NCHW's 1 024-pixel blocks 1. The interpreter: 2, so
    the tests run the loop."""
    if interpreter_enabled():
        return min(2, n_pb)
    return max(1, min(n_pb, 512 // BP))


def _acc(x):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def dwconv3x3_gelu_fwd(x, weight, bias):
    """GELU(dwconv3x3(x) + bias); weight (C, 9), bias (C,) in the accumulation dtype."""
    N, C, H, W = x.shape
    BC, BP, n_pb = _blocks(x)
    acc_tl, _ = _acc(x)
    y = torch.empty_like(x)
    record_launch("dwconv3x3_gelu_fwd")
    _dwgelu_fwd_kernel[(N * n_pb, triton.cdiv(C, BC))](x, weight, bias, y, C, H, W, *x.stride(), *y.stride(), n_pb,
                                                        ACC=acc_tl, BC=BC, BP=BP, num_warps=4)
    return y


def dwconv3x3_gelu_bwd(x, gy, weight, bias, dtype=None):
    """Returns dx (like x) and the flat (10 * C,) gradient in ``dtype`` (default: the accumulation dtype):
    ``flat[:9 * C]`` is dweight (C, 9) row-major, ``flat[9 * C:]`` dbias (C,)."""
    N, C, H, W = x.shape
    BC, BP, n_pb = _blocks(x)
    acc_tl, acc_t = _acc(x)
    # dz in x's dtype for fp16 / bf16 (halves its write and read: bytes_conv_and_gather.md finding 6)
    dz = torch.empty_like(x, dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_t)
    if gy.stride() != dz.stride():  # gy and dz share one set of strides in the kernel
        gy = torch.empty_like(dz, dtype=gy.dtype).copy_(gy)
    G = _group(BP, n_pb)
    n_pg = triton.cdiv(n_pb, G)
    part = torch.empty(N * n_pg, 10 * C, dtype=acc_t, device=x.device)
    record_launch("dwconv3x3_gelu_bwd_dz")
    _dwgelu_bwd_dz_kernel[(N * n_pg, triton.cdiv(C, BC))](x, gy, weight, bias, dz, part, C, H, W, *x.stride(),
                                                           *dz.stride(), n_pb, n_pg, G, ACC=acc_tl, BC=BC, BP=BP,
                                                           num_warps=4)
    dx = torch.empty_like(x)
    record_launch("dwconv3x3_gelu_bwd_dx")
    _dwgelu_bwd_dx_kernel[(N * n_pb, triton.cdiv(C, BC))](dz, weight, dx, C, H, W, *dz.stride(), *dx.stride(), n_pb,
                                                           ACC=acc_tl, BC=BC, BP=BP, num_warps=4)
    return dx, sum_rows(part, dtype or acc_t, "dwconv3x3_gelu_reduce")
