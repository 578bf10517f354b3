"""Masked multi-head attention with a bit-packed mask: flash-attention forward and backward in Triton.

Shapes (every tensor may be strided, the head dimension must be contiguous):
  q: (B, H, M, D)   k, v: (B, H, N, D)   o: (B, H, M, D)   fp32 / fp16 / bf16 (fp64 under the interpreter)
  bits: (Bm, Hm, M, ceil(N / 32)) int32, Bm in {1, B}, Hm in {1, H}: bit ``n % 32`` of word ``n // 32``
        is 1 when query m may attend to key n. A mask shared by all heads is stored (and read) once.
  lse: (B, H, M) fp32 (fp64 for fp64 inputs), the row log-sum-exp in base 2 of the scaled scores; +inf for a row with no
       allowed key, whose output (and gradient) is defined as 0.

The score matrix never reaches memory. The forward and dq kernels walk, per query block, the list of key
blocks with at least one allowed bit (built once per call by :func:`tile_lists`, like FlexAttention's
block mask), so the work falls with mask sparsity and the loop has no branch that would stop Triton from
pipelining the K/V loads; the dk/dv kernel skips empty tiles with a branch on a per-tile flag (few
query blocks per key block). Mask2Former has few queries (100-200) and many keys (up to 32768 per image), so the forward and
dq passes split each query block's tiles over ``num_splits`` programs and combine the partial results
deterministically (no atomics anywhere).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N) of the forward and dq kernels: the granularity of the list of non-empty tiles.
TILE = (16, 32) if interpreter_enabled() else (64, 64)


def _configs(kind: str) -> list[triton.Config]:
    """Autotuning space; one small config under the interpreter, one default with FASTSEG_AUTOTUNE=0.

    All kernels use the tile shape of the non-empty-tile lists (:data:`TILE`); warps and pipeline depth are
    tuned, and for dk/dv the rows processed at a time (SUB_M; configs that spill are pruned per dtype by
    :func:`_prune_dkdv`)."""
    bm, bn = TILE
    if interpreter_enabled():
        sub = {"SUB_M": bm // 2} if kind == "dkdv" else {}
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **sub}, num_warps=1, num_stages=1)]
    if os.environ.get("FASTSEG_AUTOTUNE", "1") == "0":
        sub = {"SUB_M": 16} if kind == "dkdv" else {}  # no spill in any dtype, with or without dropout
        # dq: 8 warps (with 4 the ATM logits-gradient variant spills 1148-2524 B in exact fp32; a single
        # config is never pruned, so the default itself must fit every variant); fwd: 8 warps (4 spilled
        # 1128-1712 B in exact fp32 at head dim 64)
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, **sub}, num_warps=8 if kind in ("dq", "fwd") else 4,
                              num_stages=2)]
    if kind == "dkdv":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SUB_M": sub}, num_warps=w, num_stages=s)
                for sub in (64, 32, 16) for w, s in ((4, 2), (4, 3), (8, 3))]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for w, s in ((4, 2), (4, 3), (4, 4), (8, 3))]


@triton.jit
def _mask_tile(mask_ptr, offs_m, n0, stride_mm, n_q, key_end,
               HAS_MASK: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mask tile of queries ``offs_m`` x keys ``n0 .. n0 + BLOCK_N`` (n0 % 32 == 0): (bool tile, any bit set).

    The tile is (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) if TRANSPOSED. It loads the BLOCK_N / 32 words
    of each query as vectors, broadcasts each over its 32 keys with a select (no reshape, no layout
    change) and tests the bits; out-of-range queries and keys are False.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < n_q
    if TRANSPOSED:
        inside = m_ok[None, :] & (offs_n[:, None] < key_end)
    else:
        inside = m_ok[:, None] & (offs_n[None, :] < key_end)
    if HAS_MASK:
        word_of_key = (offs_n - n0) >> 5
        any_set = False
        if TRANSPOSED:
            words = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
        else:
            words = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for w in tl.static_range(BLOCK_N // 32):
            word = tl.load(mask_ptr + offs_m * stride_mm + (n0 // 32 + w), mask=m_ok & (n0 + 32 * w < key_end), other=0)
            any_set = any_set | (tl.max((word != 0).to(tl.int32), axis=0) > 0)
            if TRANSPOSED:
                words = tl.where(word_of_key[:, None] == w, word[None, :], words)
            else:
                words = tl.where(word_of_key[None, :] == w, word[:, None], words)
        if TRANSPOSED:
            allowed = inside & (((words >> (offs_n[:, None] & 31)) & 1) != 0)
        else:
            allowed = inside & (((words >> (offs_n[None, :] & 31)) & 1) != 0)
    else:
        allowed = inside
        any_set = True
    return allowed, any_set


@triton.jit
def _split_of_tiles(Counts, tile_row, pid_s, N_KB, HAS_MASK: tl.constexpr):
    """[j_start, j_end): this split's share of the query block's tile list (all N_KB tiles without mask)."""
    if HAS_MASK:
        count = tl.load(Counts + tile_row)
    else:
        count = N_KB
    per_split = tl.cdiv(count, tl.num_programs(2))
    return pid_s * per_split, tl.minimum((pid_s + 1) * per_split, count)


@triton.jit
def _tile_key_start(Blocks, tile_row, j, N_KB, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key of the j-th tile of the query block's list (the j-th key block without mask)."""
    if HAS_MASK:
        n0 = tl.load(Blocks + tile_row * N_KB + j) * BLOCK_N
    else:
        n0 = j * BLOCK_N
    return n0


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. PRECISION "upcast": operands go through fp32 first (the
    interpreter's bf16 dot is broken in Triton 3.6, so bf16 takes this path under TRITON_INTERPRET)."""
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _dropout_keep(seed, rows, cols, threshold, TRANSPOSED: tl.constexpr):
    """Attention-dropout keep mask of the tile rows x cols ((cols, rows) if TRANSPOSED).

    ``rows``: global query rows ``bh * N_Q + m``; ``cols``: key indices n. Element (row, n) is kept iff the
    first 32-bit word of Philox-4x32-10(key = seed, counter = (n, row, 0, 0)), shifted right by one, is
    ``>= threshold`` (= round(p · 2^31)): P(keep) = 1 − p. Nothing is stored; every pass regenerates it.
    """
    if TRANSPOSED:
        c0 = cols[:, None] + rows[None, :] * 0
        c1 = rows[None, :] + cols[:, None] * 0
    else:
        c0 = cols[None, :] + rows[:, None] * 0
        c1 = rows[:, None] + cols[None, :] * 0
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return (r >> 1).to(tl.int32) >= threshold


def _prune_fwd(configs, named_args, **kwargs):
    """fp32 / fp64 with head dims > 32 (SegViT ViT-L's 64): 8 warps only (sm_90, exact fp32 dots, 64 x 64 tile:
    4 warps spilled 672-1836 B, 8 warps <= 32 B). Otherwise every config (0 B)."""
    if named_args["Q"].dtype.itemsize < 4 or kwargs.get("BLOCK_D", 32) <= 32:
        return configs
    return [c for c in configs if c.num_warps >= 8] or configs


@triton.autotune(configs=_configs("fwd"), key=["N_Q", "BLOCK_D", "N_K"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, Blocks, Counts, Seed, Acc, Mx, Lsum,
    qk_scale, drop_threshold,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm,
    stride_cb, stride_ch,
    H, N_Q, N_K, HEAD_DIM, N_KB,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query block, batch·head, split): unnormalised partial output and its row max / row sum over
    the split's share of the query block's non-empty key tiles (``Blocks``, ``Counts``). With DROPOUT the
    row sum is of the undropped probabilities and the output sums only the kept ones (the 1 / (1 − p) is
    applied by the combine kernel)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < N_Q) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    tile_row = b * stride_cb + h * stride_ch + pid_m
    j_start, j_end = _split_of_tiles(Counts, tile_row, pid_s, N_KB, HAS_MASK)
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for j in range(j_start, j_end):
        n0 = _tile_key_start(Blocks, tile_row, j, N_KB, HAS_MASK, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed, _ = _mask_tile(mask_base, offs_m, n0, stride_mm, N_Q, N_K, HAS_MASK, False, BLOCK_M, BLOCK_N)
        kv_ok = (offs_n[:, None] < N_K) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, pid_bh * N_Q + offs_m, offs_n, drop_threshold, False), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    # partial results: (S, B*H, N_Q, BLOCK_D) and (S, B*H, N_Q), contiguous
    row = (pid_s * tl.num_programs(1) + pid_bh) * N_Q + offs_m
    m_ok = offs_m < N_Q
    tl.store(Acc + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_ok[:, None])
    tl.store(Mx + row, m_i, mask=m_ok)
    tl.store(Lsum + row, l_i, mask=m_ok)


@triton.jit
def _combine_kernel(
    Acc, Mx, Lsum, O, LSE,
    out_scale,
    stride_ob, stride_oh, stride_om,
    H, N_Q, HEAD_DIM, NUM_SPLITS, BH,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the key splits: o = out_scale · Σ acc_s 2^(m_s−m) / Σ l_s 2^(m_s−m); lse = m + log2(l) (+inf if
    l = 0). out_scale is 1 / (1 − p) with dropout, else 1."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    m_tot = tl.full([BLOCK_M], float("-inf"), ACC)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(Mx + (s * BH + pid_bh) * N_Q + offs_m, mask=m_ok, other=float("-inf"))
        m_tot = tl.maximum(m_tot, m_s)
    m_ref = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    l_tot = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(0, NUM_SPLITS):
        row = (s * BH + pid_bh) * N_Q + offs_m
        w = tl.exp2(tl.load(Mx + row, mask=m_ok, other=float("-inf")) - m_ref)
        l_tot += w * tl.load(Lsum + row, mask=m_ok, other=0.0)
        acc += w[:, None] * tl.load(Acc + row[:, None] * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    empty = l_tot == 0.0
    out = acc * (out_scale / tl.where(empty, 1.0, l_tot))[:, None]
    b = pid_bh // H
    h = pid_bh % H
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(empty, float("inf"), m_ref + tl.log2(tl.where(empty, 1.0, l_tot)))
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=m_ok)


def _prune_dkdv(configs, named_args, **kwargs):
    """dk/dv configs that do not spill (sm_90, head dim 32; benchmarks/results/notes/masked_attention_resources.md).
    fp16 / bf16: every config (0 B). fp32 / fp64: SUB_M <= 32, and <= 16 with dropout (SUB_M = 64 spills
    264-1516 B; 32 with dropout up to 276 B; 16: 0 B)."""
    if named_args["Q"].dtype.itemsize < 4:
        return configs
    limit = 16 if kwargs.get("DROPOUT", False) else 32
    if kwargs.get("LOGITS_GRAD") and kwargs.get("BLOCK_D", 32) >= 64:
        limit = 16  # ATM attention, head dim 64: SUB_M = 32 spills 1716-1880 B with 4 warps, 16: <= 28 B
    kept = [c for c in configs if c.kwargs.get("SUB_M", 0) <= limit]
    return kept or configs


@triton.autotune(configs=_configs("dkdv"), key=["N_Q", "BLOCK_D", "N_K", "LOGITS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, Mask, Flags, Seed, DK, DV, DQP, DQ, DL,
    qk_scale, sm_scale, drop_threshold, keep_scale, dl_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm,
    stride_cb, stride_ch,
    stride_lb, stride_lm,
    H, N_Q, N_K, HEAD_DIM, N_KB, NUM_SPLITS,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
):
    """Programs (key block < N_KB, batch·head): dk, dv (:func:`_dkdv_block`). Programs (N_KB + query block,
    batch·head): dq = scale · Σ_s dq_part[s] cast to q's dtype (the dq kernel ran before: stream order)."""
    if tl.program_id(0) < N_KB:
        _dkdv_block(Q, K, V, DO, LSE, Delta, Mask, Flags, Seed, DK, DV, DL,
                    qk_scale, sm_scale, drop_threshold, keep_scale, dl_scale,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                    stride_mb, stride_mh, stride_mm, stride_cb, stride_ch, stride_lb, stride_lm,
                    H, N_Q, N_K, HEAD_DIM, N_KB,
                    HAS_MASK, DROPOUT, PRECISION, ACC, BLOCK_D, BLOCK_M, BLOCK_N, SUB_M, LOGITS_GRAD)
    else:
        pid_m = tl.program_id(0) - N_KB
        pid_bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N_Q
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for s in range(0, NUM_SPLITS):
            row = (s * tl.num_programs(1) + pid_bh) * N_Q + offs_m
            dq += tl.load(DQP + row[:, None] * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        b = pid_bh // H
        h = pid_bh % H
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dkdv_block(
    Q, K, V, DO, LSE, Delta, Mask, Flags, Seed, DK, DV, DL,
    qk_scale, sm_scale, drop_threshold, keep_scale, dl_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm,
    stride_cb, stride_ch,
    stride_lb, stride_lm,
    H, N_Q, N_K, HEAD_DIM, N_KB,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
):
    """One (key block, batch·head): dk, dv over all queries, in the transposed (key-major) form. With
    DROPOUT (keep mask Z regenerated): dv = (P∘Z)ᵀ dO / (1 − p), dS = P ∘ (Z ∘ dO Vᵀ / (1 − p) − delta).
    LOGITS_GRAD: dS += dl_scale · DL[b]ᵀ (ATM attention's head-mean logits gradient, DL (B, N_Q, N_K))."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (offs_n[:, None] < N_K) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    mask_base = Mask + b * stride_mb + h * stride_mh
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    flag_row = b * stride_cb + h * stride_ch
    if DROPOUT:
        seed = tl.load(Seed)
    for m0 in range(0, N_Q, BLOCK_M):
        if HAS_MASK:  # skip empty tiles (flag from tile_lists: no in-kernel reduction)
            tile_ok = tl.load(Flags + (flag_row + m0 // BLOCK_M) * N_KB + pid_n) != 0
        else:
            tile_ok = True
        if tile_ok:
            for sub in range(0, BLOCK_M // SUB_M):  # SUB_M rows at a time: fewer live registers
                offs_m = m0 + sub * SUB_M + tl.arange(0, SUB_M)
                allowed, _ = _mask_tile(mask_base, offs_m, pid_n * BLOCK_N, stride_mm, N_Q, N_K,
                                        HAS_MASK, True, SUB_M, BLOCK_N)  # (N, SUB_M)
                qo_ok = (offs_m[:, None] < N_Q) & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qo_ok, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=qo_ok, other=0.0)
                lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
                delta = tl.load(Delta + pid_bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
                s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale
                p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
                dp_t = _dot(v, tl.trans(do), PRECISION)
                if DROPOUT:
                    keep_t = _dropout_keep(seed, pid_bh * N_Q + offs_m, offs_n, drop_threshold, True)
                    dv += _dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, PRECISION)
                    dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
                else:
                    dv += _dot(p_t.to(do.dtype), do, PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                if LOGITS_GRAD:
                    ds_t += dl_scale * tl.load(DL + b * stride_lb + offs_m[None, :] * stride_lm + offs_n[:, None],
                                               mask=(offs_m[None, :] < N_Q) & (offs_n[:, None] < N_K),
                                               other=0.0).to(ACC)
                dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    dk *= sm_scale
    if DROPOUT:
        dv *= keep_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


def _prune_dq(configs, named_args, **kwargs):
    """fp32 / fp64 with dropout, or the ATM logits gradient at head dim 64: 8 warps only (sm_90, exact fp32
    dots: 4 warps spill 516-780 B with dropout (1048-1148 B with the logits gradient), 2524-2596 B with the
    logits gradient at head dim 64; 8 warps 0-104 B). Everything else: every config."""
    wide = kwargs.get("DROPOUT") or (kwargs.get("LOGITS_GRAD") and kwargs.get("BLOCK_D", 32) >= 64)
    if named_args["Q"].dtype.itemsize < 4 or not wide:
        return configs
    return [c for c in configs if c.num_warps >= 8] or configs


@triton.autotune(configs=_configs("dq"), key=["N_Q", "BLOCK_D", "N_K", "LOGITS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, LSE, Delta, Mask, Blocks, Counts, Seed, DQ, DL,
    qk_scale, drop_threshold, keep_scale, dl_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm,
    stride_cb, stride_ch,
    stride_lb, stride_lm,
    H, N_Q, N_K, HEAD_DIM, N_KB,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
):
    """One (query block, batch·head, split): partial dq (unscaled) into (S, B*H, N_Q, BLOCK_D). Computes
    delta = rowsum(dO ∘ O) itself (split 0 stores it for the dk/dv kernel, launched next). LOGITS_GRAD (ATM
    attention): dS += dl_scale · DL[b] with DL (B, N_Q, N_K) the gradient of the head-mean logits."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qo_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=qo_ok, other=0.0)
    lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=qo_ok, other=0.0)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    if pid_s == 0:
        tl.store(Delta + pid_bh * N_Q + offs_m, delta, mask=m_ok)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    tile_row = b * stride_cb + h * stride_ch + pid_m
    j_start, j_end = _split_of_tiles(Counts, tile_row, pid_s, N_KB, HAS_MASK)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if DROPOUT:
        seed = tl.load(Seed)
    for j in range(j_start, j_end):
        n0 = _tile_key_start(Blocks, tile_row, j, N_KB, HAS_MASK, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed, _ = _mask_tile(mask_base, offs_m, n0, stride_mm, N_Q, N_K, HAS_MASK, False, BLOCK_M, BLOCK_N)
        kv_ok = (offs_n[:, None] < N_K) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, pid_bh * N_Q + offs_m, offs_n, drop_threshold, False)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if LOGITS_GRAD:
            ds += dl_scale * tl.load(DL + b * stride_lb + offs_m[:, None] * stride_lm + offs_n[None, :],
                                     mask=m_ok[:, None] & (offs_n[None, :] < N_K), other=0.0).to(ACC)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    row = (pid_s * tl.num_programs(1) + pid_bh) * N_Q + offs_m
    tl.store(DQ + row[:, None] * BLOCK_D + offs_d[None, :], dq, mask=m_ok[:, None])


@triton.jit
def _weights_kernel(
    Q, K, LSE, Mask, Seed, W,
    qk_scale, drop_threshold, keep_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm,
    stride_wb, stride_wh, stride_wm,
    H, N_Q, N_K, HEAD_DIM,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, AVERAGE: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query block, key block, batch [· head]): the attention weights p = 2^(s − lse) recomputed from
    the forward's row statistics (0 where masked, dropped entries 0 and kept ones · 1 / (1 − p) with
    DROPOUT), summed over the heads in registers and scaled by 1 / H when AVERAGE."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    if AVERAGE:
        b = pid_z
        h_lo = 0
        h_hi = H
    else:
        b = pid_z // H
        h_lo = pid_z % H
        h_hi = h_lo + 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    n_ok = offs_n < N_K
    if DROPOUT:
        seed = tl.load(Seed)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for h in range(h_lo, h_hi):
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + (b * H + h) * N_Q + offs_m, mask=m_ok, other=float("inf"))
        allowed, _ = _mask_tile(Mask + b * stride_mb + h * stride_mh, offs_m, pid_n * BLOCK_N, stride_mm, N_Q, N_K,
                                HAS_MASK, False, BLOCK_M, BLOCK_N)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, (b * H + h) * N_Q + offs_m, offs_n, drop_threshold, False), p, 0.0)
        acc += p
    acc *= keep_scale  # 1 / (1 - p), and 1 / H when averaging
    tl.store(W + b * stride_wb + h_lo * stride_wh + offs_m[:, None] * stride_wm + offs_n[None, :],
             acc.to(W.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _weights_grad_tile(q, k, lse, allowed, dw, r, seed, rows, cols, qk_scale, drop_threshold, g_scale,
                       TRANSPOSED: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """(P, dP) of one tile for the weights' backward: P = softmax probabilities, dP = g_scale · Z ∘ dW
    (g_scale = 1 / (1 − p), / H when averaged), both (M, N), or (N, M) if TRANSPOSED (then q, k swap roles)."""
    if TRANSPOSED:
        s = _dot(k, tl.trans(q), PRECISION) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse[None, :]), 0.0)
    else:
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
    dp = dw * g_scale
    if DROPOUT:
        dp = tl.where(_dropout_keep(seed, rows, cols, drop_threshold, TRANSPOSED), dp, 0.0)
    return p, dp


@triton.jit
def _weights_row_tile(q, k_base, mask_base, dw_base, lse, seed, rows, offs_m, m_ok, offs_d, d_ok, n0,
                      stride_kn, stride_mm, stride_gm, N_Q, N_K, qk_scale, drop_threshold, g_scale,
                      HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the dq kernel's two passes: the k tile of keys n0 .. n0 + BLOCK_N and (P, dP) of the (query block,
    key block) tile, from k, the mask tile and the dW tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    allowed, _ = _mask_tile(mask_base, offs_m, n0, stride_mm, N_Q, N_K, HAS_MASK, False, BLOCK_M, BLOCK_N)
    dw = tl.load(dw_base + offs_m[:, None] * stride_gm + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                 other=0.0).to(ACC)
    p, dp = _weights_grad_tile(q, k, lse, allowed, dw, 0, seed, rows, offs_n, qk_scale, drop_threshold, g_scale,
                               False, DROPOUT, PRECISION)
    return k, p, dp


@triton.jit
def _weights_bwd_dq_kernel(
    Q, K, LSE, Mask, Seed, DW, R, DQ,
    qk_scale, sm_scale, drop_threshold, g_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm,
    stride_gb, stride_gh, stride_gm,
    H, N_Q, N_K, HEAD_DIM,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of the returned weights, one (query block, batch·head): r = rowsum(P ∘ dP) (stored for the
    dk kernel), then dq = scale · (P ∘ (dP − r)) k."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    rows = pid_bh * N_Q + offs_m
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + rows, mask=m_ok, other=float("inf"))
    k_base = K + b * stride_kb + h * stride_kh
    mask_base = Mask + b * stride_mb + h * stride_mh
    dw_base = DW + b * stride_gb + h * stride_gh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    r = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, N_K, BLOCK_N):
        k, p, dp = _weights_row_tile(q, k_base, mask_base, dw_base, lse, seed, rows, offs_m, m_ok, offs_d, d_ok, n0,
                                     stride_kn, stride_mm, stride_gm, N_Q, N_K, qk_scale, drop_threshold, g_scale,
                                     HAS_MASK, DROPOUT, PRECISION, ACC, BLOCK_M, BLOCK_N)
        r += tl.sum(p * dp, axis=1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, N_K, BLOCK_N):
        k, p, dp = _weights_row_tile(q, k_base, mask_base, dw_base, lse, seed, rows, offs_m, m_ok, offs_d, d_ok, n0,
                                     stride_kn, stride_mm, stride_gm, N_Q, N_K, qk_scale, drop_threshold, g_scale,
                                     HAS_MASK, DROPOUT, PRECISION, ACC, BLOCK_M, BLOCK_N)
        ds = p * (dp - r[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(R + rows, r, mask=m_ok)
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _weights_bwd_dk_kernel(
    Q, K, LSE, Mask, Seed, DW, R, DK,
    qk_scale, sm_scale, drop_threshold, g_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm,
    stride_gb, stride_gh, stride_gm,
    H, N_Q, N_K, HEAD_DIM,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of the returned weights, one (key block, batch·head): dk = scale · (P ∘ (dP − r))ᵀ q."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N_K
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    mask_base = Mask + b * stride_mb + h * stride_mh
    dw_base = DW + b * stride_gb + h * stride_gh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, N_Q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        rows = pid_bh * N_Q + offs_m
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + rows, mask=m_ok, other=float("inf"))
        r = tl.load(R + rows, mask=m_ok, other=0.0)
        allowed, _ = _mask_tile(mask_base, offs_m, pid_n * BLOCK_N, stride_mm, N_Q, N_K, HAS_MASK, True,
                                BLOCK_M, BLOCK_N)  # (N, M)
        dw = tl.load(dw_base + offs_m[None, :] * stride_gm + offs_n[:, None], mask=m_ok[None, :] & n_ok[:, None],
                     other=0.0).to(ACC)
        p_t, dp_t = _weights_grad_tile(q, k, lse, allowed, dw, r, seed, rows, offs_n, qk_scale, drop_threshold,
                                       g_scale, True, DROPOUT, PRECISION)
        ds_t = p_t * (dp_t - r[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    tl.store(DK + (pid_bh * N_K + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _keep_mask_kernel(Seed, Keep, drop_threshold, N_ROWS, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep mask of :func:`_dropout_keep` as int8 (rows = B·H·N_Q, N_K), for tests."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), rows, cols, drop_threshold, False)
    tl.store(Keep + rows[:, None].to(tl.int64) * N_K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < N_ROWS) & (cols[None, :] < N_K))


@triton.jit
def _tile_list_kernel(
    Mask, Blocks, Counts, Flags,
    N_Q, N_QB, N_WORDS, N_KB,
    BLOCK_M: tl.constexpr, WORDS_PER_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """For one (mask batch·head, query block): which key blocks have an allowed bit (Flags) and their
    indices compacted by a prefix sum (Blocks, Counts)."""
    row = tl.program_id(0)  # over G * N_QB
    g = row // N_QB
    offs_m = (row % N_QB) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = tl.zeros([], tl.int32)
    for c0 in range(0, N_KB, CHUNK):
        kb = c0 + tl.arange(0, CHUNK)
        w = kb[:, None] * WORDS_PER_BLOCK + tl.arange(0, WORDS_PER_BLOCK)[None, :]  # (CHUNK, WPB)
        words = tl.load(Mask + (g * N_Q + offs_m[:, None, None]) * N_WORDS + w[None, :, :],
                        mask=(offs_m < N_Q)[:, None, None] & (w < N_WORDS)[None, :, :], other=0)
        flag = tl.max(tl.max((words != 0).to(tl.int32), axis=2), axis=0)  # (CHUNK,)
        pos = base + tl.cumsum(flag, 0) - 1
        tl.store(Blocks + row * N_KB + pos, kb, mask=flag > 0)
        tl.store(Flags + row * N_KB + kb, flag.to(tl.int8), mask=kb < N_KB)
        base += tl.sum(flag, 0)
    tl.store(Counts + row, base)


@triton.jit
def _pack_tile_list_kernel(
    AM, KPM, Bits, Blocks, Counts, Flags,
    stride_ab, stride_ah, stride_aq, stride_an,
    stride_kb, stride_kn,
    H_OUT, N_Q, N_K, N_WORDS, N_QB, N_KB,
    HAS_AM: tl.constexpr, AM_MASKED: tl.constexpr, HAS_KPM: tl.constexpr, KPM_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, WORDS_PER_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """:func:`_pack_kernel` and :func:`_tile_list_kernel` in one pass, for one (mask batch·head, query
    block): reads the bool masks of BLOCK_M queries CHUNK key blocks at a time, writes their packed words
    (Bits) and the block's non-empty key blocks (Flags, Blocks, Counts) from the words still in registers."""
    row = tl.program_id(0)  # over Bm * Hm * N_QB
    g = row // N_QB
    b = g // H_OUT
    h = g % H_OUT
    offs_m = (row % N_QB) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    bit = tl.arange(0, 32)
    CW: tl.constexpr = CHUNK * WORDS_PER_BLOCK
    base = tl.zeros([], tl.int32)
    for c0 in range(0, N_KB, CHUNK):
        offs_w = c0 * WORDS_PER_BLOCK + tl.arange(0, CW)
        offs_n = offs_w[:, None] * 32 + bit[None, :]  # (CW, 32)
        n_ok = offs_n < N_K
        allowed = m_ok[:, None, None] & n_ok[None, :, :]  # (BLOCK_M, CW, 32)
        if HAS_AM:
            a = tl.load(AM + b * stride_ab + h * stride_ah + offs_m[:, None, None] * stride_aq
                        + offs_n[None, :, :] * stride_an, mask=allowed, other=0)
            if AM_MASKED:
                allowed = allowed & (a == 0)
            else:
                allowed = allowed & (a != 0)
        if HAS_KPM:
            kp = tl.load(KPM + b * stride_kb + offs_n * stride_kn, mask=n_ok, other=0)
            if KPM_MASKED:
                allowed = allowed & (kp == 0)[None, :, :]
            else:
                allowed = allowed & (kp != 0)[None, :, :]
        words = tl.sum(allowed.to(tl.int32) << bit[None, None, :], axis=2)  # (BLOCK_M, CW); distinct bits
        tl.store(Bits + (g * N_Q + offs_m[:, None]) * N_WORDS + offs_w[None, :], words,
                 mask=m_ok[:, None] & (offs_w < N_WORDS)[None, :])
        nonzero = tl.max((words != 0).to(tl.int32), axis=0)  # (CW,)
        flag = tl.max(tl.reshape(nonzero, [CHUNK, WORDS_PER_BLOCK]), axis=1)  # (CHUNK,)
        kb = c0 + tl.arange(0, CHUNK)
        pos = base + tl.cumsum(flag, 0) - 1
        tl.store(Blocks + row * N_KB + pos, kb, mask=flag > 0)
        tl.store(Flags + row * N_KB + kb, flag.to(tl.int8), mask=kb < N_KB)
        base += tl.sum(flag, 0)
    tl.store(Counts + row, base)


@triton.jit
def _pack_kernel(
    AM, KPM, Bits,
    stride_ab, stride_ah, stride_aq, stride_an,
    stride_kb, stride_kn,
    H_OUT, N_Q, N_K, N_WORDS,
    HAS_AM: tl.constexpr, AM_MASKED: tl.constexpr, HAS_KPM: tl.constexpr, KPM_MASKED: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Pack one (b, h, q) row of uint8 masks into int32 words; bit = 1 means allowed."""
    row = tl.program_id(0)  # over Bm * Hm * N_Q
    pid_w = tl.program_id(1)
    qi = row % N_Q
    bh = row // N_Q
    b = bh // H_OUT
    h = bh % H_OUT
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 32)
    offs_n = offs_w[:, None] * 32 + bit[None, :]
    inside = offs_n < N_K
    allowed = inside
    if HAS_AM:
        a = tl.load(AM + b * stride_ab + h * stride_ah + qi * stride_aq + offs_n * stride_an, mask=inside, other=0)
        if AM_MASKED:
            allowed = allowed & (a == 0)
        else:
            allowed = allowed & (a != 0)
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_kb + offs_n * stride_kn, mask=inside, other=0)
        if KPM_MASKED:
            allowed = allowed & (kp == 0)
        else:
            allowed = allowed & (kp != 0)
    words = tl.sum(allowed.to(tl.int32) << bit[None, :], axis=1)  # distinct bits: sum == or
    tl.store(Bits + row * N_WORDS + offs_w, words, mask=offs_w < N_WORDS)


# ------------------------------------------------------------ ATM attention (SegViT): head-mean logits


@triton.jit
def _atm_logits_kernel(
    Q, K, Logits, logit_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lm,
    H, N_Q, N_K, HEAD_DIM,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The head-mean logits ``logit_scale · Σ_h q_h k_hᵀ`` (logit_scale = scale / H) of one (query block, key
    block, batch), heads summed in a fixed order in registers, written once, (B, N_Q, N_K) in ACC: a GEMM over
    the C = H · HEAD_DIM channels (the attention output comes from :func:`_fwd_kernel`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    logits = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for h in range(0, H):
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        logits += _dot(q, tl.trans(k), PRECISION)
    tl.store(Logits + b * stride_lb + offs_m[:, None] * stride_lm + offs_n[None, :], logits * logit_scale,
             mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------- launch


def _precision(dtype: torch.dtype, interpreted: bool | None = None) -> str:
    """tl.dot input precision. fp32 follows PyTorch's own fp32 matmul setting, read when the op is called:
    TF32 tensor cores when ``torch.get_float32_matmul_precision()`` is "high" / "medium" (equivalently
    ``torch.backends.cuda.matmul.allow_tf32 = True``), exact fp32 ("ieee") when it is "highest" (PyTorch's
    default). fp16 / bf16 always run on tensor cores (fp32 accumulation); fp64 is exact. Under the
    interpreter: exact (bf16 through fp32, the interpreter's bf16 dot being broken in Triton 3.6)."""
    if interpreter_enabled() if interpreted is None else interpreted:
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    # allow_tf32 is what cuBLAS consults; it reflects set_float32_matmul_precision too (and, unlike
    # get_float32_matmul_precision, reading it never raises after mixing the legacy and new APIs).
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """Accumulation dtype (torch, triton): fp64 inputs accumulate in fp64, all others in fp32."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _num_splits(bh: int, n_qb: int, n_kb: int, device: torch.device, num_splits: int | None) -> int:
    """Programs sharing one query block's tiles: enough programs to fill the GPU (~4 per SM)."""
    if num_splits is None:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = triton.cdiv(target, bh * n_qb)
    return max(1, min(num_splits, n_kb))


def tile_lists(bits: torch.Tensor, n_q: int, n_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-empty (query block, key block) tiles of a packed mask at the :data:`TILE` granularity.

    Returns ``blocks`` (Gb, Gh, n_qb, n_kb) int32 — for each query block the ascending indices of the key
    blocks with at least one allowed bit, in its first ``counts`` entries (the rest is unused) — and
    ``counts`` (Gb, Gh, n_qb) int32, and ``flags`` (Gb, Gh, n_qb, n_kb) int8 (1 = tile not empty).
    (Gb, Gh) are the mask's (batch, head) sizes.
    """
    bm, bn = TILE
    n_qb, n_kb = triton.cdiv(n_q, bm), triton.cdiv(n_k, bn)
    gb, gh, _, n_words = bits.shape
    bits = bits.contiguous()
    blocks = torch.empty((gb, gh, n_qb, n_kb), device=bits.device, dtype=torch.int32)
    counts = torch.empty((gb, gh, n_qb), device=bits.device, dtype=torch.int32)
    flags = torch.empty((gb, gh, n_qb, n_kb), device=bits.device, dtype=torch.int8)
    record_launch("masked_attention_tile_list")
    _tile_list_kernel[(gb * gh * n_qb,)](
        bits, blocks, counts, flags, n_q, n_qb, n_words, n_kb,
        BLOCK_M=bm, WORDS_PER_BLOCK=bn // 32, CHUNK=16 if interpreter_enabled() else 64,
    )
    return blocks, counts, flags


def _mask_args(bits: torch.Tensor | None, q: torch.Tensor):
    if bits is None:
        return q, (0, 0, 0), False  # dummy pointer, never read
    sb = bits.stride(0) if bits.shape[0] > 1 else 0
    sh = bits.stride(1) if bits.shape[1] > 1 else 0
    return bits, (sb, sh, bits.stride(2)), True


def _list_strides(counts: torch.Tensor) -> tuple[int, int]:
    gb, gh, n_qb = counts.shape[:3]
    return (gh * n_qb if gb > 1 else 0), (n_qb if gh > 1 else 0)


def _dropout_args(seed: torch.Tensor | None, dropout_p: float, like: torch.Tensor):
    """(seed pointer, threshold, 1 / (1 − p), DROPOUT): the kernels' dropout arguments."""
    if seed is None or dropout_p == 0.0:
        return like, 0, 1.0, False  # dummy pointer, never read
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return seed, min(round(dropout_p * 2**31), 2**31 - 1), 1.0 / (1.0 - dropout_p), True


def forward(q, k, v, bits, scale: float, num_splits: int | None = None, seed=None, dropout_p: float = 0.0,
            lists=None):
    """Returns (o, lse, blocks, counts, flags): o like q (B, H, M, D) in q's dtype and memory layout, lse (B, H, M)
    fp32, and the tile lists of :func:`tile_lists` (reused by the backward pass). ``seed``: int64 (1,) tensor
    on q's device, the Philox key of the attention dropout (used when dropout_p > 0). ``lists``: the
    (blocks, counts, flags) of ``bits`` when already built (:func:`pack_with_tile_lists`), else built here."""
    B, H, M, D = q.shape
    N = k.shape[2]
    BD = _block_d(D)
    acc_t, acc_tl = _acc(q.dtype)
    n_qb, n_kb = triton.cdiv(M, TILE[0]), triton.cdiv(N, TILE[1])
    if bits is not None:
        blocks, counts, flags = tile_lists(bits, M, N) if lists is None else lists
    else:  # every tile: the kernels do not read the (empty) lists
        blocks = torch.empty((1, 1, n_qb, 0), device=q.device, dtype=torch.int32)
        counts = torch.empty((1, 1, n_qb, 0), device=q.device, dtype=torch.int32)
        flags = torch.empty((1, 1, n_qb, 0), device=q.device, dtype=torch.int8)
    splits = _num_splits(B * H, n_qb, n_kb, q.device, num_splits)
    acc = torch.empty((splits, B * H, M, BD), device=q.device, dtype=acc_t)
    mx = torch.empty((splits, B * H, M), device=q.device, dtype=acc_t)
    lsum = torch.empty_like(mx)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, M), device=q.device, dtype=acc_t)
    mask, ms, has_mask = _mask_args(bits, q)
    seed, threshold, inv_keep, dropout = _dropout_args(seed, dropout_p, q)
    record_launch("masked_attention_fwd")
    _fwd_kernel[(n_qb, B * H, splits)](
        q, k, v, mask, blocks, counts, seed, acc, mx, lsum, scale * LOG2E, threshold,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *_list_strides(counts),
        H, M, N, D, n_kb,
        HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=_precision(q.dtype), ACC=acc_tl, BLOCK_D=BD,
    )
    bm = 16 if interpreter_enabled() else 64
    record_launch("masked_attention_combine")
    _combine_kernel[(triton.cdiv(M, bm), B * H)](
        acc, mx, lsum, o, lse, inv_keep, *o.stride()[:3], H, M, D, splits, B * H,
        ACC=acc_tl, BLOCK_D=BD, BLOCK_M=bm, num_warps=4,
    )
    return o, lse, blocks, counts, flags


def backward(do, q, k, v, o, lse, bits, blocks, counts, flags, scale: float, num_splits: int | None = None,
             seed=None, dropout_p: float = 0.0, dlogits=None):
    """Returns (dq, dk, dv), each like its input (dtype and memory layout); seed / dropout_p as in forward.
    Two launches: the dq kernel (partial dq per key split, and delta), then the dk/dv kernel, whose extra
    programs sum the dq splits. ``dlogits``: (B, M, N) gradient of the head-mean logits of :func:`atm_forward`
    (added to every head's dS / H), or None."""
    B, H, M, D = q.shape
    N = k.shape[2]
    BD = _block_d(D)
    if do.stride(-1) != 1:
        do = do.contiguous()
    acc_t, acc_tl = _acc(q.dtype)
    delta = torch.empty((B, H, M), device=q.device, dtype=acc_t)  # rowsum(dO * O), written by the dq kernel
    lse = lse.contiguous()
    mask, ms, has_mask = _mask_args(bits, q)
    prec = _precision(q.dtype)
    seed, threshold, inv_keep, dropout = _dropout_args(seed, dropout_p, q)
    n_qb, n_kb = triton.cdiv(M, TILE[0]), triton.cdiv(N, TILE[1])
    splits = _num_splits(B * H, n_qb, n_kb, q.device, num_splits)
    dq_part = torch.empty((splits, B * H, M, BD), device=q.device, dtype=acc_t)
    if dlogits is not None and dlogits.stride(-1) != 1:
        dlogits = dlogits.contiguous()
    dl, dls = (dlogits, dlogits.stride()[:2]) if dlogits is not None else (q, (0, 0))  # dummy pointer, never read
    record_launch("masked_attention_bwd_dq")
    _bwd_dq_kernel[(n_qb, B * H, splits)](
        q, k, v, do, o, lse, delta, mask, blocks, counts, seed, dq_part, dl, scale * LOG2E, threshold, inv_keep,
        1.0 / H, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o.stride()[:3], *ms,
        *_list_strides(counts), *dls, H, M, N, D, n_kb,
        HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec, ACC=acc_tl, BLOCK_D=BD, LOGITS_GRAD=dlogits is not None,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    record_launch("masked_attention_bwd_dkdv")  # also reduces the dq splits (extra programs)
    _bwd_dkdv_kernel[(n_kb + n_qb, B * H)](
        q, k, v, do, lse, delta, mask, flags, seed, dk, dv, dq_part, dq, dl, scale * LOG2E, scale, threshold, inv_keep,
        1.0 / H, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *dq.stride()[:3], *ms, *_list_strides(counts), *dls,
        H, M, N, D, n_kb, splits,
        HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec, ACC=acc_tl, BLOCK_D=BD, LOGITS_GRAD=dlogits is not None,
    )
    return dq, dk, dv


def weights(q, k, lse, bits, scale: float, average: bool, seed=None, dropout_p: float = 0.0) -> torch.Tensor:
    """The attention weights of :func:`forward`'s call, from its ``lse``: (B, M, N) averaged over the heads,
    else (B, H, M, N), in q's dtype (dropout applied as in the forward pass, kept entries · 1 / (1 − p))."""
    B, H, M, D = q.shape
    N = k.shape[2]
    acc_t, acc_tl = _acc(q.dtype)
    w = torch.empty((B, M, N) if average else (B, H, M, N), device=q.device, dtype=q.dtype)
    sw = (w.stride(0), 0, w.stride(1)) if average else w.stride()[:3]
    mask, ms, has_mask = _mask_args(bits, q)
    seed, threshold, inv_keep, dropout = _dropout_args(seed, dropout_p, q)
    bm, bn = TILE
    record_launch("masked_attention_weights")
    _weights_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), B if average else B * H)](
        q, k, lse, mask, seed, w, scale * LOG2E, threshold, inv_keep / H if average else inv_keep,
        *q.stride()[:3], *k.stride()[:3], *ms, *sw, H, M, N, D,
        HAS_MASK=has_mask, DROPOUT=dropout, AVERAGE=average, PRECISION=_precision(q.dtype), ACC=acc_tl,
        BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, num_warps=1 if interpreter_enabled() else 4,
    )
    return w


def weights_backward(dw, q, k, lse, bits, scale: float, average: bool, seed=None, dropout_p: float = 0.0):
    """Gradient of :func:`weights`' output ``dw`` ((B, M, N) or (B, H, M, N)) w.r.t. q and k: (dq, dk) like
    q and k (contiguous). Two kernels; r = rowsum(P ∘ dP) (B, H, M) passes between them."""
    B, H, M, D = q.shape
    N = k.shape[2]
    acc_t, acc_tl = _acc(q.dtype)
    if dw.stride(-1) != 1:
        dw = dw.contiguous()
    sg = (dw.stride(0), 0, dw.stride(1)) if average else dw.stride()[:3]
    mask, ms, has_mask = _mask_args(bits, q)
    seed, threshold, inv_keep, dropout = _dropout_args(seed, dropout_p, q)
    r = torch.empty((B, H, M), device=q.device, dtype=acc_t)
    dq = torch.empty((B, H, M, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, N, D), device=q.device, dtype=k.dtype)
    args = (scale * LOG2E, scale, threshold, inv_keep / H if average else inv_keep,
            *q.stride()[:3], *k.stride()[:3], *ms, *sg, H, M, N, D)
    meta = dict(HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=_precision(q.dtype), ACC=acc_tl, BLOCK_D=_block_d(D),
                BLOCK_M=TILE[0], BLOCK_N=TILE[1])
    # sm_90, 64 x 64 tiles, head dim 32: 4 warps / 3 stages spilled 180 B (fp16, dropout) and 652-1112 B (exact
    # fp32) in the dq kernel; 8 warps / 2 stages: 0 B in fp16 / bf16, <= 208 B in fp32
    warps, stages = (1, 1) if interpreter_enabled() else (8, 2)
    meta.update(num_warps=warps, num_stages=stages)
    record_launch("masked_attention_weights_bwd_dq")
    _weights_bwd_dq_kernel[(triton.cdiv(M, TILE[0]), B * H)](q, k, lse, mask, seed, dw, r, dq, *args, **meta)
    record_launch("masked_attention_weights_bwd_dk")
    _weights_bwd_dk_kernel[(triton.cdiv(N, TILE[1]), B * H)](q, k, lse, mask, seed, dw, r, dk, *args, **meta)
    return dq, dk


def keep_mask(seed: torch.Tensor, rows: int, n_k: int, dropout_p: float) -> torch.Tensor:
    """The dropout keep mask the kernels use for ``seed``: bool (rows, n_k), rows = B·H·M (row-major)."""
    seed, threshold, _, _ = _dropout_args(seed, dropout_p, seed)
    keep = torch.empty((rows, n_k), device=seed.device, dtype=torch.int8)
    bm, bn = TILE
    record_launch("masked_attention_keep_mask")
    _keep_mask_kernel[(triton.cdiv(rows, bm), triton.cdiv(n_k, bn))](seed, keep, threshold, rows, n_k,
                                                                     BLOCK_M=bm, BLOCK_N=bn)
    return keep.view(torch.bool)


def _pack_args(attn_mask, key_padding_mask, batch: int, heads: int, n_q: int, n_k: int):
    """What the pack kernels take: (bm, hm, n_words, bits (bm, hm, n_q, n_words) int32 to fill, the attn mask as
    uint8 + its 4 strides (0 on broadcast dims), the key-padding mask as uint8 + its 2 strides); an absent mask
    is replaced by ``bits`` (never read) and zero strides."""
    ref = attn_mask if attn_mask is not None else key_padding_mask
    bm = batch if (key_padding_mask is not None or attn_mask.shape[0] > 1) else 1
    hm = heads if (attn_mask is not None and attn_mask.shape[1] > 1) else 1
    n_words = triton.cdiv(n_k, 32)
    bits = torch.empty((bm, hm, n_q, n_words), device=ref.device, dtype=torch.int32)
    if attn_mask is not None:
        am = attn_mask.view(torch.uint8)
        sa = [am.stride(i) if am.shape[i] > 1 else 0 for i in range(4)]
    else:
        am, sa = bits, [0, 0, 0, 0]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        sk = [kpm.stride(0), kpm.stride(1)]
    else:
        kpm, sk = bits, [0, 0]
    return bm, hm, n_words, bits, am, sa, kpm, sk


def pack(attn_mask, key_padding_mask, *, attn_masked: bool, kpm_masked: bool, batch: int, heads: int,
         n_q: int, n_k: int) -> torch.Tensor:
    """Bit-pack masks into (Bm, Hm, n_q, ceil(n_k / 32)) int32 words (bit 1 = allowed).

    attn_mask: bool (Ba, Ha, n_q, n_k) with Ba in {1, batch}, Ha in {1, heads}, any strides, or None.
    key_padding_mask: bool (batch, n_k) or None. ``*_masked``: True means "True = masked out"
    (nn.MultiheadAttention's convention); False means "True = allowed" (SDPA's).
    """
    bm, hm, n_words, bits, am, sa, kpm, sk = _pack_args(attn_mask, key_padding_mask, batch, heads, n_q, n_k)
    block_w = 4 if interpreter_enabled() else 64
    record_launch("masked_attention_pack")
    _pack_kernel[(bm * hm * n_q, triton.cdiv(n_words, block_w))](
        am, kpm, bits, *sa, *sk, hm, n_q, n_k, n_words,
        HAS_AM=attn_mask is not None, AM_MASKED=attn_masked,
        HAS_KPM=key_padding_mask is not None, KPM_MASKED=kpm_masked, BLOCK_W=block_w,
    )
    return bits


def pack_with_tile_lists(attn_mask, key_padding_mask, *, attn_masked: bool, kpm_masked: bool, batch: int,
                         heads: int, n_q: int, n_k: int):
    """:func:`pack` and :func:`tile_lists` of its result in one launch: returns (bits, (blocks, counts, flags))
    with the shapes and meaning of those two functions (same arguments as :func:`pack`)."""
    bm, hm, n_words, bits, am, sa, kpm, sk = _pack_args(attn_mask, key_padding_mask, batch, heads, n_q, n_k)
    t_m, t_n = TILE
    n_qb, n_kb = triton.cdiv(n_q, t_m), triton.cdiv(n_k, t_n)
    dev = bits.device
    blocks = torch.empty((bm, hm, n_qb, n_kb), device=dev, dtype=torch.int32)
    counts = torch.empty((bm, hm, n_qb), device=dev, dtype=torch.int32)
    flags = torch.empty((bm, hm, n_qb, n_kb), device=dev, dtype=torch.int8)
    record_launch("masked_attention_pack_tile_list")
    _pack_tile_list_kernel[(bm * hm * n_qb,)](
        am, kpm, bits, blocks, counts, flags, *sa, *sk, hm, n_q, n_k, n_words, n_qb, n_kb,
        HAS_AM=attn_mask is not None, AM_MASKED=attn_masked,
        HAS_KPM=key_padding_mask is not None, KPM_MASKED=kpm_masked,
        # GPU: 8 key blocks (64 rows x 512 keys, 32 KB of bool mask) per step in flight; sm_90: 108-181 registers, 0 B spills
        BLOCK_M=t_m, WORDS_PER_BLOCK=t_n // 32, CHUNK=2 if interpreter_enabled() else 8,
        num_warps=1 if interpreter_enabled() else 8,
    )
    return bits, (blocks, counts, flags)


def atm_forward(q, k, v, scale: float, seed=None, dropout_p: float = 0.0):
    """SegViT's ATM attention. q: (B, H, M, D); k, v: (B, H, N, D). Returns ``(o, lse, logits)``: o like q
    (``dropout(softmax(q kᵀ · scale)) v``), lse (B, H, M) row log-sum-exp (base 2, as :func:`forward`'s,
    for :func:`backward`), logits (B, M, N) = the head mean of ``q kᵀ · scale`` (before softmax and
    dropout), fp32 (fp64 for fp64 inputs), contiguous. Three launches: :func:`forward` without a mask
    (flash-style over all keys, its few splits combined) and :func:`_atm_logits_kernel`. No (B, H, M, N)
    tensor. (The first version took one program per key block, looping over the heads, so that the logits came
    out of the same scores; its per-key-block partial results were 3/4 of its bytes:
    benchmarks/results/notes/bytes_attention_and_losses.md, F1.)"""
    B, H, M, D = q.shape
    N = k.shape[2]
    BD = _block_d(D)
    acc_t, acc_tl = _acc(q.dtype)
    o, lse, *_ = forward(q, k, v, None, scale, seed=seed, dropout_p=dropout_p)
    logits = torch.empty((B, M, N), device=q.device, dtype=acc_t)
    bm, bn = TILE if interpreter_enabled() else (64, 64)
    record_launch("atm_attention_logits")
    _atm_logits_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), B)](
        q, k, logits, scale / H, *q.stride()[:3], *k.stride()[:3], *logits.stride()[:2], H, M, N, D,
        PRECISION=_precision(q.dtype), ACC=acc_tl, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=1 if interpreter_enabled() else 4,
    )
    return o, lse, logits


def atm_backward(do, dlogits, q, k, v, o, lse, scale: float, seed=None, dropout_p: float = 0.0):
    """Gradients (dq, dk, dv) of :func:`atm_forward` from ``do`` (like o, or None) and ``dlogits`` ((B, M, N),
    or None): :func:`backward` without mask, whose kernels add ``dlogits / H`` to every head's dS. Two
    launches."""
    if do is None:
        do = torch.zeros_like(o)
    n_qb = triton.cdiv(q.shape[2], TILE[0])
    blocks = torch.empty((1, 1, n_qb, 0), device=q.device, dtype=torch.int32)  # no mask: lists never read
    flags = torch.empty((1, 1, n_qb, 0), device=q.device, dtype=torch.int8)
    return backward(do, q, k, v, o, lse, None, blocks, blocks, flags, scale, None, seed, dropout_p,
                    dlogits=dlogits)
