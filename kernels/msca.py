"""Triton kernels for SegNeXt's MSCA (multi-scale convolutional attention), forward and backward.

Math (per channel c, all depthwise convs zero-padded to keep the size):
    a0 = conv5x5(x) + b0;  T_k = conv1xk(a0) + bh_k;  s = a0 + sum_k (convkx1(T_k) + bv_k),  k = 7, 11, 21
    y  = (W3 @ s + b3) * x                                   (1x1 conv over channels, then gate)

Kernels (x: (N, C, H, W), NCHW or channels_last strides, fp32/fp16/bf16 [fp64 under the interpreter];
accumulation in fp32, or fp64 for fp64 inputs):
* ``_msca_dw_fwd_kernel``: s for a tile of one (n, c) plane. a0 over tile + halo (10 each side) is
  computed from x, T_k over tile + row halo from a0; a0 and T_k live in a small per-program scratch slot
  (persistent grid, so the slots stay in L1/L2), never as full feature maps. Slots have a zero margin of 10,
  so shifted scratch reads need no masks; tl.debug_barrier() orders the block's writes and shifted reads.
* ``_msca_pw_fwd_kernel``: GEMM (pixels x C) @ W3^T with the bias + gate-by-x epilogue.
* ``_msca_pw_bwd_kernel``: q = g*x; ds = q @ W3 and dx_direct = g * (s @ W3^T + b3) in one pass (stored in
  x's dtype for fp16 / bf16, fp32 otherwise).
* ``_msca_w3_bwd_kernel``: dW3 = q^T s and db3 = sum q, split over pixels into partial sums (no atomics).
* ``_msca_dw_bwd_kernel``: recomputes a0 and T_k for tile + halo, back-propagates ds through the strips
  and the 5x5 to dx, and writes the tile's partial sums of all 103 depthwise weight and 7 bias gradients.
* C <= 64 (``FUSED_FWD_MAX_C`` / ``PW_FUSED_MAX_C``; ``FASTSEG_MSCA_FUSED=0``: never):
  ``_msca_fused_fwd_kernel`` is the whole forward (on a GPU when the spatial tiles fill the SMs,
  :func:`use_fused_fwd`), one spatial tile of every channel per item (s of each
  channel as in the dw kernel, then the pointwise GEMM + gate of the tile from the s just written), and
  ``_msca_pw_w3_bwd_kernel`` the pointwise backward and dW3 / db3 in one pass (per-program partials).
Partial sums are reduced by one :func:`sum_rows` launch per gradient set, in a fixed order (deterministic, no
atomics), straight into the parameters' dtype: the depthwise ones as a flat buffer, parameter after parameter.
Tap loops are runtime loops (see the helpers' comment): the unrolled versions spilled kilobytes per thread.

Per-channel depthwise parameters travel as one packed row ``wpack[C, 128]`` (see ``PACK``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

from .partial_sums import sum_rows

__all__ = ["PACK", "WPACK", "msca_dw_fwd", "msca_pw_fwd", "msca_fused_fwd", "use_fused_fwd", "msca_pw_bwd", "msca_w3_bwd",
           "msca_pw_w3_bwd", "msca_dw_bwd", "msca_fused_bwd", "use_fused_bwd", "msca_pw_ds_bwd",
           "msca_twopass_bwd", "use_twopass_bwd", "twopass_bwd_items"]

WPACK = 128
#: column ranges in the packed per-channel parameter row.
PACK = {
    "conv0.weight": (0, 25), "conv0_1.weight": (25, 32), "conv0_2.weight": (32, 39),
    "conv1_1.weight": (39, 50), "conv1_2.weight": (50, 61), "conv2_1.weight": (61, 82),
    "conv2_2.weight": (82, 103), "conv0.bias": (103, 104), "conv0_1.bias": (104, 105),
    "conv0_2.bias": (105, 106), "conv1_1.bias": (106, 107), "conv1_2.bias": (107, 108),
    "conv2_1.bias": (108, 109), "conv2_2.bias": (109, 110),
}
NPACK = 110


# ----------------------------------------------------------------------------------------------- helpers
# Depthwise blocks are 3-D: (BC channels, RH rows, RW cols); a program's scratch slot holds NBUF such blocks,
# each with a zero margin of M, at a fixed stride SB = BC * (RH + 2M) * (RW + 2M); scratch accesses are
# ``pS + offset`` from one pointer tensor pS (slot + block position).
# The tap loops are *runtime* loops (``range``, not ``tl.static_range``): Triton emits every load with its
# address in registers (no immediate offsets), and fully unrolled tap loops let the compiler compute all
# shifted / weight addresses up front and keep them live (hundreds of 64-bit registers: the kilobytes of
# spills per thread). A runtime loop computes one tap's addresses at a time.
@triton.jit
def _ld(pS, buf: tl.constexpr, di, dj, SB: tl.constexpr, RWP: tl.constexpr):
    """Scratch buffer ``buf`` at (row + di, col + dj) of each block position."""
    return tl.load(pS + (buf * SB + di * RWP + dj))


@triton.jit
def _psum(v):
    """(BC, RH, RW) -> (BC,) sum over the block's pixels."""
    return tl.sum(tl.sum(v, axis=2), axis=1)


@triton.jit
def _pstore(pt, C, c1, pm, O: tl.constexpr, KW: tl.constexpr, j, val):
    """Partial sum of tap j of the parameter whose packed columns start at O (KW taps per channel); the
    partial rows are parameter-major: (C, KW) taps of each parameter after the previous one's."""
    tl.store(pt + (O * C + j) + c1 * KW, val, mask=pm)


@triton.jit
def _block_frame(scr_ptr, NBUF: tl.constexpr, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                 PH: tl.constexpr, PW: tl.constexpr, M: tl.constexpr):
    """(c1, cc, ii, jj, pS, own_t) of a program's depthwise blocks: channel (1-D and 3-D), row and column
    indices, the pointers of its scratch slot (NBUF buffers of BC x (RH + 2M) x (RW + 2M), see _ld) at each
    block position, and the own-pixel mask (PH / PW halo rows / columns excluded)."""
    c1 = tl.arange(0, BC)
    cc = c1[:, None, None]
    ii = tl.arange(0, RH)[None, :, None]
    jj = tl.arange(0, RW)[None, None, :]
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    pS = scr_ptr + tl.program_id(0).to(tl.int64) * (NBUF * SB) + ((cc * (RH + 2 * M) + ii + M) * (RW + 2 * M)
                                                                   + jj + M)
    own_t = (ii >= PH) & (ii < RH - PH) & (jj >= PW) & (jj < RW - PW)
    return c1, cc, ii, jj, pS, own_t


@triton.jit
def _conv5x5(xb, xo, sxh, sxw, h, w, H, W, wb, cm, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
             ACC: tl.constexpr):
    """a0 = b0 + 5x5 depthwise conv of zero-padded planes; xb + xo points at (h, w) of each block position
    (xo: 32-bit in-plane offsets, half the registers of a pointer tensor)."""
    acc = tl.zeros([BC, RH, RW], ACC) + tl.load(wb + 103, mask=cm, other=0.0)
    for u in range(5):
        mh = cm & (h >= 2 - u) & (h < H + 2 - u)
        for v in range(5):
            m = mh & (w >= 2 - v) & (w < W + 2 - v)
            xv = tl.load(xb + (xo + ((u - 2) * sxh + (v - 2) * sxw)), mask=m, other=0.0).to(ACC)
            acc += tl.load(wb + u * 5 + v, mask=cm, other=0.0) * xv
    return acc


