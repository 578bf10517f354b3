"""Masked attention as a differentiable op: the Triton kernels behind ``torch.library`` custom ops.

``masked_attention(q, k, v, attn_mask, key_padding_mask)`` computes ``softmax(q kᵀ / √D + mask) v`` per
(batch, head) without materialising the (M, N) score matrix, and reads the mask bit-packed
(:class:`PackedMask`, 1 bit per query/key pair, shared across heads when it is the same for every head).

Empty rows: a query with no allowed key outputs **0** (and gets zero gradient). ``nn.MultiheadAttention``
gives NaN there; Mask2Former avoids the case by letting such a query attend everywhere before the call.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend
from ..reference.masked_attention import masked_attention as _torch_masked_attention

__all__ = ["PackedMask", "pack_mask", "unpack_mask", "masked_attention", "dropout_seed", "dropout_keep_mask"]

_OP = "masked_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PackedMask(NamedTuple):
    """A bit-packed attention mask.

    bits: (Bm, Hm, M, ceil(N / 32)) int32 with Bm in {1, B} and Hm in {1, H}; bit ``n % 32`` of word
    ``n // 32`` is 1 when query m may attend to key n (SDPA's "True = allowed" convention).
    num_keys: N.
    """

    bits: torch.Tensor
    num_keys: int


def _kernels():
    from ..kernels import masked_attention as k  # imported lazily: triton is optional off Linux

    return k


# ------------------------------------------------------------------------------------------ mask helpers


def _as_4d(mask: torch.Tensor, batch: int, heads: int, n_q: int, n_k: int, what: str) -> torch.Tensor:
    """(M, N), (B·H, M, N) or (Ba, Ha, M, N) with Ba in {1, B}, Ha in {1, H} -> 4-D view."""
    if mask.dim() == 2 and mask.shape == (n_q, n_k):
        return mask.view(1, 1, n_q, n_k)
    if mask.dim() == 3 and mask.shape == (batch * heads, n_q, n_k):
        return mask.view(batch, heads, n_q, n_k)
    if mask.dim() == 4 and mask.shape[2:] == (n_q, n_k) and mask.shape[0] in (1, batch) and mask.shape[1] in (1, heads):
        return mask
    raise ValueError(
        f"{what} must have shape ({n_q}, {n_k}), ({batch * heads}, {n_q}, {n_k}) or "
        f"(1|{batch}, 1|{heads}, {n_q}, {n_k}); got {tuple(mask.shape)}"
    )


def _bool_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor here, got {mask.dtype}")
    return mask


def pack_mask(
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    batch: int,
    heads: int,
    num_queries: int,
    num_keys: int,
    masked: bool = False,
) -> PackedMask:
    """Bit-pack bool masks (one pass over them) into a :class:`PackedMask`.

    attn_mask: bool (M, N), (B·H, M, N) or (1|B, 1|H, M, N). key_padding_mask: bool (B, N).
    ``masked=True``: True means "masked out" (``nn.MultiheadAttention``); default: True means "allowed".
    A mask shared across heads (2-D, or size-1 / stride-0 head dimension) is packed once.
    """
    am, kpm = _pack_inputs(attn_mask, key_padding_mask, batch, heads, num_queries, num_keys)
    ref = am if am is not None else kpm
    if _backend.select(_OP, ref.device) == "triton":
        pack = _pack_op if torch.compiler.is_compiling() else _pack_impl
        return PackedMask(pack(am, kpm, masked, batch, heads, num_queries, num_keys), num_keys)
    allowed = _allowed_torch(am, kpm, masked, batch, num_keys)
    return PackedMask(_pack_torch(allowed), num_keys)


def _pack_inputs(attn_mask, key_padding_mask, batch: int, heads: int, num_queries: int, num_keys: int):
    """Checked 4-D attn_mask (a head / batch dimension broadcast by stride 0 reduced to size 1) and
    key_padding_mask, for the pack kernels."""
    if attn_mask is None and key_padding_mask is None:
        raise ValueError("pack_mask needs attn_mask or key_padding_mask")
    am = kpm = None
    if attn_mask is not None:
        am = _as_4d(_bool_mask(attn_mask, "attn_mask"), batch, heads, num_queries, num_keys, "attn_mask")
        if am.shape[1] > 1 and am.stride(1) == 0:  # expanded over heads: pack once
            am = am[:, :1]
        if am.shape[0] > 1 and am.stride(0) == 0:
            am = am[:1]
    if key_padding_mask is not None:
        kpm = _bool_mask(key_padding_mask, "key_padding_mask")
        if kpm.shape != (batch, num_keys):
            raise ValueError(f"key_padding_mask must have shape ({batch}, {num_keys}), got {tuple(kpm.shape)}")
    return am, kpm


def _allowed_torch(am, kpm, masked: bool, batch: int, n_k: int) -> torch.Tensor:
    allowed = None
    if am is not None:
        allowed = ~am if masked else am
    if kpm is not None:
        k_ok = (~kpm if masked else kpm).view(batch, 1, 1, n_k)
        allowed = k_ok if allowed is None else allowed & k_ok
    return allowed


def _pack_torch(allowed: torch.Tensor) -> torch.Tensor:
    """PyTorch version of the pack kernel: bool (..., N) -> int32 (..., ceil(N / 32))."""
    n_k = allowed.shape[-1]
    pad = (-n_k) % 32
    a = torch.nn.functional.pad(allowed.to(torch.int64), (0, pad)).view(*allowed.shape[:-1], -1, 32)
    words = (a << torch.arange(32, device=a.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_mask(mask: PackedMask) -> torch.Tensor:
    """bool (Bm, Hm, M, N), True = allowed."""
    shifts = torch.arange(32, device=mask.bits.device, dtype=torch.int32)
    bits = (mask.bits.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., : mask.num_keys].bool()


# ----------------------------------------------------------------------------------- torch.library ops


def _pack_impl(am: torch.Tensor | None, kpm: torch.Tensor | None, masked: bool, batch: int, heads: int,
               n_q: int, n_k: int) -> torch.Tensor:
    return _kernels().pack(am, kpm, attn_masked=masked, kpm_masked=masked, batch=batch, heads=heads,
                           n_q=n_q, n_k=n_k)


_pack_op = torch.library.custom_op("fastseg::pack_mask", _pack_impl, mutates_args=())


@_pack_op.register_fake
def _pack_fake(am, kpm, masked, batch, heads, n_q, n_k):
    ref = am if am is not None else kpm
    bm = batch if (kpm is not None or am.shape[0] > 1) else 1
    hm = heads if (am is not None and am.shape[1] > 1) else 1
    return ref.new_empty((bm, hm, n_q, (n_k + 31) // 32), dtype=torch.int32)


# Eager calls go through a plain autograd.Function (torch.library's custom-op dispatch costs ~1 ms of
# Python per call); under torch.compile the same kernels are reached through the custom ops below, which
# Dynamo traces without a graph break.


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bits, seed, scale, num_splits, dropout_p, tile_lists=None):
        o, lse, *lists = _kernels().forward(q, k, v, bits, scale, num_splits or None, seed, dropout_p, tile_lists)
        ctx.save_for_backward(q, k, v, o, lse, bits, seed, *lists)
        ctx.scale, ctx.num_splits, ctx.dropout_p = scale, num_splits, dropout_p
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for lse (nor for an unused output)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, bits, seed, *lists = ctx.saved_tensors
        dq, dk, dv = _kernels().backward(do, q, k, v, o, lse, bits, *lists, ctx.scale, ctx.num_splits or None,
                                         seed, ctx.dropout_p)
        return dq, dk, dv, None, None, None, None, None, None


@torch.library.custom_op("fastseg::masked_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor | None,
            seed: torch.Tensor | None, scale: float, num_splits: int, dropout_p: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().forward(q, k, v, bits, scale, num_splits or None, seed, dropout_p)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bits, seed, scale, num_splits, dropout_p):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bm, bn = _kernels().TILE
    n_qb, n_kb = -(-q.shape[2] // bm), -(-k.shape[2] // bn)
    if bits is None:
        lists = [q.new_empty((1, 1, n_qb, 0), dtype=dt) for dt in (torch.int32, torch.int32, torch.int8)]
    else:
        g = tuple(bits.shape[:2])
        lists = [q.new_empty((*g, n_qb, n_kb), dtype=torch.int32), q.new_empty((*g, n_qb), dtype=torch.int32),
                 q.new_empty((*g, n_qb, n_kb), dtype=torch.int8)]
    return (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc), *lists)


@torch.library.custom_op("fastseg::masked_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, bits: torch.Tensor | None, blocks: torch.Tensor, counts: torch.Tensor,
            flags: torch.Tensor, seed: torch.Tensor | None, scale: float, num_splits: int, dropout_p: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(do, q, k, v, o, lse, bits, blocks, counts, flags, scale, num_splits or None,
                               seed, dropout_p)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, bits, blocks, counts, flags, seed, scale, num_splits, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bits, seed, scale, num_splits, dropout_p = inputs
    o, lse, *lists = output
    ctx.save_for_backward(q, k, v, o, lse, bits, seed, *lists)
    ctx.scale, ctx.num_splits, ctx.dropout_p = scale, num_splits, dropout_p


def _backward(ctx, do, *unused):
    q, k, v, o, lse, bits, seed, *lists = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, bits, *lists, seed, ctx.scale, ctx.num_splits, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastseg::masked_attention_weights", mutates_args=())
def _weights_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, bits: torch.Tensor | None,
                seed: torch.Tensor | None, scale: float, average: bool, dropout_p: float) -> torch.Tensor:
    return _kernels().weights(q, k, lse, bits, scale, average, seed, dropout_p)


@_weights_op.register_fake
def _weights_fake(q, k, lse, bits, seed, scale, average, dropout_p):
    B, H, M, _ = q.shape
    return q.new_empty((B, M, k.shape[2]) if average else (B, H, M, k.shape[2]))


@torch.library.custom_op("fastseg::masked_attention_weights_bwd", mutates_args=())
def _weights_bwd_op(dw: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, bits: torch.Tensor | None,
                    seed: torch.Tensor | None, scale: float, average: bool, dropout_p: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().weights_backward(dw, q, k, lse, bits, scale, average, seed, dropout_p)


@_weights_bwd_op.register_fake
def _weights_bwd_fake(dw, q, k, lse, bits, seed, scale, average, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _weights_setup_context(ctx, inputs, output):
    q, k, lse, bits, seed, scale, average, dropout_p = inputs
    ctx.save_for_backward(q, k, lse, bits, seed)
    ctx.scale, ctx.average, ctx.dropout_p = scale, average, dropout_p


def _weights_backward(ctx, dw):
    q, k, lse, bits, seed = ctx.saved_tensors
    dq, dk = _weights_bwd_op(dw, q, k, lse, bits, seed, ctx.scale, ctx.average, ctx.dropout_p)
    return dq, dk, None, None, None, None, None, None


_weights_op.register_autograd(_weights_backward, setup_context=_weights_setup_context)


# ------------------------------------------------------------------------------------------ dropout


def dropout_seed(device) -> torch.Tensor:
    """A fresh attention-dropout seed: int64 (1,) tensor drawn on ``device`` from torch's generator (no
    device→host sync; on CUDA it is drawn by a kernel, so a captured CUDA graph draws a new one per replay)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


