"""Mask2Former's masked cross-attention (issue 3): fastseg vs nn.MultiheadAttention, SDPA, FlexAttention,
torch.compile, at the decoder's real shapes.

Layout as Mask2Former's ``CrossAttentionLayer``: sequence-first, query (Q, B, E), key = value-sized memory
(L, B, E) with L = H·W of one feature level, hidden 256, 8 heads, and a boolean ``attn_mask`` of shape
(B·heads, Q, L), True = masked out, the same for every head (Mask2Former repeats it over the heads).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..measure import Prepared, Unavailable
from ..registry import Impl, MemprofSpec, OpSpec, register, require
from .common import compiled, generator, module_step, randn

OP = "masked-attention"
SHAPE_KEYS = {"B": 2, "Q": 100, "H": 64, "W": 64, "E": 256, "heads": 8, "density": 0.3}
LEVELS = {"s32": 32, "s16": 16, "s8": 8}  # Mask2Former's three attention levels (strides)


def level_hw(image_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)


def _shapes(image_hw, queries, batches, densities, strides=(32, 16, 8)):
    out = []
    for b in batches:
        for q in queries:
            for s in strides:
                h, w = level_hw(image_hw, s)
                for d in densities:
                    out.append({"B": b, "Q": q, "H": h, "W": w, "density": d})
    return out


DENS = [0.05, 0.3, 1.0]
PRESETS = {
    # a few shapes, for a smoke run
    "quick": [{"B": 2, "Q": 100, "H": 64, "W": 64, "density": 0.3}, {"B": 2, "Q": 100, "H": 64, "W": 64, "density": 1.0}],
    # CPU default: small, so that eager PyTorch on 2 cores finishes in seconds
    "cpu": [{"B": 1, "Q": 100, "H": 16, "W": 16, "density": 0.3}, {"B": 2, "Q": 100, "H": 32, "W": 32, "density": 0.3}],
    # GPU default: the finest (stride-8) level of ADE20K and Cityscapes at three densities, plus a stride-16 level
    "default": (_shapes((512, 512), [100], [8], DENS, strides=(8,))
                + _shapes((1024, 2048), [200], [2], DENS, strides=(8,))
                + _shapes((1024, 1024), [100], [4], [0.3], strides=(16,))),
    "mask2former-ade": _shapes((512, 512), [100], [16], DENS),
    "mask2former-1024": _shapes((1024, 1024), [100, 200], [4], DENS),
    "cityscapes": _shapes((1024, 2048), [100, 200], [2], DENS),
    # speed against mask density at one shape (1024×1024 input, stride 8)
    "density": _shapes((1024, 1024), [100], [4], [0.05, 0.1, 0.25, 0.5, 0.75, 1.0], strides=(8,)),
    # everything: 3 inputs × 3 levels × Q 100/200 × batch 2/8/16 × 3 densities
    "full": (_shapes((512, 512), [100, 200], [2, 8, 16], DENS) + _shapes((1024, 1024), [100, 200], [2, 8], DENS)
             + _shapes((1024, 2048), [100, 200], [2, 4], DENS)),
}
PRESETS["ade"] = PRESETS["mask2former-ade"]


def label(s: dict) -> str:
    return f"B={s['B']} Q={s['Q']} L={s['H']}x{s['W']} E={s['E']}/{s['heads']}h mask={s['density']:.0%}"


def blob_mask(batch: int, queries: int, h: int, w: int, density: float, g: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """Spatially coherent random masks, (B, Q, H·W) bool, True = allowed, ≈ ``density`` allowed per row.

    Smooth random fields (coarse noise upsampled bilinearly) thresholded per query at the quantile that
    keeps ``density`` of the pixels: blob-shaped like Mask2Former's predicted masks. Never an empty row.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    ch, cw = max(2, h // 6), max(2, w // 6)
    noise = torch.randn(batch, queries, ch, cw, generator=g, device=device)
    field = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False).flatten(2)
    n = h * w
    keep = max(1, min(n, round(density * n)))
    if keep == n:
        return torch.ones(batch, queries, n, dtype=torch.bool, device=device)
    thresh = torch.kthvalue(field, n - keep + 1, dim=-1, keepdim=True).values
    return field >= thresh