@triton.jit
def _strip_fwd(pS, wb, cm, in_img, K: tl.constexpr, OH: tl.constexpr, OV: tl.constexpr, BH: tl.constexpr,
               BV: tl.constexpr, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, ACC: tl.constexpr,
               SB: tl.constexpr, RWP: tl.constexpr):
    """conv_kx1(conv_1xk(a0) + bh) + bv on the block; a0 in scratch buffer 0, T through buffer 1."""
    t = tl.zeros([BC, RH, RW], ACC) + tl.load(wb + BH, mask=cm, other=0.0)
    for j in range(K):
        t += tl.load(wb + OH + j, mask=cm, other=0.0) * _ld(pS, 0, 0, j - K // 2, SB, RWP)
    t = tl.where(in_img, t, 0.0)
    tl.debug_barrier()  # previous branch finished reading buffer 1
    tl.store(pS + SB, t)
    tl.debug_barrier()
    v = tl.zeros([BC, RH, RW], ACC) + tl.load(wb + BV, mask=cm, other=0.0)
    for i in range(K):
        v += tl.load(wb + OV + i, mask=cm, other=0.0) * _ld(pS, 1, i - K // 2, 0, SB, RWP)
    return v


@triton.jit
def _strip_bwd(pS, wb, cm, pt, C, c1, pm, dsb, do, sdh, h, W_ok, H, in_img, own, dso,
               K: tl.constexpr, OH: tl.constexpr, OV: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
               BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, ACC: tl.constexpr, SB: tl.constexpr,
               RWP: tl.constexpr):
    """One strip branch backward: writes its 2K + 2 gradient partials, returns its part of da0.

    Scratch: a0 in buffer 0 (read only here), T_k in buffer 1, dT_k in buffer 2. ds at dsb + do (do: the
    block's in-plane offsets); dso = ds on the pixels this tile owns. Two phases, each reading every shifted
    value once: (1) dT_k from ds, then one pass over the horizontal taps giving both T_k and dW_h;
    (2) after T_k / dT_k are in scratch, dW_v from shifted T_k and the da0 part from shifted dT_k."""
    dT = tl.zeros([BC, RH, RW], ACC)
    for i in range(K):  # dT[r, c] = sum_i wv[i] * ds[r - i + P, c]
        m = W_ok & (h >= i - K // 2) & (h < H + i - K // 2)
        dsv = tl.load(dsb + (do + (K // 2 - i) * sdh), mask=m, other=0.0).to(ACC)
        dT += tl.load(wb + OV + i, mask=cm, other=0.0) * dsv
    dT = tl.where(in_img, dT, 0.0)
    dTo = tl.where(own, dT, 0.0)
    _pstore(pt, C, c1, pm, BH, 1, 0, _psum(dTo))
    t = tl.zeros([BC, RH, RW], ACC) + tl.load(wb + BH, mask=cm, other=0.0)
    for j in range(K):
        av = _ld(pS, 0, 0, j - K // 2, SB, RWP)
        t += tl.load(wb + OH + j, mask=cm, other=0.0) * av
        _pstore(pt, C, c1, pm, OH, K, j, _psum(dTo * av))
    t = tl.where(in_img, t, 0.0)
    tl.debug_barrier()  # previous branch finished reading buffers 1 and 2
    tl.store(pS + SB, t)
    tl.store(pS + 2 * SB, dT)
    tl.debug_barrier()
    _pstore(pt, C, c1, pm, BV, 1, 0, _psum(dso))
    for i in range(K):
        _pstore(pt, C, c1, pm, OV, K, i, _psum(dso * _ld(pS, 1, i - K // 2, 0, SB, RWP)))
    r = tl.zeros([BC, RH, RW], ACC)
    for j in range(K):
        r += tl.load(wb + OH + j, mask=cm, other=0.0) * _ld(pS, 2, 0, K // 2 - j, SB, RWP)
    return r


@triton.jit
def _dw_block(x_ptr, s_ptr, wp_ptr, pS, n, c, h, w, own_t, C, H, W, sxn, sxc, sxh, sxw, ssn, ssc, ssh, ssw,
              BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr,
              SB: tl.constexpr, RWP: tl.constexpr):
    """s = a0 + the three strip branches (a0 = the 5x5 conv) of one (image n, channel block c, spatial block
    h x w), through the program's scratch pS; stored at the block's own pixels (own_t)."""
    cm = c < C
    in_img = cm & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    xb = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    xo = h * sxh + w * sxw
    wb = wp_ptr + c * WP
    tl.debug_barrier()  # the previous block finished reading buffer 0
    a0 = tl.where(in_img, _conv5x5(xb, xo, sxh, sxw, h, w, H, W, wb, cm, BC, RH, RW, ACC), 0.0)
    tl.store(pS, a0)
    tl.debug_barrier()
    s = a0 + _strip_fwd(pS, wb, cm, in_img, 7, 25, 32, 104, 105, BC, RH, RW, ACC, SB, RWP)
    s += _strip_fwd(pS, wb, cm, in_img, 11, 39, 50, 106, 107, BC, RH, RW, ACC, SB, RWP)
    s += _strip_fwd(pS, wb, cm, in_img, 21, 61, 82, 108, 109, BC, RH, RW, ACC, SB, RWP)
    sb = s_ptr + n.to(tl.int64) * ssn + c.to(tl.int64) * ssc
    tl.store(sb + h * ssh + w * ssw, s.to(s_ptr.dtype.element_ty), mask=in_img & own_t)


# ------------------------------------------------------------------------------------- depthwise kernels
# shape-like ints are not specialised (one compile serves every stage shape); the w-strides are (1 vs C)
_DW_NOSPEC = ["C", "H", "W", "sxn", "sxc", "sxh", "ssn", "ssc", "ssh", "sdn", "sdc", "sdh", "son", "soc", "soh",
              "n_cb", "n_th", "n_tw", "total"]


@triton.jit(do_not_specialize=[a for a in _DW_NOSPEC if a not in ("sdn", "sdc", "sdh", "son", "soc", "soh")])
def _msca_dw_fwd_kernel(x_ptr, s_ptr, wp_ptr, scr_ptr, C, H, W, sxn, sxc, sxh, sxw, ssn, ssc, ssh, ssw,
                        n_cb, n_th, n_tw, total, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                        PH: tl.constexpr, PW: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr, M: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _, cc, ii, jj, pS, own_t = _block_frame(scr_ptr, 2, BC, RH, RW, PH, PW, M)
    RWP: tl.constexpr = RW + 2 * M
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    for item in range(pid, total, nprog):
        tw = item % n_tw
        r = item // n_tw
        th = r % n_th
        r = r // n_th
        cb = r % n_cb
        n = r // n_cb
        h = th * (RH - 2 * PH) - PH + ii
        w = tw * (RW - 2 * PW) - PW + jj
        _dw_block(x_ptr, s_ptr, wp_ptr, pS, n, cb * BC + cc, h, w, own_t, C, H, W, sxn, sxc, sxh, sxw, ssn, ssc,
                  ssh, ssw, BC, RH, RW, WP, ACC, SB, RWP)


@triton.jit(do_not_specialize=[a for a in _DW_NOSPEC if a not in ("sdn", "sdc", "sdh")])
def _msca_fused_fwd_kernel(x_ptr, s_ptr, y_ptr, wp_ptr, w3_ptr, b3_ptr, scr_ptr, C, H, W, sxn, sxc, sxh, sxw,
                           ssn, ssc, ssh, ssw, son, soc, soh, sow, n_cb, n_th, n_tw, total,
                           BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, PH: tl.constexpr,
                           PW: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr, M: tl.constexpr,
                           CP: tl.constexpr, OWP: tl.constexpr, GR: tl.constexpr, PREC: tl.constexpr):
    """The whole forward for C <= CP channels, one spatial tile (n, th, tw) per item: s of every channel
    block as in :func:`_msca_dw_fwd_kernel` (written to s, which the backward reads), then, after a block
    barrier, y = (W3 @ s + b3) * x over the tile's own pixels, GR rows of OWP (>= own width) columns at a
    time, from the s just written (in L2 / L1) and x (read by the depthwise pass moments before)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _, cc, ii, jj, pS, own_t = _block_frame(scr_ptr, 2, BC, RH, RW, PH, PW, M)
    RWP: tl.constexpr = RW + 2 * M
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    OH: tl.constexpr = RH - 2 * PH
    OW: tl.constexpr = RW - 2 * PW
    ch = tl.arange(0, CP)
    chm = ch < C
    pix = tl.arange(0, GR * OWP)
    pr = pix // OWP
    pc = pix % OWP
    for item in range(pid, total, nprog):
        tw = item % n_tw
        r = item // n_tw
        th = r % n_th
        n = r // n_th
        h = th * OH - PH + ii
        w = tw * OW - PW + jj
        for cb in range(0, n_cb):
            _dw_block(x_ptr, s_ptr, wp_ptr, pS, n, cb * BC + cc, h, w, own_t, C, H, W, sxn, sxc, sxh, sxw, ssn,
                      ssc, ssh, ssw, BC, RH, RW, WP, ACC, SB, RWP)
        tl.debug_barrier()  # s of every channel of the tile written
        w_co = tl.load(w3_ptr + ch[None, :] * C + ch[:, None], mask=chm[:, None] & chm[None, :], other=0.0)
        bias = tl.load(b3_ptr + ch, mask=chm, other=0.0).to(ACC)
        nb = n.to(tl.int64) * sxn  # x, s, y share strides (the launcher checks): one offset tensor
        for r0 in range(0, OH, GR):
            hh = th * OH + r0 + pr
            ww = tw * OW + pc
            pm = (pc < OW) & (r0 + pr < OH) & (hh < H) & (ww < W)
            m2 = pm[:, None] & chm[None, :]
            off = (hh * sxh + ww * sxw)[:, None] + ch[None, :] * sxc  # 32-bit in-image offsets
            s_t = tl.load(s_ptr + nb + off, mask=m2, other=0.0)
            at = tl.dot(s_t, w_co, input_precision=PREC)  # at[p, o] = sum_c s[p, c] W3[o, c]
            xv = tl.load(x_ptr + nb + off, mask=m2, other=0.0).to(ACC)
            tl.store(y_ptr + nb + off, ((at + bias[None, :]) * xv).to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _tile_coords(item, n_cb, n_th, n_tw, C, H, W, cc, ii, jj, BC: tl.constexpr, RH: tl.constexpr,
                 RW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    tw = item % n_tw
    r = item // n_tw
    th = r % n_th
    r = r // n_th
    cb = r % n_cb
    n = r // n_cb
    c = cb * BC + cc
    h = th * (RH - 2 * PH) - PH + ii
    w = tw * (RW - 2 * PW) - PW + jj
    return n, cb, th, tw, c, h, w


@triton.jit
def _tile_origin(t, n_th, n_tw, sn, OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """(first row h0, first column w0, image offset) of the block of spatial tile t = (n * n_th + th) * n_tw + tw
    (OH x OW own pixels, PH / PW halo)."""
    tw = t % n_tw
    r = t // n_tw
    th = r % n_th
    n = r // n_th
    return th * OH - PH, tw * OW - PW, n.to(tl.int64) * sn


@triton.jit
def _dw_bwd_block(xb, xo, sh, sw, dsb, do, sdh, dxdb, dxb, wb, pS, pt, C, c1b, pm, cm, h, w, H, W, own_t,
                  BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, ACC: tl.constexpr, SB: tl.constexpr,
                  RWP: tl.constexpr):
    """Depthwise backward of one (image, channel block, spatial block): x at xb + xo (in-plane offsets xo,
    strides sh / sw; dx_direct at dxdb + xo, dx written at dxb + xo), ds at dsb + do (row stride sdh).
    Recompute a0 (scratch buffer 0), the three strip branches back to da0 (with their 90 weight / bias
    partials at pt), then da0 replaces a0 in buffer 0 for the 5x5's 26 partials and dx = dxd + conv5x5^T(da0)
    on the block's own pixels (own_t)."""
    W_ok = cm & (w >= 0) & (w < W)
    in_img = W_ok & (h >= 0) & (h < H)
    own = in_img & own_t
    tl.debug_barrier()  # previous block finished reading the scratch
    a0 = tl.where(in_img, _conv5x5(xb, xo, sh, sw, h, w, H, W, wb, cm, BC, RH, RW, ACC), 0.0)
    tl.store(pS, a0)
    ds_c = tl.load(dsb + do, mask=in_img, other=0.0).to(ACC)
    dso = tl.where(own, ds_c, 0.0)
    tl.debug_barrier()
    da0 = ds_c + _strip_bwd(pS, wb, cm, pt, C, c1b, pm, dsb, do, sdh, h, W_ok, H, in_img, own, dso,
                            7, 25, 32, 104, 105, BC, RH, RW, ACC, SB, RWP)
    da0 += _strip_bwd(pS, wb, cm, pt, C, c1b, pm, dsb, do, sdh, h, W_ok, H, in_img, own, dso,
                      11, 39, 50, 106, 107, BC, RH, RW, ACC, SB, RWP)
    da0 += _strip_bwd(pS, wb, cm, pt, C, c1b, pm, dsb, do, sdh, h, W_ok, H, in_img, own, dso,
                      21, 61, 82, 108, 109, BC, RH, RW, ACC, SB, RWP)
    tl.debug_barrier()  # everyone finished reading a0 from buffer 0 (the 5x5 weight grads read x)
    tl.store(pS, tl.where(in_img, da0, 0.0))
    da0o = tl.where(own, da0, 0.0)
    _pstore(pt, C, c1b, pm, 103, 1, 0, _psum(da0o))
    for u in range(5):
        mh = own & (h >= 2 - u) & (h < H + 2 - u)
        for v in range(5):
            m = mh & (w >= 2 - v) & (w < W + 2 - v)
            xv = tl.load(xb + (xo + ((u - 2) * sh + (v - 2) * sw)), mask=m, other=0.0)
            _pstore(pt, C, c1b, pm, 0, 25, u * 5 + v, _psum(da0o * xv.to(ACC)))
    tl.debug_barrier()  # da0 of the whole block in buffer 0
    dx = tl.load(dxdb + xo, mask=own, other=0.0).to(ACC)
    for u in range(5):
        for v in range(5):
            dx += tl.load(wb + u * 5 + v, mask=cm, other=0.0) * _ld(pS, 0, 2 - u, 2 - v, SB, RWP)
    tl.store(dxb + xo, dx.to(dxb.dtype.element_ty), mask=own)


@triton.jit(do_not_specialize=["C", "H", "W", "sn", "sc", "sh", "n_cb", "n_th", "n_tw", "total"])
def _msca_dw_bwd_kernel(x_ptr, ds_ptr, dxd_ptr, dx_ptr, wp_ptr, part_ptr, scr_ptr, C, H, W, sn, sc, sh, sw,
                        n_cb, n_th, n_tw, total, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                        PH: tl.constexpr, PW: tl.constexpr, NP: tl.constexpr, WP: tl.constexpr,
                        ACC: tl.constexpr, M: tl.constexpr):
    """x, ds, dxd and dx share one set of strides (s*: one in-plane offset tensor serves all); partials:
    (N * n_th * n_tw, NP * C) parameter-major. One (n, channel block, spatial tile) per item:
    :func:`_dw_bwd_block` with ds read from global memory."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c1, cc, ii, jj, pS, own_t = _block_frame(scr_ptr, 3, BC, RH, RW, PH, PW, M)
    RWP: tl.constexpr = RW + 2 * M
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    for item in range(pid, total, nprog):
        n, cb, th, tw, c, h, w = _tile_coords(item, n_cb, n_th, n_tw, C, H, W, cc, ii, jj, BC, RH, RW, PH, PW)
        c1b = cb * BC + c1
        base = n.to(tl.int64) * sn + c.to(tl.int64) * sc
        do = h * sh + w * sw
        pt = part_ptr + ((n * n_th + th) * n_tw + tw).to(tl.int64) * (NP * C)
        _dw_bwd_block(x_ptr + base, do, sh, sw, ds_ptr + base, do, sh, dxd_ptr + base, dx_ptr + base,
                      wp_ptr + c * WP, pS, pt, C, c1b, c1b < C, c < C, h, w, H, W, own_t, BC, RH, RW, ACC, SB, RWP)


@triton.jit(do_not_specialize=["H", "W", "sn", "sc", "sh", "dsc", "dband", "dk", "n_th", "n_tw", "total"])
def _msca_fused_bwd_kernel(g_ptr, x_ptr, s_ptr, dx_ptr, w3_ptr, b3_ptr, wp_ptr, part_ptr, part3_ptr, scr_ptr,
                           dscr_ptr, H, W, sn, sc, sh, sw, dsc, dband, dk, n_th, n_tw, total,
                           C: tl.constexpr, n_cb: tl.constexpr, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, PH: tl.constexpr,
                           PW: tl.constexpr, NP: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr,
                           M: tl.constexpr, CP: tl.constexpr, GP: tl.constexpr, PREC: tl.constexpr):
    """The whole backward for C <= CP channels, one spatial tile (n, th, tw) of every channel per item
    (g, x, s, dx share strides). Phase 1, GP pixels of the block at a time on tensor cores: q = g*x and
    ds = q @ W3 over the block's in-image pixels (tile + halo) into this program's ds scratch, and on the
    tile's own pixels dx_direct = g * (s @ W3^T + b3) into dx and the tile's dW3 / db3 partial (part3 row:
    (C + 1) * C). Phase 2, channel block by channel block: :func:`_dw_bwd_block` with ds from the scratch,
    adding into dx. The ds scratch is a window of x's own layout (rows h0 - M .. h0 + RH + M of the block, in
    x's in-plane strides, channel stride dsc), so x, ds and dx share one offset tensor: dk programs share a
    band of dband elements side by side (RW columns each); the window's rows beyond the block are never
    written and feed only halo pixels that no output reads."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c1, cc, ii, jj, pS, own_t = _block_frame(scr_ptr, 3, BC, RH, RW, PH, PW, M)
    RWP: tl.constexpr = RW + 2 * M
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    OH: tl.constexpr = RH - 2 * PH
    OW: tl.constexpr = RW - 2 * PW
    ch = tl.arange(0, CP)
    chm = ch < C
    pix = tl.arange(0, GP)
    # one flat loop over (tile, channel block) of this program's tiles: nothing but the counter is carried
    # from one channel block to the next (a nested channel loop kept the tile's tensors live and spilled them)
    n_mine = tl.cdiv(total - pid, nprog)
    for k in range(0, n_mine * n_cb):
        cb = k % n_cb
        item = pid + (k // n_cb) * nprog
        h0, w0, nb = _tile_origin(item, n_th, n_tw, sn, OH, OW, PH, PW)
        slot = (pid // dk).to(tl.int64) * dband + (pid % dk) * (RW * sw)
        dsp = dscr_ptr + (slot - ((h0 - M) * sh + w0 * sw))  # ds of pixel p: dsp + p's offset
        row = item.to(tl.int64)
        if cb == 0:  # the tile's GEMM phase
            w_oc = tl.load(w3_ptr + ch[:, None] * C + ch[None, :], mask=chm[:, None] & chm[None, :], other=0.0)
            w_co = tl.trans(w_oc)
            bias = tl.load(b3_ptr + ch, mask=chm, other=0.0).to(ACC)
            acc_w = tl.zeros([CP, CP], ACC)
            acc_b = tl.zeros([CP], ACC)
            tl.debug_barrier()  # the previous tile's depthwise phase finished reading the ds scratch
            for p0 in range(0, RH * RW, GP):  # GP pixels of the block (row-major) at a time
                pr = (p0 + pix) // RW
                pc = (p0 + pix) % RW
                hh = h0 + pr
                ww = w0 + pc
                in_img = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                own = in_img & (pr >= PH) & (pr < RH - PH) & (pc >= PW) & (pc < RW - PW)
                m2 = in_img[:, None] & chm[None, :]
                po = hh * sh + ww * sw  # 32-bit in-image offsets
                off = po[:, None] + ch[None, :] * sc
                gv = tl.load(g_ptr + nb + off, mask=m2, other=0.0)
                xv = tl.load(x_ptr + nb + off, mask=m2, other=0.0)
                q = (gv.to(ACC) * xv.to(ACC)).to(xv.dtype)
                ds = tl.dot(q, w_oc, input_precision=PREC)  # ds[p, c] = sum_o q[p, o] W3[o, c]
                tl.store(dsp + (po[:, None] + ch[None, :] * dsc), ds.to(dscr_ptr.dtype.element_ty), mask=m2)
                mo = own[:, None] & chm[None, :]
                sv = tl.load(s_ptr + nb + off, mask=mo, other=0.0)
                at = tl.dot(sv, w_co, input_precision=PREC)  # at[p, o] = sum_c s[p, c] W3[o, c]
                tl.store(dx_ptr + nb + off, (gv.to(ACC) * (at + bias[None, :])).to(dx_ptr.dtype.element_ty),
                         mask=mo)
                acc_w += tl.dot(tl.trans(q), sv, input_precision=PREC)  # s is 0 off the own pixels
                acc_b += tl.sum(tl.where(mo, q, 0.0).to(ACC), axis=0)
            p3 = part3_ptr + row * ((C + 1) * C)
            tl.store(p3 + ch[:, None] * C + ch[None, :], acc_w, mask=chm[:, None] & chm[None, :])
            tl.store(p3 + C * C + ch, acc_b, mask=chm)
            tl.debug_barrier()  # ds of the block and dx_direct of the own pixels written
        h = h0 + ii
        w = w0 + jj
        xo = h * sh + w * sw
        c = cb * BC + cc
        c1b = cb * BC + c1
        base = nb + c.to(tl.int64) * sc
        _dw_bwd_block(x_ptr + base, xo, sh, sw, dsp + c * dsc, xo, sh, dx_ptr + base, dx_ptr + base,
                      wp_ptr + c * WP, pS, part_ptr + row * (NP * C), C, c1b, c1b < C, c < C, h, w, H, W, own_t,
                      BC, RH, RW, ACC, SB, RWP)


@triton.jit(do_not_specialize=["H", "W", "sn", "sc", "sh", "n_ck", "n_th", "n_tw", "total"])
def _msca_dw_pw_bwd_kernel(g_ptr, x_ptr, s_ptr, ds_ptr, dx_ptr, w3_ptr, b3_ptr, wp_ptr, part_ptr, scr_ptr,
                           H, W, sn, sc, sh, sw, n_ck, n_th, n_tw, total, C: tl.constexpr, CK: tl.constexpr,
                           NCB: tl.constexpr, BC: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, PH: tl.constexpr,
                           PW: tl.constexpr, NP: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr,
                           M: tl.constexpr, CP: tl.constexpr, GP: tl.constexpr, PREC: tl.constexpr):
    """Second pass of the two-pass backward (the first: ds = (g*x) @ W3, a full tensor). One item per
    (n, spatial tile, chunk of CK output channels), chunks innermost, so a tile's chunks run side by side and
    share their reads of s. GEMM phase, GP own pixels at a time: dx_direct = g * (s @ W3^T + b3) of the
    chunk's channels into dx, and the chunk's rows of dW3 = (g*x)^T s, db3 = sum g*x; then the chunk's NCB
    channel blocks of BC through :func:`_dw_bwd_block` (ds from global memory), adding into dx. g, x, s, ds,
    dx share strides; partial row per tile: NP * C depthwise columns, then (C + 1) * C (dW3 rows, db3)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c1, cc, ii, jj, pS, own_t = _block_frame(scr_ptr, 3, BC, RH, RW, PH, PW, M)
    RWP: tl.constexpr = RW + 2 * M
    SB: tl.constexpr = BC * (RH + 2 * M) * (RW + 2 * M)
    OH: tl.constexpr = RH - 2 * PH
    OW: tl.constexpr = RW - 2 * PW
    ch = tl.arange(0, CP)
    chm = ch < C
    pix = tl.arange(0, GP)
    # one flat loop over (item, channel block of its chunk): nothing but the counter is carried between blocks
    n_mine = tl.cdiv(total - pid, nprog)
    for k in range(0, n_mine * NCB):
        cbk = k % NCB
        item = pid + (k // NCB) * nprog
        ck = item % n_ck
        t = item // n_ck
        h0, w0, nb = _tile_origin(t, n_th, n_tw, sn, OH, OW, PH, PW)
        pt = part_ptr + t.to(tl.int64) * ((NP + C + 1) * C)
        if cbk == 0:  # the chunk's GEMM phase on the tile's own pixels
            oc = ck * CK + tl.arange(0, CK)
            ocm = oc < C
            w_co = tl.load(w3_ptr + oc[None, :] * C + ch[:, None], mask=chm[:, None] & ocm[None, :], other=0.0)
            bias = tl.load(b3_ptr + oc, mask=ocm, other=0.0).to(ACC)
            acc_w = tl.zeros([CK, CP], ACC)
            acc_b = tl.zeros([CK], ACC)
            for p0 in range(0, OH * OW, GP):
                p = p0 + pix
                hh = h0 + PH + p // OW
                ww = w0 + PW + p % OW
                own = (p < OH * OW) & (hh < H) & (ww < W)
                po = hh * sh + ww * sw  # 32-bit in-image offsets
                sv = tl.load(s_ptr + nb + (po[:, None] + ch[None, :] * sc), mask=own[:, None] & chm[None, :],
                             other=0.0)
                mk = own[:, None] & ocm[None, :]
                ok = po[:, None] + oc[None, :] * sc
                gv = tl.load(g_ptr + nb + ok, mask=mk, other=0.0).to(ACC)
                xv = tl.load(x_ptr + nb + ok, mask=mk, other=0.0)
                q = (gv * xv.to(ACC)).to(xv.dtype)
                at = tl.dot(sv, w_co, input_precision=PREC)  # at[p, o] = sum_c s[p, c] W3[o, c]
                tl.store(dx_ptr + nb + ok, (gv * (at + bias[None, :])).to(dx_ptr.dtype.element_ty), mask=mk)
                acc_w += tl.dot(tl.trans(q), sv, input_precision=PREC)  # dW3[o, c] += sum_p q[p, o] s[p, c]
                acc_b += tl.sum(q.to(ACC), axis=0)
            p3 = pt + NP * C
            tl.store(p3 + oc[:, None] * C + ch[None, :], acc_w, mask=ocm[:, None] & chm[None, :])
            tl.store(p3 + C * C + oc, acc_b, mask=ocm)
            tl.debug_barrier()  # dx_direct of the chunk written before its depthwise blocks read it
        h = h0 + ii
        w = w0 + jj
        xo = h * sh + w * sw
        cb0 = ck * CK + cbk * BC
        c = cb0 + cc
        c1b = cb0 + c1
        base = nb + c.to(tl.int64) * sc
        _dw_bwd_block(x_ptr + base, xo, sh, sw, ds_ptr + base, xo, sh, dx_ptr + base, dx_ptr + base,
                      wp_ptr + c * WP, pS, pt, C, c1b, c1b < C, c < C, h, w, H, W, own_t,
                      BC, RH, RW, ACC, SB, RWP)


# ------------------------------------------------------------------------------------- pointwise kernels
def _pw_configs(kind: str):
    """GEMM tiles of the pointwise kernels; one small config under the interpreter, one default with
    FASTSEG_AUTOTUNE=0. Every config compiles spill-free (fp32 <= 256 B) within 227 KB of shared memory at
    the benchmark shapes (``fastseg inspect --family msca``)."""
    if interpreter_enabled():
        return [triton.Config({"BP": 32, "BJ": 32, "BK": 32}, num_warps=4)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":
        return [triton.Config({"BP": 64, "BJ": 64, "BK": 32}, num_warps=4, num_stages=3)]
    tiles = {"fwd": [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                     (128, 64, 64, 8, 4)],
             # two accumulators and three loaded operands per step: smaller K steps / pipelines
             "bwd": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 2)]}[kind]
    return [triton.Config({"BP": bp, "BJ": bj, "BK": bk}, num_warps=w, num_stages=st) for bp, bj, bk, w, st in tiles]


@triton.autotune(configs=_pw_configs("fwd"), key=["C", "HW", "PREC"])
@triton.jit
def _msca_pw_fwd_kernel(s_ptr, x_ptr, w_ptr, b_ptr, y_ptr, C, HW, ssn, ssc, ssp, sxn, sxc, sxp,
                        syn, syc, syp, PREC: tl.constexpr, ACC: tl.constexpr,
                        BP: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_pb = tl.cdiv(HW, BP)
    n = (pid // n_pb).to(tl.int64)
    p = (pid % n_pb) * BP + tl.arange(0, BP)
    o = tl.program_id(1) * BJ + tl.arange(0, BJ)
    pm = p < HW
    om = o < C
    acc = tl.zeros([BP, BJ], ACC)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        km = k < C
        a = tl.load(s_ptr + n * ssn + p[:, None] * ssp + k[None, :] * ssc, mask=pm[:, None] & km[None, :], other=0.0)
        wt = tl.load(w_ptr + o[None, :] * C + k[:, None], mask=km[:, None] & om[None, :], other=0.0)
        acc += tl.dot(a, wt, input_precision=PREC)
    m2 = pm[:, None] & om[None, :]
    bias = tl.load(b_ptr + o, mask=om, other=0.0).to(ACC)
    xv = tl.load(x_ptr + n * sxn + p[:, None] * sxp + o[None, :] * sxc, mask=m2, other=0.0).to(ACC)
    y = (acc + bias[None, :]) * xv
    tl.store(y_ptr + n * syn + p[:, None] * syp + o[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.autotune(configs=_pw_configs("bwd"), key=["C", "HW", "PREC"])
@triton.jit
def _msca_pw_bwd_kernel(g_ptr, x_ptr, s_ptr, w_ptr, b_ptr, ds_ptr, dxd_ptr, C, HW,
                        sgn, sgc, sgp, sxn, sxc, sxp, ssn, ssc, ssp, sdn, sdc, sdp,
                        PREC: tl.constexpr, ACC: tl.constexpr,
                        BP: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_pb = tl.cdiv(HW, BP)
    n = (pid // n_pb).to(tl.int64)
    p = (pid % n_pb) * BP + tl.arange(0, BP)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    pm = p < HW
    jm = j < C
    acc_ds = tl.zeros([BP, BJ], ACC)
    acc_at = tl.zeros([BP, BJ], ACC)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        km = k < C
        m_pk = pm[:, None] & km[None, :]
        m_kj = km[:, None] & jm[None, :]
        gk = tl.load(g_ptr + n * sgn + p[:, None] * sgp + k[None, :] * sgc, mask=m_pk, other=0.0)
        xk = tl.load(x_ptr + n * sxn + p[:, None] * sxp + k[None, :] * sxc, mask=m_pk, other=0.0)
        q = (gk.to(ACC) * xk.to(ACC)).to(xk.dtype)
        w_kj = tl.load(w_ptr + k[:, None] * C + j[None, :], mask=m_kj, other=0.0)  # W3[o=k, c=j]
        acc_ds += tl.dot(q, w_kj, input_precision=PREC)
        sk = tl.load(s_ptr + n * ssn + p[:, None] * ssp + k[None, :] * ssc, mask=m_pk, other=0.0)
        w_jk = tl.load(w_ptr + j[None, :] * C + k[:, None], mask=m_kj, other=0.0)  # W3[o=j, c=k]
        acc_at += tl.dot(sk, w_jk, input_precision=PREC)
    m2 = pm[:, None] & jm[None, :]
    gj = tl.load(g_ptr + n * sgn + p[:, None] * sgp + j[None, :] * sgc, mask=m2, other=0.0).to(ACC)
    bias = tl.load(b_ptr + j, mask=jm, other=0.0).to(ACC)
    off = n * sdn + p[:, None] * sdp + j[None, :] * sdc
    tl.store(ds_ptr + off, acc_ds.to(ds_ptr.dtype.element_ty), mask=m2)
    tl.store(dxd_ptr + off, (gj * (acc_at + bias[None, :])).to(dxd_ptr.dtype.element_ty), mask=m2)


def _pw_w3_configs():
    """Pixel blocks of the fused pointwise + W3 backward (all C <= PW_FUSED_MAX_C channels in one block)."""
    if interpreter_enabled():
        return [triton.Config({"BP": 32}, num_warps=4)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":
        return [triton.Config({"BP": 64}, num_warps=8, num_stages=3)]  # 0 B spills in every dtype / layout
    return [triton.Config({"BP": bp}, num_warps=w, num_stages=st)
            for bp, w, st in [(64, 4, 3), (64, 8, 3), (128, 8, 2), (32, 4, 4)]]


def _prune_pw_w3(configs, named_args, **kwargs):
    """fp32 / fp64: at most 16 elements of a (BP, CP) tile per thread (sm_90: at CP = 64, BP = 64 on 4 warps
    spilled 396-492 B and BP = 128 on 8 warps 592-640 B; the kept ones <= 52 B). fp16 / bf16: all (0 B)."""
    if named_args["x_ptr"].dtype.itemsize < 4:
        return configs
    cp = kwargs["CP"]
    kept = [c for c in configs if c.kwargs["BP"] * cp <= 16 * 32 * c.num_warps]
    return kept or configs


@triton.autotune(configs=_pw_w3_configs(), key=["C", "HW", "PREC", "DS_ONLY"],
                 prune_configs_by={"early_config_prune": _prune_pw_w3})
@triton.jit
def _msca_pw_w3_bwd_kernel(g_ptr, x_ptr, s_ptr, w_ptr, b_ptr, ds_ptr, dxd_ptr, part_ptr, C, HW, N,
                           sgn, sgc, sgp, sxn, sxc, sxp, ssn, ssc, ssp, sdn, sdc, sdp,
                           PREC: tl.constexpr, ACC: tl.constexpr, CP: tl.constexpr, DS_ONLY: tl.constexpr,
                           BP: tl.constexpr):
    """:func:`_msca_pw_bwd_kernel` and :func:`_msca_w3_bwd_kernel` in one pass over g, x, s, for C <= CP
    channels (every channel of a pixel block in registers): per pixel block q = g*x, ds = q @ W3,
    dx_direct = g * (s @ W3^T + b3), and this program's running dW3 += q^T s, db3 += sum q over its pixel
    blocks (persistent grid), written once as a (C + 1, C) partial (rows dW3, then db3). DS_ONLY: ds alone
    (reads g and x; s, b, dxd and part are not touched), the first pass of the two-pass backward."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ch = tl.arange(0, CP)
    chm = ch < C
    w_oc = tl.load(w_ptr + ch[:, None] * C + ch[None, :], mask=chm[:, None] & chm[None, :], other=0.0)  # W3[o, c]
    w_co = tl.trans(w_oc)  # W3^T[c, o]
    bias = tl.load(b_ptr + ch, mask=chm, other=0.0).to(ACC)
    acc_w = tl.zeros([CP, CP], ACC)
    acc_b = tl.zeros([CP], ACC)
    n_pb = tl.cdiv(HW, BP)
    for blk in range(pid, N * n_pb, nprog):
        n = (blk // n_pb).to(tl.int64)
        p = (blk % n_pb) * BP + tl.arange(0, BP)
        m2 = (p < HW)[:, None] & chm[None, :]
        gv = tl.load(g_ptr + n * sgn + p[:, None] * sgp + ch[None, :] * sgc, mask=m2, other=0.0)
        xv = tl.load(x_ptr + n * sxn + p[:, None] * sxp + ch[None, :] * sxc, mask=m2, other=0.0)
        q = (gv.to(ACC) * xv.to(ACC)).to(xv.dtype)
        ds = tl.dot(q, w_oc, input_precision=PREC)  # ds[p, c] = sum_o q[p, o] W3[o, c]
        off = n * sdn + p[:, None] * sdp + ch[None, :] * sdc
        tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=m2)
        if not DS_ONLY:
            sv = tl.load(s_ptr + n * ssn + p[:, None] * ssp + ch[None, :] * ssc, mask=m2, other=0.0)
            at = tl.dot(sv, w_co, input_precision=PREC)  # at[p, o] = sum_c s[p, c] W3[o, c]
            tl.store(dxd_ptr + off, (gv.to(ACC) * (at + bias[None, :])).to(dxd_ptr.dtype.element_ty), mask=m2)
            acc_w += tl.dot(tl.trans(q), sv, input_precision=PREC)
            acc_b += tl.sum(q.to(ACC), axis=0)
    if not DS_ONLY:
        pk = part_ptr + pid.to(tl.int64) * (C + 1) * C
        tl.store(pk + ch[:, None] * C + ch[None, :], acc_w, mask=chm[:, None] & chm[None, :])
        tl.store(pk + C * C + ch, acc_b, mask=chm)


def _w3_configs():
    if interpreter_enabled():
        return [triton.Config({"BO": 32, "BC": 32, "BM": 32}, num_warps=4)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":
        return [triton.Config({"BO": 64, "BC": 64, "BM": 64}, num_warps=4, num_stages=3)]
    return [triton.Config({"BO": bo, "BC": bc, "BM": bm}, num_warps=w, num_stages=st)
            for bo, bc, bm, w, st in [(64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 8, 3),
                                      (128, 64, 64, 8, 3)]]


@triton.autotune(configs=_w3_configs(), key=["C", "M", "CHUNK", "PREC"])
@triton.jit
def _msca_w3_bwd_kernel(g_ptr, x_ptr, s_ptr, part_ptr, C, HW, M, CHUNK,
                        sgn, sgc, sgp, sxn, sxc, sxp, ssn, ssc, ssp, PREC: tl.constexpr, ACC: tl.constexpr,
                        BO: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    o = pid_o * BO + tl.arange(0, BO)
    cc = pid_c * BC + tl.arange(0, BC)
    om = o < C
    cm = cc < C
    acc = tl.zeros([BO, BC], ACC)
    accb = tl.zeros([BO], ACC)
    m_lo = pid_k * CHUNK
    m_hi = tl.minimum(m_lo + CHUNK, M)
    for m0 in range(m_lo, m_hi, BM):
        m = m0 + tl.arange(0, BM)
        mm = m < m_hi
        n = (m // HW).to(tl.int64)
        p = m % HW
        mq = om[:, None] & mm[None, :]
        gq = tl.load(g_ptr + n[None, :] * sgn + p[None, :] * sgp + o[:, None] * sgc, mask=mq, other=0.0)
        xq = tl.load(x_ptr + n[None, :] * sxn + p[None, :] * sxp + o[:, None] * sxc, mask=mq, other=0.0)
        q = (gq.to(ACC) * xq.to(ACC)).to(xq.dtype)
        sv = tl.load(s_ptr + n[:, None] * ssn + p[:, None] * ssp + cc[None, :] * ssc,
                     mask=mm[:, None] & cm[None, :], other=0.0)
        acc += tl.dot(q, sv, input_precision=PREC)
        accb += tl.sum(q.to(ACC), axis=1)
    pk = part_ptr + pid_k.to(tl.int64) * (C + 1) * C  # this split's (C + 1, C) block: dW3 rows, then db3
    tl.store(pk + o[:, None] * C + cc[None, :], acc, mask=om[:, None] & cm[None, :])
    if pid_c == 0:
        tl.store(pk + C * C + o, accb, mask=om)


# ------------------------------------------------------------------------------------------- launchers
def _acc_dtype(t: torch.Tensor):
    return (tl.float64, torch.float64) if t.dtype == torch.float64 else (tl.float32, torch.float32)


def _prec(t: torch.Tensor) -> str:
    """fp32 GEMMs follow cuDNN's TF32 switch (the reference's 1x1 conv is a cuDNN conv); meta tensors (``fastseg
    inspect``) stand for CUDA ones."""
    on_gpu = t.is_cuda or t.device.type == "meta"
    return "tf32" if (t.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and on_gpu) else "ieee"


#: largest spatial block edge of the depthwise kernels (tests lower it to exercise several tiles).
BLOCK_CAP = 64
#: GPU tuning knob: FASTSEG_MSCA_DW_BLOCK="RH_CAP,RW_CAP,NUM_WARPS" (default 64,64,16).
_ENV_BLOCK = os.environ.get("FASTSEG_MSCA_DW_BLOCK")


def _dw_config(H: int, W: int, PH: int, PW: int):
    """(RH, RW, num_warps) of a depthwise block: power-of-two tile + halo, capped."""
    cap_h = cap_w = BLOCK_CAP
    warps = None
    if _ENV_BLOCK and not interpreter_enabled():
        cap_h, cap_w, warps = (int(v) for v in _ENV_BLOCK.split(","))
    RH = min(cap_h, max(16, triton.next_power_of_2(H + 2 * PH)))
    RW = min(cap_w, max(16, triton.next_power_of_2(W + 2 * PW)))
    if RH <= 2 * PH or RW <= 2 * PW:  # no own pixel per block: the kernels would write nothing
        raise ValueError(f"msca: a {RH}x{RW} depthwise block leaves no pixels inside its {PH}/{PW}-pixel halo; "
                         f"block edges must be powers of two >= 32 (FASTSEG_MSCA_DW_BLOCK={_ENV_BLOCK!r}, "
                         f"BLOCK_CAP={BLOCK_CAP})")
    # 16 warps for a 64x64 block keep 8 pixels per thread: the sm_90 forward then uses 128 registers and
    # spills 0 B (fastseg inspect; the backward uses half the warps, see msca_dw_bwd). Not yet timed.
    return RH, RW, warps or (16 if RH * RW >= 4096 else 8 if RH * RW >= 2048 else 4)


def _channel_block(C: int, RH: int, RW: int) -> int:
    """Channels per depthwise block: 1 on GPU (one plane per block); under the interpreter as many as fit in
    16K elements, since interpreted kernels cost per operation, not per element."""
    if not interpreter_enabled():
        return 1
    return max(1, min(triton.next_power_of_2(C), 16384 // (RH * RW)))


def _nprog(total: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(total, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(total, sms * 4))


MARGIN = 10  # zero margin around each scratch block: covers the largest shift (the 21-tap strips)
_SCRATCH: dict = {}


def _scratch(nprog: int, nbuf: int, BC: int, RH: int, RW: int, dtype, device) -> torch.Tensor:
    """Per-program scratch slots with zero margins. Kernels only write block interiors, so the margins stay
    zero and one buffer per geometry is reused across calls (no memset per call)."""
    n = nprog * nbuf * BC * (RH + 2 * MARGIN) * (RW + 2 * MARGIN)
    key = (device, dtype, nbuf, BC, RH, RW)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.zeros(n, dtype=dtype, device=device)
    return buf


def _flat_scratch(n: int, dtype, device) -> torch.Tensor:
    """A cached flat buffer of at least n elements, zero when first made (later: what the last call left)."""
    key = (device, dtype, "flat")
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.zeros(n, dtype=dtype, device=device)
    return buf


def _layout(x: torch.Tensor):
    """"nchw" / "cl" when x (N, C, H, W) has exactly the contiguous strides of that format, else None."""
    N, C, H, W = x.shape
    if x.stride() == (C * H * W, H * W, W, 1):
        return "nchw"
    if x.stride() == (H * W * C, 1, W * C, C):
        return "cl"
    return None


def _pix_strides(t: torch.Tensor):
    """(n, c, p) strides of a (N, C, H, W) tensor whose (h, w) dims flatten to one index p = h*W + w."""
    sn, sc, sh, sw = t.stride()
    assert sh == t.shape[3] * sw or t.shape[2] == 1, "pixel dims must be dense"
    return sn, sc, sw


def msca_dw_fwd(x: torch.Tensor, wpack: torch.Tensor) -> torch.Tensor:
    """s = a0 + sum of the strip branches, shape and strides of ``x``, dtype of ``x``."""
    N, C, H, W = x.shape
    acc_tl, _ = _acc_dtype(x)
    PH = PW = 10
    RH, RW, warps = _dw_config(H, W, PH, PW)
    BC = _channel_block(C, RH, RW)
    n_cb, n_th, n_tw = triton.cdiv(C, BC), triton.cdiv(H, RH - 2 * PH), triton.cdiv(W, RW - 2 * PW)
    total = N * n_cb * n_th * n_tw
    nprog = _nprog(total, x.device)
    scratch = _scratch(nprog, 2, BC, RH, RW, wpack.dtype, x.device)
    s = torch.empty_like(x)
    record_launch("msca_dw_fwd")
    _msca_dw_fwd_kernel[(nprog,)](x, s, wpack, scratch, C, H, W, *x.stride(), *s.stride(), n_cb, n_th, n_tw,
                                  total, BC=BC, RH=RH, RW=RW, PH=PH, PW=PW, WP=WPACK, ACC=acc_tl,
                                  M=MARGIN, num_warps=warps)
    return s


_FUSED = os.environ.get("FASTSEG_MSCA_FUSED", "1") != "0"  # "0": the unfused kernels at every C (A/B timing)
#: largest channel count of the one-kernel forward (:func:`msca_fused_fwd`); larger C: dw + pw kernels.
FUSED_FWD_MAX_C = 64 if _FUSED else 0


#: on a GPU the one-kernel forward runs only when its items (spatial tiles, each all C channels) are at least
#: this many per SM: below, SMs would sit idle (e.g. batch 1 at 128x128: 9 tiles), where the two-kernel path
#: has C times more items (tiles x channels).
FUSED_FWD_MIN_TILES_PER_SM = 1


def use_fused_fwd(x: torch.Tensor) -> bool:
    """Whether the op runs :func:`msca_fused_fwd` for x (N, C, H, W): C <= FUSED_FWD_MAX_C and, on CUDA, at
    least FUSED_FWD_MIN_TILES_PER_SM spatial tiles per SM (always under the interpreter / on meta tensors)."""
    N, C, H, W = x.shape
    if C > FUSED_FWD_MAX_C:
        return False
    return x.device.type != "cuda" or _fills_gpu(x.device, fused_fwd_tiles(N, H, W))


def _fills_gpu(device: torch.device, items: int) -> bool:
    """Whether ``items`` work items give every SM of the CUDA ``device`` at least FUSED_FWD_MIN_TILES_PER_SM."""
    return items >= FUSED_FWD_MIN_TILES_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def fused_fwd_tiles(N: int, H: int, W: int) -> int:
    """Items (spatial tiles) of the one-kernel forward at (N, ., H, W) on a GPU."""
    RH, RW, _ = _dw_config(H, W, 10, 10)
    return N * triton.cdiv(H, RH - 20) * triton.cdiv(W, RW - 20)


def msca_fused_fwd(x: torch.Tensor, wpack: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor):
    """(y, s) of :func:`msca_dw_fwd` + :func:`msca_pw_fwd` in one launch, for C <= FUSED_FWD_MAX_C: a program
    computes s of every channel of a spatial tile, then y of the tile from it. Same shapes / dtypes."""
    N, C, H, W = x.shape
    if C > FUSED_FWD_MAX_C:
        raise ValueError(f"msca_fused_fwd: C={C} > FUSED_FWD_MAX_C={FUSED_FWD_MAX_C}")
    acc_tl, _ = _acc_dtype(x)
    PH = PW = 10
    RH, RW, warps = _dw_config(H, W, PH, PW)
    BC = _channel_block(C, RH, RW)
    n_cb, n_th, n_tw = triton.cdiv(C, BC), triton.cdiv(H, RH - 2 * PH), triton.cdiv(W, RW - 2 * PW)
    total = N * n_th * n_tw
    nprog = _nprog(total, x.device)
    scratch = _scratch(nprog, 2, BC, RH, RW, wpack.dtype, x.device)
    s = torch.empty_like(x)
    y = torch.empty_like(x)
    assert x.stride() == s.stride() == y.stride(), "x, s, y must share strides"
    owp = triton.next_power_of_2(RW - 2 * PW)
    # GEMM steps of 128 pixels (rows of the own width padded to a power of two); at 16 warps every dtype /
    # layout compiles within 128 registers with 0 B spills (fp32 channels_last C=64: 52 B); 64 pixels or
    # 8 warps spilled 4-388 B in bf16 (benchmarks/results/notes/msca_bytes.md)
    gr = max(1, 128 // owp)
    record_launch("msca_fused_fwd")
    _msca_fused_fwd_kernel[(nprog,)](x, s, y, wpack, w3, b3, scratch, C, H, W, *x.stride(), *s.stride(),
                                     *y.stride(), n_cb, n_th, n_tw, total, BC=BC, RH=RH, RW=RW, PH=PH, PW=PW,
                                     WP=WPACK, ACC=acc_tl, M=MARGIN, CP=max(16, triton.next_power_of_2(C)),
                                     OWP=owp, GR=gr, PREC=_prec(x), num_warps=warps)
    return y, s


def msca_pw_fwd(s: torch.Tensor, x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """y = (W3 @ s + b3) * x; w3 (C, C) in x's dtype, b3 (C,) fp32 (fp64 for fp64 x)."""
    N, C, H, W = x.shape
    HW = H * W
    acc_tl, _ = _acc_dtype(x)
    y = torch.empty_like(x)
    grid = lambda META: (N * triton.cdiv(HW, META["BP"]), triton.cdiv(C, META["BJ"]))  # noqa: E731
    record_launch("msca_pw_fwd")
    _msca_pw_fwd_kernel[grid](s, x, w3, b3, y, C, HW, *_pix_strides(s), *_pix_strides(x), *_pix_strides(y),
                              PREC=_prec(x), ACC=acc_tl)
    return y


def msca_pw_bwd(g, x, s, w3, b3):
    """ds = W3^T (g*x) and dx_direct = g * (W3 @ s + b3) with the strides of ``x``; fp32 (fp64) for fp32 (fp64)
    x, x's dtype for fp16 / bf16 (as the reference's own half-precision gradients; halves the bytes moved)."""
    N, C, H, W = x.shape
    HW = H * W
    acc_tl, acc_t = _acc_dtype(x)
    gdt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_t
    ds = torch.empty_like(x, dtype=gdt)
    dxd = torch.empty_like(x, dtype=gdt)
    grid = lambda META: (N * triton.cdiv(HW, META["BP"]), triton.cdiv(C, META["BJ"]))  # noqa: E731
    record_launch("msca_pw_bwd")
    _msca_pw_bwd_kernel[grid](g, x, s, w3, b3, ds, dxd, C, HW, *_pix_strides(g), *_pix_strides(x),
                              *_pix_strides(s), *_pix_strides(ds), PREC=_prec(x), ACC=acc_tl)
    return ds, dxd


#: largest channel count of the fused pointwise + W3 backward (its (C, C) dW3 accumulator and three (BP, C)
#: tiles stay in registers; larger C takes msca_pw_bwd + msca_w3_bwd). Tests lower it to run both paths.
PW_FUSED_MAX_C = 64 if _FUSED else 0


def msca_pw_w3_bwd(g, x, s, w3, b3, dtype=None):
    """:func:`msca_pw_bwd` and :func:`msca_w3_bwd` in one pass over g, x, s (C <= PW_FUSED_MAX_C): returns
    (ds, dx_direct, (C + 1, C) dW3 rows then db3 in ``dtype``); two launches (the kernel, the fixed-order
    reduction of its per-program partials)."""
    N, C, H, W = x.shape
    if C > PW_FUSED_MAX_C:
        raise ValueError(f"msca_pw_w3_bwd: C={C} > PW_FUSED_MAX_C={PW_FUSED_MAX_C}")
    HW = H * W
    acc_tl, acc_t = _acc_dtype(x)
    gdt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_t
    ds = torch.empty_like(x, dtype=gdt)
    dxd = torch.empty_like(x, dtype=gdt)
    nprog = _pw_w3_nprog(N * HW, x.device)
    part = torch.empty(nprog, C + 1, C, dtype=acc_t, device=x.device)
    record_launch("msca_pw_w3_bwd")
    _msca_pw_w3_bwd_kernel[(nprog,)](g, x, s, w3, b3, ds, dxd, part, C, HW, N,
                                     *_pix_strides(g), *_pix_strides(x), *_pix_strides(s), *_pix_strides(ds),
                                     PREC=_prec(x), ACC=acc_tl, CP=max(16, triton.next_power_of_2(C)),
                                     DS_ONLY=False)
    g3 = sum_rows(part.view(nprog, (C + 1) * C), dtype or acc_t, "msca_w3_reduce").view(C + 1, C)
    return ds, dxd, g3


def _pw_w3_nprog(pixels: int, device: torch.device) -> int:
    """Persistent programs of _msca_pw_w3_bwd_kernel: 2 per SM, at most one per 32-pixel block (its smallest BP)."""
    blocks = triton.cdiv(pixels, 32)
    if device.type == "cuda":
        return max(1, min(blocks, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))


def msca_pw_ds_bwd(g, x, w3):
    """ds = (g*x) @ W3 alone, (N, C, H, W) with x's strides, in x's dtype for fp16 / bf16 (else fp32 / fp64);
    C <= FUSED_BWD_CAP_C (one launch of _msca_pw_w3_bwd_kernel with DS_ONLY)."""
    N, C, H, W = x.shape
    if C > FUSED_BWD_CAP_C:
        raise ValueError(f"msca_pw_ds_bwd: C={C} > {FUSED_BWD_CAP_C}")
    acc_tl, acc_t = _acc_dtype(x)
    ds = torch.empty_like(x, dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_t)
    nprog = _pw_w3_nprog(N * H * W, x.device)
    record_launch("msca_pw_ds_bwd")
    _msca_pw_w3_bwd_kernel[(nprog,)](g, x, x, w3, ds, ds, ds, ds, C, H * W, N,
                                     *_pix_strides(g), *_pix_strides(x), *_pix_strides(x), *_pix_strides(ds),
                                     PREC=_prec(x), ACC=acc_tl, CP=max(16, triton.next_power_of_2(C)),
                                     DS_ONLY=True)
    return ds


def msca_w3_bwd(g, x, s, dtype=None):
    """(C + 1, C) in ``dtype`` (default fp32 / fp64): rows 0..C-1 dW3 = sum over pixels of (g*x) s^T, row C
    db3 = sum of g*x; fixed-order split reduction (partials, then one :func:`sum_rows` launch)."""
    N, C, H, W = x.shape
    HW, M = H * W, N * H * W
    acc_tl, acc_t = _acc_dtype(x)
    chunk = 256 if interpreter_enabled() else 4096
    chunk = max(chunk, triton.cdiv(M, 256))
    chunk = triton.cdiv(chunk, 128) * 128
    split = triton.cdiv(M, chunk)
    part = torch.empty(split, C + 1, C, dtype=acc_t, device=x.device)
    grid = lambda META: (triton.cdiv(C, META["BO"]), triton.cdiv(C, META["BC"]), split)  # noqa: E731
    record_launch("msca_w3_bwd")
    _msca_w3_bwd_kernel[grid](g, x, s, part, C, HW, M, chunk, *_pix_strides(g), *_pix_strides(x),
                              *_pix_strides(s), PREC=_prec(x), ACC=acc_tl)
    return sum_rows(part.view(split, (C + 1) * C), dtype or acc_t, "msca_w3_reduce").view(C + 1, C)


#: largest channel count of the one-kernel backward (:func:`msca_fused_bwd`: its ds scratch holds every channel
#: of a block); larger C, or too few tiles on a GPU: msca_pw_w3_bwd / msca_pw_bwd + msca_w3_bwd, then msca_dw_bwd.
#: Opt-in (FASTSEG_MSCA_FUSED_BWD=1, or set this to 64) until a GPU timing decides: it moves 4T + partials
#: instead of 9T when its re-reads hit L2, but a program's live data (~1.1 MB at C = 32) is three times an SM's
#: share of H100's L2, so those re-reads may come from DRAM (benchmarks/results/notes/msca_bytes.md).
FUSED_BWD_MAX_C = 64 if _FUSED and os.environ.get("FASTSEG_MSCA_FUSED_BWD", "0") == "1" else 0
FUSED_BWD_CAP_C = 64  # what msca_fused_bwd itself takes (its register budget was checked up to C = 64)
_BWD_HALO = 12  # the fused backward's tile halo in rows and columns: ds of the own rows +- 12 lives in its block


def fused_bwd_tiles(N: int, H: int, W: int) -> int:
    """Items (spatial tiles) of the one-kernel backward at (N, ., H, W) on a GPU."""
    RH, RW, _ = _dw_config(H, W, _BWD_HALO, _BWD_HALO)
    return N * triton.cdiv(H, RH - 2 * _BWD_HALO) * triton.cdiv(W, RW - 2 * _BWD_HALO)


def use_fused_bwd(x: torch.Tensor) -> bool:
    """Whether the op runs :func:`msca_fused_bwd` for x (N, C, H, W): C <= FUSED_BWD_MAX_C and, on CUDA, at
    least one spatial tile per SM (FUSED_FWD_MIN_TILES_PER_SM, as the forward); always under the interpreter.
    x must have the exact NCHW or channels_last strides (the ds scratch is a window of that layout)."""
    N, C, H, W = x.shape
    if C > FUSED_BWD_MAX_C or _layout(x) is None:
        return False
    return x.device.type != "cuda" or _fills_gpu(x.device, fused_bwd_tiles(N, H, W))


def msca_fused_bwd(g, x, s, wpack, w3, b3, w3_dtype=None, dw_dtype=None):
    """The whole backward in one kernel (+ two fixed-order reductions) for C <= FUSED_BWD_CAP_C: returns
    (dx in x's dtype / strides, (C + 1, C) dW3 rows then db3 in ``w3_dtype``, the flat depthwise gradients of
    :func:`msca_dw_bwd` in ``dw_dtype``); g, x, s share strides, w3 (C, C) in x's dtype, b3 (C,) fp32 (fp64).
    A program takes a spatial tile of every channel: ds of the tile + halo from a GEMM into its scratch, then
    the depthwise backward from there, so ds and dx_direct never become full tensors."""
    N, C, H, W = x.shape
    if C > FUSED_BWD_CAP_C:
        raise ValueError(f"msca_fused_bwd: C={C} > {FUSED_BWD_CAP_C} channels")
    acc_tl, acc_t = _acc_dtype(x)
    PH = PW = _BWD_HALO
    RH, RW, warps = _dw_config(H, W, PH, PW)
    if not (_ENV_BLOCK and not interpreter_enabled()):
        warps = max(4, warps // 2)  # as msca_dw_bwd: 16 pixels per thread in the depthwise phase
    BC = _channel_block(C, RH, RW)
    n_cb, n_th, n_tw = triton.cdiv(C, BC), triton.cdiv(H, RH - 2 * PH), triton.cdiv(W, RW - 2 * PW)
    total = N * n_th * n_tw
    if x.device.type == "cuda":  # one 8-warp program per SM holds the register file; the scratch stays small
        nprog = max(1, min(total, torch.cuda.get_device_properties(x.device).multi_processor_count))
    else:
        nprog = max(1, min(total, 4))
    CP = max(16, triton.next_power_of_2(C))
    gdt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_t
    sn, sc, sh, sw = x.stride()
    layout = _layout(x)
    if layout is None:
        raise ValueError(f"msca_fused_bwd: x must be NCHW- or channels_last-contiguous, got strides {x.stride()}")
    # the ds scratch: a program's window is RH + 2 * MARGIN rows of x's in-plane strides by RW columns (all
    # channels: channel stride 1 in channels_last, one such band per channel in NCHW); dk = W // RW programs
    # sit side by side in one band, so the buffer is about nprog * (RH + 2 * MARGIN) * RW * C elements
    dk = max(1, W // RW)
    band = (RH + 2 * MARGIN) * sh
    plane = triton.cdiv(nprog, dk) * band + RW * sw  # every program's window (NCHW: of one channel)
    dsc, n_el = (1, plane) if layout == "cl" else (plane, C * plane)
    scratch = _scratch(nprog, 3, BC, RH, RW, acc_t, x.device)
    dscratch = _flat_scratch(n_el, gdt, x.device)
    part = torch.empty(total, NPACK * C, dtype=acc_t, device=x.device)
    part3 = torch.empty(total, (C + 1) * C, dtype=acc_t, device=x.device)
    dx = torch.empty_like(x)
    assert x.stride() == g.stride() == s.stride() == dx.stride(), "g, x, s, dx must share strides"
    # GEMM steps of GP pixels: the interpreter takes the whole block at once (it costs per operation, not per
    # element); on a GPU small enough for the GEMM phase to fit beside the depthwise phase's registers
    # (sm_90, 8 warps, C = 32 / 64, every dtype / layout: 0 B spills at 32 pixels in 16-bit, <= 4 B in fp32;
    # 64 pixels spilled up to 212-684 B at C = 64, 128 pixels 280-1396 B; benchmarks/results/notes/msca_bytes.md)
    gp = RH * RW if interpreter_enabled() else 32
    record_launch("msca_fused_bwd")
    _msca_fused_bwd_kernel[(nprog,)](g, x, s, dx, w3, b3, wpack, part, part3, scratch, dscratch, H, W,
                                     sn, sc, sh, sw, dsc, band, dk, n_th, n_tw, total, C=C, n_cb=n_cb, BC=BC,
                                     RH=RH, RW=RW,
                                     PH=PH, PW=PW, NP=NPACK, WP=WPACK, ACC=acc_tl, M=MARGIN, CP=CP, GP=gp,
                                     PREC=_prec(x), num_warps=warps)
    g3 = sum_rows(part3, w3_dtype or acc_t, "msca_w3_reduce").view(C + 1, C)
    return dx, g3, sum_rows(part, dw_dtype or acc_t, "msca_dw_reduce")


#: largest channel count of the two-pass backward (:func:`msca_twopass_bwd`, the default for NCHW / channels_last
#: x with C <= this): ds = (g*x) @ W3 as a full tensor, then one kernel for dx_direct, dW3 and the depthwise
#: backward (no dx_direct tensor). FASTSEG_MSCA_TWOPASS=0 (or 0 here) gives the split path (msca_pw_w3_bwd +
#: msca_dw_bwd) for the A/B timing.
TWOPASS_BWD_MAX_C = 64 if _FUSED and os.environ.get("FASTSEG_MSCA_TWOPASS", "1") != "0" else 0
#: output channels per item of the second pass (the N of its GEMMs: tl.dot needs >= 16)
TWOPASS_CK = 16


_TWOPASS_HALO = (10, 12)  # rows, columns: the depthwise backward's halo (as msca_dw_bwd)


def twopass_bwd_items(N: int, C: int, H: int, W: int) -> int:
    """Items ((n, spatial tile, 16-channel chunk)) of the two-pass backward's second pass on a GPU."""
    PH, PW = _TWOPASS_HALO
    RH, RW, _ = _dw_config(H, W, PH, PW)
    return N * triton.cdiv(H, RH - 2 * PH) * triton.cdiv(W, RW - 2 * PW) * triton.cdiv(C, TWOPASS_CK)


def use_twopass_bwd(x: torch.Tensor) -> bool:
    """Whether the op runs :func:`msca_twopass_bwd` for x (N, C, H, W): C <= TWOPASS_BWD_MAX_C, x NCHW- or
    channels_last-contiguous (g, s must share its strides) and, on CUDA, at least one item per SM
    (FUSED_FWD_MIN_TILES_PER_SM, as the forward: at MSCAN-T stage 1, batch 16, 384 items for 132 SMs; at batch
    2, 48, so the split backward's 768 depthwise planes keep every SM busy instead)."""
    N, C, H, W = x.shape
    if C > TWOPASS_BWD_MAX_C or _layout(x) is None:
        return False
    return x.device.type != "cuda" or _fills_gpu(x.device, twopass_bwd_items(N, C, H, W))


def msca_twopass_bwd(g, x, s, wpack, w3, b3, w3_dtype=None, dw_dtype=None):
    """The backward in two passes for C <= FUSED_BWD_CAP_C; returns what :func:`msca_fused_bwd` does (dx in x's
    dtype / strides, (C + 1, C) dW3 rows then db3 in ``w3_dtype``, flat depthwise gradients in ``dw_dtype``).
    Pass 1 (:func:`msca_pw_ds_bwd`): ds = (g*x) @ W3. Pass 2 (_msca_dw_pw_bwd_kernel): per (tile, 16 output
    channels) dx_direct, dW3 / db3 and the depthwise backward. Then one fixed-order reduction of both
    gradients' partials: 3 launches; g, x, s read twice, once and once, ds written and read, dx written."""
    N, C, H, W = x.shape
    if C > FUSED_BWD_CAP_C:
        raise ValueError(f"msca_twopass_bwd: C={C} > {FUSED_BWD_CAP_C} channels")
    layout = _layout(x)
    if layout is None or not (x.stride() == g.stride() == s.stride()):
        raise ValueError(f"msca_twopass_bwd: g, x, s must share NCHW- or channels_last-contiguous strides, got "
                         f"{g.stride()}, {x.stride()}, {s.stride()}")
    acc_tl, acc_t = _acc_dtype(x)
    ds = msca_pw_ds_bwd(g, x, w3)
    PH, PW = _TWOPASS_HALO
    RH, RW, warps = _dw_config(H, W, PH, PW)
    if not (_ENV_BLOCK and not interpreter_enabled()):
        warps = max(4, warps // 2)  # as msca_dw_bwd: 16 pixels per thread in the depthwise phase
    CK = TWOPASS_CK
    BC = min(_channel_block(C, RH, RW), CK)
    n_ck, n_th, n_tw = triton.cdiv(C, CK), triton.cdiv(H, RH - 2 * PH), triton.cdiv(W, RW - 2 * PW)
    tiles = N * n_th * n_tw
    total = tiles * n_ck
    nprog = _nprog(total, x.device)
    scratch = _scratch(nprog, 3, BC, RH, RW, acc_t, x.device)
    part = torch.empty(tiles, (NPACK + C + 1) * C, dtype=acc_t, device=x.device)
    dx = torch.empty_like(x)
    own = (RH - 2 * PH) * (RW - 2 * PW)
    # GEMM steps of GP own pixels: the interpreter takes the whole tile (it costs per operation, not per element)
    gp = triton.next_power_of_2(own) if interpreter_enabled() else 32
    record_launch("msca_dw_pw_bwd")
    _msca_dw_pw_bwd_kernel[(nprog,)](g, x, s, ds, dx, w3, b3, wpack, part, scratch, H, W, *x.stride(),
                                     n_ck, n_th, n_tw, total, C=C, CK=CK, NCB=triton.cdiv(min(CK, C), BC),
                                     BC=BC, RH=RH, RW=RW, PH=PH, PW=PW,
                                     NP=NPACK, WP=WPACK, ACC=acc_tl, M=MARGIN, CP=max(16, triton.next_power_of_2(C)),
                                     GP=gp, PREC=_prec(x), num_warps=warps)
    same = (w3_dtype or acc_t) == (dw_dtype or acc_t)
    flat = sum_rows(part, (dw_dtype or acc_t) if same else acc_t, "msca_bwd_reduce")
    gflat, g3 = flat[:NPACK * C], flat[NPACK * C:].view(C + 1, C)
    if not same:
        gflat, g3 = gflat.to(dw_dtype or acc_t), g3.to(w3_dtype or acc_t)
    return dx, g3, gflat


def msca_dw_bwd(x, ds, dxd, wpack, dtype=None):
    """dx = dxd + (depthwise chain)^T ds, in x's dtype and strides, and the depthwise parameters' gradients as
    one flat (110 * C,) tensor in ``dtype`` (default fp32 / fp64): parameter after parameter in ``PACK``
    order, each (C, taps) row-major, i.e. ``flat[PACK[name][0] * C : PACK[name][1] * C]`` is that gradient."""
    N, C, H, W = x.shape
    acc_tl, acc_t = _acc_dtype(x)
    PH, PW = 10, 12
    RH, RW, warps = _dw_config(H, W, PH, PW)
    if not (_ENV_BLOCK and not interpreter_enabled()):
        # half the forward's warps: 16 pixels and up to 255 registers per thread. At 16 warps (128 registers)
        # the fp16 / bf16 channels_last build spilled 4-24 B; at 8 warps every build spills 0 B (sm_90 ptxas).
        warps = max(4, warps // 2)
    BC = _channel_block(C, RH, RW)
    n_cb, n_th, n_tw = triton.cdiv(C, BC), triton.cdiv(H, RH - 2 * PH), triton.cdiv(W, RW - 2 * PW)
    total = N * n_cb * n_th * n_tw
    nprog = _nprog(total, x.device)
    scratch = _scratch(nprog, 3, BC, RH, RW, acc_t, x.device)
    part = torch.empty(N * n_th * n_tw, NPACK * C, dtype=acc_t, device=x.device)
    dx = torch.empty_like(x)
    assert x.stride() == ds.stride() == dxd.stride() == dx.stride(), "x, ds, dxd, dx must share strides"
    record_launch("msca_dw_bwd")
    _msca_dw_bwd_kernel[(nprog,)](x, ds, dxd, dx, wpack, part, scratch, C, H, W, *x.stride(), n_cb, n_th, n_tw,
                                  total, BC=BC, RH=RH, RW=RW, PH=PH, PW=PW,
                                  NP=NPACK, WP=WPACK, ACC=acc_tl, M=MARGIN, num_warps=warps)
    return dx, sum_rows(part, dtype or acc_t, "msca_dw_reduce")