_draw_seed = dropout_seed  # masked_attention's ``dropout_seed`` argument shadows the name


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, num_queries: int, num_keys: int,
                      p: float) -> torch.Tensor:
    """The keep mask the fused kernels apply for ``seed`` and dropout probability ``p``: bool
    (batch, heads, num_queries, num_keys), True = kept (then scaled by 1 / (1 − p)). Built by a small Triton
    kernel with the same Philox counters as the attention kernels (for tests / debugging; small shapes)."""
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError("seed must be an int64 tensor of one element (see dropout_seed)")
    if _backend.select("dropout_keep_mask", seed.device) != "triton":
        raise RuntimeError("dropout_keep_mask runs the Triton kernel: CUDA, or CPU with TRITON_INTERPRET=1")
    keep = _kernels().keep_mask(seed.reshape(1), batch * heads * num_queries, num_keys, float(p))
    return keep.view(batch, heads, num_queries, num_keys)


# ---------------------------------------------------------------------------------------------- the op


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, M|N, D); got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    B, H, M, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(expected k, v of shape (B, H, N, D) with q's B, H, D)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got {k.shape[2]} and {v.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; expected one of {_DTYPES}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise TypeError("fp64 masked attention runs under the Triton interpreter only; use fp32/fp16/bf16 on CUDA")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported by the fused kernel")
    _backend.check_same_device(_OP, q=q, k=k, v=v)


# Query rows per SDPA call on the plain-PyTorch path are chosen so one call's additive float mask has about
# this many elements (SDPA's own per-call buffers scale the same way).
_SDPA_CHUNK_ELEMS = 1 << 24


def _sdpa_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """The no-dropout, no-weights PyTorch path: ``F.scaled_dot_product_attention`` in chunks of queries.

    q: (B, H, M, D); k, v: (B, H, N, D); allowed: bool (Bm, Hm, M|1, N), True = may attend, or None.
    Returns (B, H, M, D). The bool mask is turned into an additive float mask (0 / -inf) one chunk at a time
    (SDPA's own bool-mask conversion is several times slower on CPU). Empty rows give 0 and zero gradient:
    inside SDPA they attend everywhere, then their output is zeroed, so no NaN reaches forward or backward
    on any torch version.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if allowed is None:
        return sdpa(q, k, v, scale=scale)
    B, H, M, _ = q.shape
    N = k.shape[2]
    rows = max(1, _SDPA_CHUNK_ELEMS // max(allowed.shape[0] * allowed.shape[1] * N, 1))
    outs = []
    for i in range(0, M, rows):
        a = allowed if allowed.shape[2] == 1 else allowed[:, :, i:i + rows]  # (B, 1, 1, N): key padding only
        # 1 - 1/allowed: exactly 0 (allowed) or -inf, in q's dtype; ~3x faster on CPU than torch.where
        bias = a.to(q.dtype).reciprocal_().neg_().add_(1)
        empty = bias.amax(-1, keepdim=True) == float("-inf")  # (Bm, Hm, rows, 1)
        fix = q.device.type != "cpu" or bool(empty.any())  # no host sync on CUDA: fix unconditionally there
        if fix:
            bias = bias.masked_fill(empty, 0.0)
        o = sdpa(q[:, :, i:i + rows], k, v, attn_mask=bias, scale=scale)
        outs.append(o.masked_fill(empty, 0.0) if fix else o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | PackedMask | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    masked: bool = False,
    scale: float | None = None,
    num_splits: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    return_weights: bool = False,
    average_weights: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused masked attention. Differentiable in q, k, v.

    q: (B, H, M, D); k, v: (B, H, N, D), fp16/bf16/fp32 (fp64 too); any strides with a contiguous last
    dimension (others are copied once). attn_mask: :class:`PackedMask`, or bool (M, N), (B·H, M, N) or
    (1|B, 1|H, M, N). key_padding_mask: bool (B, N). ``masked=True`` reads True as "masked out"
    (``nn.MultiheadAttention``), the default reads True as "allowed" (SDPA). ``scale`` defaults to
    1/√D; ``num_splits`` overrides how many programs share one query block's keys.
    Returns (B, H, M, D) in q's dtype (the autocast dtype under autocast). Empty rows give 0.

    ``dropout_p`` > 0: attention dropout on the softmax weights (kept ones scaled by 1 / (1 − p)), as
    ``nn.MultiheadAttention`` in training; the keep mask is generated in the kernels from ``dropout_seed``
    (int64 (1,) on q's device, default: :func:`dropout_seed`) and regenerated in backward, never stored
    (:func:`dropout_keep_mask` returns it). Callers pass ``dropout_p=0`` in eval mode.
    ``return_weights``: also return the attention weights (after dropout, as ``nn.MultiheadAttention``),
    (B, M, N) averaged over heads if ``average_weights`` else (B, H, M, N), in q's dtype, recomputed by a
    kernel from the forward's row log-sum-exp (0 on masked keys and on empty rows); differentiable in q and k
    (two more kernels, from the saved statistics). Without ``return_weights`` nothing of size M·N is built.
    Without Triton (CPU, no TRITON_INTERPRET) it runs ``F.scaled_dot_product_attention`` in query chunks
    (with dropout or ``return_weights``: the PyTorch reference, which builds the (B, H, M, N) weights).
    """
    if torch.is_autocast_enabled(q.device.type) and q.dtype != torch.float64:
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    _check_qkv(q, k, v)
    B, H, M, D = q.shape
    N = k.shape[2]
    device = _backend.check_same_device(
        _OP, q=q, attn_mask=attn_mask.bits if isinstance(attn_mask, PackedMask) else attn_mask,
        key_padding_mask=key_padding_mask)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    packed = None
    if isinstance(attn_mask, PackedMask):
        if key_padding_mask is not None:
            raise ValueError("fold key_padding_mask into the PackedMask (pack_mask takes both)")
        bits = attn_mask.bits
        if (attn_mask.num_keys != N or bits.dim() != 4 or bits.shape[2:] != (M, (N + 31) // 32)
                or bits.shape[0] not in (1, B) or bits.shape[1] not in (1, H) or bits.dtype != torch.int32):
            raise ValueError(f"PackedMask bits {tuple(bits.shape)} ({bits.dtype}, {attn_mask.num_keys} keys) "
                             f"do not fit q {tuple(q.shape)} and {N} keys")
        packed = attn_mask

    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if _backend.select(_OP, device) == "torch":
        if packed is not None:
            allowed = unpack_mask(packed)
        elif attn_mask is not None or key_padding_mask is not None:
            am = None if attn_mask is None else _as_4d(_bool_mask(attn_mask, "attn_mask"), B, H, M, N, "attn_mask")
            kpm = None if key_padding_mask is None else _bool_mask(key_padding_mask, "key_padding_mask")
            if kpm is not None and kpm.shape != (B, N):
                raise ValueError(f"key_padding_mask must have shape ({B}, {N}), got {tuple(kpm.shape)}")
            allowed = _allowed_torch(am, kpm, masked, B, N)
        else:
            allowed = None
        if dropout_p == 0 and not return_weights:
            return _sdpa_masked_attention(q, k, v, allowed, float(scale))
        keep = None
        if dropout_p > 0:  # PyTorch's own RNG stream here (the kernels' Philox stream differs)
            keep = torch.rand((B, H, M, N), device=q.device) >= dropout_p
        out, w = _torch_masked_attention(q, k, v, allowed, scale, empty_rows="zero", keep=keep, dropout_p=dropout_p,
                                         return_weights=True)
        if not return_weights:
            return out
        return out, (w.mean(1) if average_weights else w)

    lists = None
    if packed is None and (attn_mask is not None or key_padding_mask is not None):
        if torch.compiler.is_compiling():
            packed = pack_mask(attn_mask, key_padding_mask, batch=B, heads=H, num_queries=M, num_keys=N,
                               masked=masked)
        else:  # eager: pack and build the tile lists in one launch
            am, kpm = _pack_inputs(attn_mask, key_padding_mask, B, H, M, N)
            bits, lists = _kernels().pack_with_tile_lists(am, kpm, attn_masked=masked, kpm_masked=masked, batch=B,
                                                          heads=H, n_q=M, n_k=N)
            packed = PackedMask(bits, N)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bits = None if packed is None else packed.bits
    seed = None
    if dropout_p > 0:
        seed = _draw_seed(device) if dropout_seed is None else dropout_seed.reshape(1)
        if seed.dtype != torch.int64 or seed.device != device:
            raise TypeError(f"dropout_seed must be an int64 tensor on {device}, got {seed.dtype} on {seed.device}")
    args = (bits, seed, float(scale), int(num_splits or 0), dropout_p)
    if torch.compiler.is_compiling():
        o, lse = _fwd_op(q, k, v, *args)[:2]
    else:
        o, lse = _MaskedAttention.apply(q, k, v, *args, lists)
    if not return_weights:
        return o
    return o, _weights_op(q, k, lse, bits, seed, float(scale), bool(average_weights), dropout_p)


# ------------------------------------------------------------------------ Mask2Former's attention mask


def _full_words(n_k: int, device) -> torch.Tensor:
    """(ceil(n_k / 32),) int32 words with the first n_k bits set."""
    return _pack_torch(torch.ones(n_k, dtype=torch.bool, device=device))


def _sign_pack_impl(emb: torch.Tensor, feat: torch.Tensor, reset_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention_mask

    return attention_mask.sign_pack(emb, feat, _kernels()._precision(emb.dtype), reset_empty)


_sign_pack_op = torch.library.custom_op("fastseg::attention_mask_sign_pack", _sign_pack_impl, mutates_args=())


@_sign_pack_op.register_fake
def _sign_pack_fake(emb, feat, reset_empty):
    B, Q, _ = emb.shape
    return (emb.new_empty((B, 1, Q, (feat.shape[2] + 31) // 32), dtype=torch.int32),
            emb.new_empty((B, Q), dtype=torch.int32))


def mask_from_embeddings(mask_embed: torch.Tensor, features: torch.Tensor, *, reset_empty: bool = True) -> PackedMask:
    """Mask2Former's attention mask of one level, bit-packed, without any (B, Q, h·w) tensor.

    mask_embed: (B, Q, C); features: (B, C, h, w) (the mask features resized to the level once).
    Query q may attend pixel p iff ``mask_embed[b, q] · features[b, :, p] >= 0`` (``sigmoid(logit) >= 0.5``,
    Mask2Former's threshold). With ``reset_empty`` a query with no allowed pixel may attend everywhere, as
    in Mask2Former. Returns a :class:`PackedMask` with bits (B, 1, Q, ceil(h·w / 32)), shared by all heads.
    Not differentiable (Mask2Former detaches the mask). Logits within rounding of 0 may differ in sign
    from ``interpolate(mask_embed · full-res features)`` (bilinear resizing and the dot product commute
    exactly only in exact arithmetic).
    """
    if mask_embed.dim() != 3 or features.dim() != 4 or features.shape[:2] != (mask_embed.shape[0], mask_embed.shape[2]):
        raise ValueError(f"mask_embed must be (B, Q, C) and features (B, C, h, w); got {tuple(mask_embed.shape)} "
                         f"and {tuple(features.shape)}")
    device = _backend.check_same_device("mask_from_embeddings", mask_embed=mask_embed, features=features)
    B, Q, _ = mask_embed.shape
    feat = features.flatten(2)
    n_k = feat.shape[2]
    mask_embed, feat = mask_embed.detach(), feat.detach()
    if not feat.is_floating_point() or not mask_embed.is_floating_point():
        raise TypeError(f"mask_from_embeddings: float tensors expected, got {mask_embed.dtype} and {feat.dtype}")
    if _backend.select("mask_from_embeddings", device) == "triton":  # feat rounded to mask_embed's dtype inside
        if mask_embed.dtype == torch.float64 and device.type == "cuda":
            raise TypeError("fp64 runs under the Triton interpreter only")
        bits, _ = (_sign_pack_op if torch.compiler.is_compiling() else _sign_pack_impl)(mask_embed, feat, reset_empty)
        return PackedMask(bits, n_k)
    allowed = torch.einsum("bqc,bcp->bqp", mask_embed, feat.to(mask_embed.dtype)) >= 0
    bits = _pack_torch(allowed).unsqueeze(1)
    if reset_empty:
        bits = torch.where(~allowed.any(-1)[:, None, :, None], _full_words(n_k, device), bits)
    return PackedMask(bits, n_k)