def _inputs(s: dict, dtype, device, mode):
    g = generator(device)
    grad = mode == "fwdbwd"
    B, Q, L, E, nh = s["B"], s["Q"], s["H"] * s["W"], s["E"], s["heads"]
    query = randn((Q, B, E), dtype, device, g, grad)
    key = randn((L, B, E), dtype, device, g, grad)  # memory + positional embedding
    value = randn((L, B, E), dtype, device, g, grad)  # memory
    allowed = blob_mask(B, Q, s["H"], s["W"], s["density"], g, device)
    # Mask2Former: repeat over heads, flatten to (B·heads, Q, L); True = masked out
    attn_mask = (~allowed).unsqueeze(1).repeat(1, nh, 1, 1).flatten(0, 1)
    del allowed
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, nh, dropout=0.0).to(device=device, dtype=dtype)
    return query, key, value, attn_mask, mha


def prep_fastseg(s, dtype, device, mode) -> Prepared:
    cls = require("fastseg.nn", "MaskedCrossAttention", "the fused masked attention lands with issue 3")
    query, key, value, attn_mask, mha = _inputs(s, dtype, device, mode)
    mod = cls(s["E"], s["heads"], dropout=0.0).to(device=device, dtype=dtype)
    mod.load_state_dict(mha.state_dict())
    mod.need_weights_default = False  # what fastseg.patch sets in Mask2Former's layer (it discards the weights)
    del mha
    return module_step(lambda: mod(query, key, value, attn_mask=attn_mask)[0], [query, key, value], [mod], mode,
                       [attn_mask])


def prep_eager(s, dtype, device, mode) -> Prepared:
    query, key, value, attn_mask, mha = _inputs(s, dtype, device, mode)
    # as Mask2Former calls it: need_weights left at its default (True)
    return module_step(lambda: mha(query, key, value, attn_mask=attn_mask)[0], [query, key, value], [mha], mode,
                       [attn_mask])


def prep_compile(s, dtype, device, mode) -> Prepared:
    query, key, value, attn_mask, mha = _inputs(s, dtype, device, mode)
    fn = compiled(mha)
    return module_step(lambda: fn(query, key, value, attn_mask=attn_mask)[0], [query, key, value], [mha], mode,
                       [attn_mask])


