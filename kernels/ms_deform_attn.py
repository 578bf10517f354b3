"""Triton kernels for multi-scale deformable attention (Deformable DETR / Mask2Former), forward and backward.

Layout (all contiguous): value (N, S, M, D) with S = Σ_l H_l·W_l; spatial_shapes (L, 2) integer (H_l, W_l);
level_start_index (L,) integer; sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1];
attention_weights (N, Lq, M, L, P); output (N, Lq, M·D). fp32/fp16/bf16 (fp64 under the interpreter);
locations, weights and sums in fp32 (fp64 for fp64 inputs).

Sampling follows the official CUDA op (``ms_deform_im2col_cuda.cuh``): ``h = y·H − 0.5``, ``w = x·W − 0.5``
(``align_corners=False``); a point contributes only if ``−1 < h < H`` and ``−1 < w < W``; inside that, each of
the 4 bilinear corners counts only when it lies in the image (zero padding), in the value, the value gradient
and the location gradient alike (the location gradient is the bilinear derivative over the valid corners).

* ``FUSED`` (both kernels): the module's softmax over the L·P logits of each (query, head) (online, in the
  forward; the backward reuses the saved max and sum) and the location arithmetic ``reference point +
  offset / (W_l, H_l)`` (2-coordinate reference points) run in the kernels, so neither the sampling locations
  nor the weights are written to memory.
* ``_msda_fwd_kernel``: one program per block of rows of the flattened (N, Lq, M) (query × head); loops over
  levels and points and gathers the D-vectors of the 4 corners: one pass, nothing of size
  (N, Lq, M, L, P, D) is formed.
* ``_msda_bwd_kernel``: same grid; recomputes the samples, writes grad_attention = ⟨g, sample⟩ and
  grad_location (each program owns its queries' points: plain stores) and scatters
  ``a·corner_weight·g`` into an fp32 (fp64) grad_value with ``tl.atomic_add``. The order of the atomic adds
  is not fixed, so grad_value is not bit-for-bit deterministic (fp32 rounding-level differences between
  runs on a GPU); the other two gradients are deterministic.

``spatial_shapes`` / ``level_start_index`` stay on the device: the kernels load H_l, W_l and the level start
per level (no host sync). A level with ``start < 0`` or ``start + H·W > S`` is skipped, so inconsistent shapes
cannot read or write outside ``value``. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["ms_deform_attn_fwd", "ms_deform_attn_bwd", "block_sizes"]

_NOSPEC = ["R", "Lq", "S", "M", "L"]


@triton.jit
def _location(Loc, Ref, lp, ref_off, q_mask, Hf, Wf, FUSED: tl.constexpr, ACC: tl.constexpr):
    """(x, y) of point ``lp`` (BLOCK_Q,): read from Loc, or (FUSED) reference point + offset / (W, H), the
    official arithmetic for 2-coordinate reference points (Loc then holds the raw sampling offsets)."""
    x = tl.load(Loc + 2 * lp, mask=q_mask, other=0.0).to(ACC)
    y = tl.load(Loc + 2 * lp + 1, mask=q_mask, other=0.0).to(ACC)
    if FUSED:
        x = tl.load(Ref + ref_off, mask=q_mask, other=0.0).to(ACC) + x / Wf
        y = tl.load(Ref + ref_off + 1, mask=q_mask, other=0.0).to(ACC) + y / Hf
    return x, y


@triton.jit
def _bilinear(x, y, q_mask, Hf, Wf):
    """Bilinear setup of the official op: (inside, h0, w0, lh, lw)."""
    h_im = y * Hf - 0.5
    w_im = x * Wf - 0.5
    inside = q_mask & (h_im > -1.0) & (w_im > -1.0) & (h_im < Hf) & (w_im < Wf)
    h_im = tl.where(inside, h_im, 0.0)  # keeps the int conversion below finite for far / NaN points
    w_im = tl.where(inside, w_im, 0.0)
    h0f = tl.floor(h_im)
    w0f = tl.floor(w_im)
    return inside, h0f.to(tl.int32), w0f.to(tl.int32), h_im - h0f, w_im - w0f


@triton.jit
def _corners(vbase, h0, w0, H, W, inside, stride_s, d, dm):
    """Pointer offsets (BLOCK_Q, BLOCK_D) of the 4 corners (h0, w0), (h0, w0+1), (h0+1, w0), (h0+1, w0+1) and
    their (BLOCK_Q, BLOCK_D) validity masks (in the image, the point inside, the head-dim lane used)."""
    idx = h0 * W + w0
    o1 = (vbase + idx.to(tl.int64) * stride_s)[:, None] + d[None, :]
    o2 = o1 + stride_s
    o3 = o1 + W * stride_s
    o4 = o3 + stride_s
    top = inside & (h0 >= 0)
    bottom = inside & (h0 + 1 < H)
    left = w0 >= 0
    right = w0 + 1 < W
    k1 = (top & left)[:, None] & dm
    k2 = (top & right)[:, None] & dm
    k3 = (bottom & left)[:, None] & dm
    k4 = (bottom & right)[:, None] & dm
    return o1, o2, o3, o4, k1, k2, k3, k4


@triton.jit
def _level(Shapes, Starts, lvl, vrow, stride_s, S, ACC: tl.constexpr):
    """Level ``lvl``'s (H, W) as int32 and as ACC floats, its value offset (vrow + start · stride_s, int64) and
    whether it lies inside value (inconsistent shapes: a level past S is skipped, never read)."""
    H = tl.load(Shapes + 2 * lvl).to(tl.int32)
    W = tl.load(Shapes + 2 * lvl + 1).to(tl.int32)
    start = tl.load(Starts + lvl).to(tl.int32)
    level_ok = (start >= 0) & (start + H * W <= S)
    return H, W, H.to(ACC), W.to(ACC), vrow + start.to(tl.int64) * stride_s, level_ok


@triton.jit(do_not_specialize=_NOSPEC)
def _msda_fwd_kernel(V, Shapes, Starts, Loc, Attn, Ref, Stats, Out, R, Lq, S, M, L, D: tl.constexpr,
                     P: tl.constexpr, FUSED: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,) rows of (N, Lq, M)
    q_mask = row < R
    vrow = ((row // (Lq * M)) * S * M + row % M) * D  # value offset of (n, s=0, m, d=0)
    rrow = (row // M) * L * 2  # FUSED: reference point offset of (n, q, level 0)
    d = tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    stride_s = M * D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), ACC)
    mx = tl.full((BLOCK_Q,), float("-inf"), ACC)  # FUSED: online softmax over the L·P logits of a row
    den = tl.zeros((BLOCK_Q,), ACC)
    for lvl in range(L):
        H, W, Hf, Wf, vbase, level_ok = _level(Shapes, Starts, lvl, vrow, stride_s, S, ACC)
        for p in range(P):
            lp = (row * L + lvl) * P + p
            a = tl.load(Attn + lp, mask=q_mask, other=0.0).to(ACC)
            if FUSED:
                m_new = tl.maximum(mx, a)
                none = m_new == float("-inf")  # every logit so far is -inf (weight 0, as the softmax gives)
                scale = tl.where(none, 0.0, tl.exp(mx - m_new))
                a = tl.where(none, 0.0, tl.exp(a - m_new))
                den = den * scale + a
                acc = acc * scale[:, None]
                mx = m_new
            x, y = _location(Loc, Ref, lp, rrow + 2 * lvl, q_mask, Hf, Wf, FUSED, ACC)
            inside, h0, w0, lh, lw = _bilinear(x, y, q_mask & level_ok, Hf, Wf)
            hl = 1.0 - lh
            wl = 1.0 - lw
            o1, o2, o3, o4, k1, k2, k3, k4 = _corners(vbase, h0, w0, H, W, inside, stride_s, d, dm)
            v1 = tl.load(V + o1, mask=k1, other=0.0).to(ACC)
            v2 = tl.load(V + o2, mask=k2, other=0.0).to(ACC)
            v3 = tl.load(V + o3, mask=k3, other=0.0).to(ACC)
            v4 = tl.load(V + o4, mask=k4, other=0.0).to(ACC)
            acc += ((a * hl * wl)[:, None] * v1 + (a * hl * lw)[:, None] * v2
                    + (a * lh * wl)[:, None] * v3 + (a * lh * lw)[:, None] * v4)
    if FUSED:
        acc = acc / den[:, None]
        tl.store(Stats + 2 * row, mx, mask=q_mask)
        tl.store(Stats + 2 * row + 1, den, mask=q_mask)
    out = row[:, None] * D + d[None, :]
    tl.store(Out + out, acc.to(Out.dtype.element_ty), mask=q_mask[:, None] & dm)


@triton.jit(do_not_specialize=_NOSPEC)
def _msda_bwd_kernel(V, Shapes, Starts, Loc, Attn, Ref, Stats, GO, GV, GLoc, GAttn, R, Lq, S, M, L,
                     D: tl.constexpr, P: tl.constexpr, FUSED: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """GLoc / GAttn: gradients of the locations and weights, or (FUSED) of the raw offsets and logits."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,) rows of (N, Lq, M)
    q_mask = row < R
    vrow = ((row // (Lq * M)) * S * M + row % M) * D  # value offset of (n, s=0, m, d=0)
    rrow = (row // M) * L * 2
    d = tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    stride_s = M * D
    go = tl.load(GO + row[:, None] * D + d[None, :], mask=q_mask[:, None] & dm, other=0.0).to(ACC)
    if FUSED:
        mx = tl.load(Stats + 2 * row, mask=q_mask, other=0.0)
        inv = 1.0 / tl.load(Stats + 2 * row + 1, mask=q_mask, other=1.0)
    dot = tl.zeros((BLOCK_Q,), ACC)  # FUSED: Σ a · dL/da over the row (softmax backward)
    for lvl in range(L):
        H, W, Hf, Wf, vbase, level_ok = _level(Shapes, Starts, lvl, vrow, stride_s, S, ACC)
        for p in range(P):
            lp = (row * L + lvl) * P + p
            a = tl.load(Attn + lp, mask=q_mask, other=0.0).to(ACC)
            if FUSED:
                a = tl.exp(a - mx) * inv
            x, y = _location(Loc, Ref, lp, rrow + 2 * lvl, q_mask, Hf, Wf, FUSED, ACC)
            inside, h0, w0, lh, lw = _bilinear(x, y, q_mask & level_ok, Hf, Wf)
            hl = 1.0 - lh
            wl = 1.0 - lw
            o1, o2, o3, o4, k1, k2, k3, k4 = _corners(vbase, h0, w0, H, W, inside, stride_s, d, dm)
            v1 = tl.load(V + o1, mask=k1, other=0.0).to(ACC)
            v2 = tl.load(V + o2, mask=k2, other=0.0).to(ACC)
            v3 = tl.load(V + o3, mask=k3, other=0.0).to(ACC)
            v4 = tl.load(V + o4, mask=k4, other=0.0).to(ACC)
            # gradient of the attention weight: <g, bilinear sample>
            g1 = tl.sum(go * v1, axis=1)
            g2 = tl.sum(go * v2, axis=1)
            g3 = tl.sum(go * v3, axis=1)
            g4 = tl.sum(go * v4, axis=1)
            g_attn = tl.where(inside, hl * wl * g1 + hl * lw * g2 + lh * wl * g3 + lh * lw * g4, 0.0)
            # location gradient: bilinear derivative over the valid corners, times W (x) and H (y); FUSED:
            # d loc / d offset = 1 / W, 1 / H
            g_w = tl.where(inside, a * (hl * (g2 - g1) + lh * (g4 - g3)), 0.0)
            g_h = tl.where(inside, a * (wl * (g3 - g1) + lw * (g4 - g2)), 0.0)
            if not FUSED:
                g_w = g_w * Wf
                g_h = g_h * Hf
            dot += a * g_attn
            tl.store(GAttn + lp, g_attn.to(GAttn.dtype.element_ty), mask=q_mask)
            tl.store(GLoc + 2 * lp, g_w.to(GLoc.dtype.element_ty), mask=q_mask)
            tl.store(GLoc + 2 * lp + 1, g_h.to(GLoc.dtype.element_ty), mask=q_mask)
            # value gradient: scatter a * corner weight * g into the 4 corners
            tl.atomic_add(GV + o1, (a * hl * wl)[:, None] * go, mask=k1, sem="relaxed")
            tl.atomic_add(GV + o2, (a * hl * lw)[:, None] * go, mask=k2, sem="relaxed")
            tl.atomic_add(GV + o3, (a * lh * wl)[:, None] * go, mask=k3, sem="relaxed")
            tl.atomic_add(GV + o4, (a * lh * lw)[:, None] * go, mask=k4, sem="relaxed")
    if FUSED:  # softmax backward: dL/dlogit = a · (dL/da − Σ a · dL/da), GAttn (fp32) re-read in place
        tl.debug_barrier()
        for j in range(L * P):
            lp = row * L * P + j
            a = tl.exp(tl.load(Attn + lp, mask=q_mask, other=0.0).to(ACC) - mx) * inv
            g = tl.load(GAttn + lp, mask=q_mask, other=0.0).to(ACC)
            tl.store(GAttn + lp, (a * (g - dot)).to(GAttn.dtype.element_ty), mask=q_mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_sizes(D: int, rows: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps): BLOCK_Q rows of the flattened (N, Lq, M); BLOCK_D = next power of 2 of the
    head dim (masked). A (BLOCK_Q, BLOCK_D) tile of ~512 elements on 4 warps (4 per thread), no larger than the
    rows need. Compiled for sm_90 (D = 32 and 64, P = 4, bf16/fp16/fp32): forward 96 registers (112 FUSED),
    backward 166-197 (231-252 FUSED), no spills; 2048-element forward tiles used 255 registers and spilled."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    cap, budget = 128, 512
    if interpreter_enabled():  # the interpreter pays per op, not per element: few large blocks
        cap = budget = 1 << 14
    BLOCK_Q = max(8, min(cap, budget // BLOCK_D, triton.next_power_of_2(rows)))
    return BLOCK_Q, BLOCK_D, 4


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       reference_points=None):
    """Contiguous inputs (see the module docstring) -> output (N, Lq, M·D) in value's dtype, and the softmax
    statistics (N, Lq, M, 2) fp32 (max, sum) or None.

    With ``reference_points`` (N, Lq, L, 2) the kernel fuses the module's softmax and location arithmetic:
    ``sampling_locations`` are then the raw sampling offsets (N, Lq, M, L, P, 2) in pixels of each level and
    ``attention_weights`` the raw logits (N, Lq, M, L, P)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    fused = reference_points is not None
    out = torch.empty((N, Lq, M * D), device=value.device, dtype=value.dtype)
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    stats = torch.empty((N, Lq, M, 2), device=value.device, dtype=acc_dtype) if fused else None
    BLOCK_Q, BLOCK_D, warps = block_sizes(D, N * Lq * M, False)
    grid = (triton.cdiv(N * Lq * M, BLOCK_Q),)
    record_launch("ms_deform_attn_fwd")
    _msda_fwd_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           reference_points if fused else sampling_locations, stats if fused else out, out,
                           N * Lq * M, Lq, S, M, L, D=D, P=P, FUSED=fused, BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D,
                           ACC=_acc(value.dtype), num_warps=warps)
    return out, stats


def ms_deform_attn_bwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out,
                       reference_points=None, stats=None):
    """-> (grad_value in fp32 (fp64 for fp64 value), grad of sampling_locations, grad of attention_weights);
    the last two in the inputs' dtypes, or, fused (``reference_points`` and ``stats`` from the forward), the
    gradients of the raw offsets (their dtype) and of the logits (fp32 / fp64). grad_out: (N, Lq, M·D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    fused = reference_points is not None
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_dtype)
    grad_loc = torch.empty_like(sampling_locations)
    # fused: dL/da is written, then re-read for the softmax backward: kept in the accumulation dtype
    grad_attn = torch.empty(attention_weights.shape, device=value.device,
                            dtype=acc_dtype if fused else attention_weights.dtype)
    BLOCK_Q, BLOCK_D, warps = block_sizes(D, N * Lq * M, True)
    grid = (triton.cdiv(N * Lq * M, BLOCK_Q),)
    record_launch("ms_deform_attn_bwd")
    _msda_bwd_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           reference_points if fused else sampling_locations, stats if fused else grad_loc,
                           grad_out, grad_value, grad_loc, grad_attn, N * Lq * M, Lq, S, M, L, D=D, P=P, FUSED=fused,
                           BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D, ACC=_acc(value.dtype), num_warps=warps)
    return grad_value, grad_loc, grad_attn