def _project(mha, query, key, value):
    E, nh = mha.embed_dim, mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    Q, B, _ = query.shape
    L = key.shape[0]
    q = F.linear(query, w_q, b_q).view(Q, B, nh, E // nh).permute(1, 2, 0, 3)
    k = F.linear(key, w_k, b_k).view(L, B, nh, E // nh).permute(1, 2, 0, 3)
    v = F.linear(value, w_v, b_v).view(L, B, nh, E // nh).permute(1, 2, 0, 3)
    return q, k, v


def _out(mha, o):  # (B, nh, Q, Dh) -> (Q, B, E)
    B, nh, Q, Dh = o.shape
    return mha.out_proj(o.permute(2, 0, 1, 3).reshape(Q, B, nh * Dh))


def prep_sdpa(s, dtype, device, mode) -> Prepared:
    query, key, value, attn_mask, mha = _inputs(s, dtype, device, mode)
    B, nh, Q, L = s["B"], s["heads"], s["Q"], s["H"] * s["W"]

    def fwd():
        q, k, v = _project(mha, query, key, value)
        allowed = ~attn_mask.view(B, nh, Q, L)  # SDPA: True = may attend
        return _out(mha, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    return module_step(fwd, [query, key, value], [mha], mode, [attn_mask])


def prep_flex(s, dtype, device, mode) -> Prepared:
    if device.type != "cuda":
        raise Unavailable("FlexAttention baseline runs on CUDA only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"FlexAttention not in this torch ({exc})") from None
    query, key, value, attn_mask, mha = _inputs(s, dtype, device, mode)
    B, nh, Q, L = s["B"], s["heads"], s["Q"], s["H"] * s["W"]
    flex = compiled(flex_attention)
    allowed = torch.empty(B, Q, L, dtype=torch.bool, device=device)  # FlexAttention: True = may attend

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    def fwd():
        # the mask changes every decoder layer, so converting it and building the block mask are part of the cost
        torch.logical_not(attn_mask.view(B, nh, Q, L)[:, 0], out=allowed)  # the same for every head
        block_mask = create_block_mask(mask_mod, B, None, Q, L, device=device, _compile=True)
        q, k, v = _project(mha, query, key, value)
        return _out(mha, flex(q, k, v, block_mask=block_mask))
    return module_step(fwd, [query, key, value], [mha], mode, [attn_mask])


def analytic_fused_bytes(s: dict, dtype: torch.dtype) -> dict:
    """The fused layer's training-step memory, exactly from the shapes: {part: bytes}.

    Parts named ``saved: ...`` are what the fused op keeps for backward (q, k, v projections, the attention
    output, the fp32 logsumexp, the mask bit-packed at 1 bit per query and pixel — per head, since
    Mask2Former's mask is repeated over the heads — and the per-query-block lists of non-empty key tiles); the
    others are the inputs and weights, their gradients, and the dq/dk/dv buffers of the backward pass.
    ``tests/test_cli.py`` checks the saved parts against the bytes autograd really saves (interpreter).
    """
    from fastseg.kernels.masked_attention import TILE  # the tile of the kernels that run here

    el = torch.empty((), dtype=dtype).element_size()
    B, Q, L, E, nh = s["B"], s["Q"], s["H"] * s["W"], s["E"], s["heads"]
    n_qb, n_kb = math.ceil(Q / TILE[0]), math.ceil(L / TILE[1])
    inputs = (Q + 2 * L) * B * E * el
    weights = (4 * E * E + 4 * E) * el
    return {
        "inputs (query, key, value)": inputs,
        "attn_mask input (B*heads, Q, L) bool": B * nh * Q * L,
        "weights": weights,
        "saved: q projection": Q * B * E * el,
        "saved: k, v projections": 2 * L * B * E * el,
        "saved: attention output": Q * B * E * el,
        "saved: logsumexp (fp32)": B * nh * Q * 4,
        "saved: bit-packed mask": B * nh * Q * math.ceil(L / 32) * 4,
        # key-tile indices (int32), non-empty flags (int8) per (query block, key tile); counts per query block
        "saved: tile lists": B * nh * n_qb * (n_kb * 5 + 4),
        "output (out_proj)": Q * B * E * el,
        "gradients of inputs and weights": inputs + weights,
        "backward dq, dk, dv": (Q + 2 * L) * B * E * el,
    }


def _cpu_estimate(s: dict, dtype: torch.dtype) -> int:
    el = torch.empty((), dtype=dtype).element_size()
    B, Q, L, nh = s["B"], s["Q"], s["H"] * s["W"], s["heads"]
    return B * nh * Q * L * (4 * el + 2) + 6 * L * B * s["E"] * el


def _memprof_shape(queries: int, img_h: int, img_w: int, batch: int, extra: dict) -> dict:
    h, w = level_hw((img_h, img_w), 8)
    return {**SHAPE_KEYS, "B": batch, "Q": queries, "H": h, "W": w, "density": extra.get("density", 0.5)}


register(OpSpec(
    name=OP,
    summary="Mask2Former masked cross-attention (hidden 256, 8 heads), one layer",
    issue="issue 3",
    cpu_note="SDPA with the mask as a 0/-inf float bias in chunks of queries (empty rows zeroed): about SDPA's "
             "speed at lower peak memory; no faster CPU formulation than SDPA itself",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", prep_fastseg, fastseg=True, description="fastseg.nn.MaskedCrossAttention"),
        Impl("eager", prep_eager, description="nn.MultiheadAttention eager (need_weights=True, as Mask2Former)"),
        Impl("sdpa", prep_sdpa, description="in-projection + F.scaled_dot_product_attention(bool mask)"),
        Impl("flex", prep_flex, gpu_only=True, description="FlexAttention, mask_mod over the mask, create_block_mask counted"),
        Impl("compile", prep_compile, gpu_only=True, description="torch.compile(nn.MultiheadAttention)"),
    ],
    memprof=MemprofSpec(
        shape=_memprof_shape, eager="eager", fused="fastseg", analytic=analytic_fused_bytes,
        cpu_estimate=_cpu_estimate,
        description="one masked cross-attention layer at Mask2Former's finest level (stride 8), forward+backward",
    ),
))
