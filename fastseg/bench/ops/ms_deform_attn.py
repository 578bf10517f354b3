"""Multi-scale deformable attention (issue 14): fastseg's fused op vs the official PyTorch core (one
``grid_sample`` per level) eager and under torch.compile, at Mask2Former's pixel-decoder encoder shapes.

The encoder attends from every token to 3 levels at strides 8, 16, 32 of the input (queries = all S tokens),
8 heads of D = 32 (hidden 256), 4 points per level and head. Inputs are what the core sees: value (N, S, M, D),
sampling locations at texel centres plus offsets of a few texels (N, S, M, L, P, 2), softmaxed attention
weights (N, S, M, L, P). ``ms-deform-attn-module`` times the whole attention module (projections included).
"""
from __future__ import annotations

import math

import torch

from ..measure import Prepared
from ..registry import Impl, OpSpec, register, require
from .common import compiled, generator, module_step

OP = "ms-deform-attn"
SHAPE_KEYS = {"B": 2, "H": 512, "W": 512, "heads": 8, "D": 32, "points": 4}
STRIDES = (8, 16, 32)
WHAT = "the fused multi-scale deformable attention lands with issue 14"


def _img(h, w, batches):
    return [{"B": b, "H": h, "W": w} for b in batches]


PRESETS = {
    "quick": _img(512, 512, [2]),
    "cpu": [{"B": 1, "H": 128, "W": 128}, {"B": 2, "H": 128, "W": 192}],
    "default": _img(512, 512, [16]) + _img(1024, 1024, [8]) + _img(1024, 2048, [2, 4]),
    "mask2former-ade": _img(512, 512, [2, 8, 16]),
    "cityscapes": _img(1024, 2048, [2, 4, 8]),
    "full": _img(512, 512, [2, 8, 16]) + _img(1024, 1024, [2, 8, 16]) + _img(1024, 2048, [2, 4, 8, 16]),
}
PRESETS["ade"] = PRESETS["mask2former-ade"]


def level_shapes(s: dict) -> list[tuple[int, int]]:
    return [(math.ceil(s["H"] / st), math.ceil(s["W"] / st)) for st in STRIDES]


def label(s: dict) -> str:
    shapes = level_shapes(s)
    return (f"B={s['B']} {s['H']}x{s['W']} (S={sum(h * w for h, w in shapes)}) {s['heads']}h D={s['D']} "
            f"P={s['points']}")


def shape_tensors(shapes, device):
    """spatial_shapes (L, 2) and level_start_index (L,), int64 on ``device``."""
    st = torch.tensor(shapes, dtype=torch.long, device=device)
    return st, torch.cat((st.new_zeros(1), (st[:, 0] * st[:, 1]).cumsum(0)[:-1]))


def inputs(s: dict, dtype: torch.dtype, device, requires_grad: bool):
    """value, spatial_shapes (L, 2), level_start_index (L,), sampling_locations, attention_weights."""
    g = generator(device)
    shapes = level_shapes(s)
    N, M, D, P, L = s["B"], s["heads"], s["D"], s["points"], len(shapes)
    S = sum(h * w for h, w in shapes)
    st, starts = shape_tensors(shapes, device)
    refs = []
    for h, w in shapes:  # texel centres of every level = the encoder's reference points
        y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        refs.append(torch.stack(((x.flatten() + 0.5) / w, (y.flatten() + 0.5) / h), -1))
    ref = torch.cat(refs)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
    norm = torch.tensor([[w, h] for h, w in shapes], device=device, dtype=torch.float32)[None, None, None, :, None]
    offsets = torch.randn(N, S, M, L, P, 2, generator=g, device=device) * 2.0  # a few texels of each level
    locs = (ref + offsets / norm).to(dtype)
    logits = torch.randn(N, S, M, L * P, generator=g, device=device)
    attn = logits.softmax(-1).view(N, S, M, L, P).to(dtype)
    value = torch.randn(N, S, M, D, generator=g, device=device).to(dtype)
    for t in (value, locs, attn):
        t.requires_grad_(requires_grad)
    return value, st, starts, locs, attn


def _core_prep(kind: str):
    def prepare(s, dtype, device, mode) -> Prepared:
        value, st, starts, locs, attn = inputs(s, dtype, device, mode == "fwdbwd")
        if kind == "fastseg":
            op = require("fastseg.ops", "ms_deform_attn", WHAT)

            def forward():
                return op(value, st, starts, locs, attn)
        else:
            core = require("fastseg.reference", "ms_deform_attn_core_pytorch", WHAT)
            shapes = level_shapes(s)  # python ints: no host sync in the timed loop
            fn = compiled(core) if kind == "compile" else core

            def forward():
                return fn(value, shapes, locs, attn)
        return module_step(forward, [value, locs, attn], [], mode)
    return prepare


def _module_prep(fused: bool):
    def prepare(s, dtype, device, mode) -> Prepared:
        ref_cls = require("fastseg.reference", "ReferenceMSDeformAttn", WHAT)
        C, shapes = s["heads"] * s["D"], level_shapes(s)
        torch.manual_seed(0)
        mod = ref_cls(C, len(shapes), s["heads"], s["points"])
        if fused:
            cls = require("fastseg.nn", "MSDeformAttn", WHAT)
            new = cls(C, len(shapes), s["heads"], s["points"])
            new.load_state_dict(mod.state_dict())
            mod = new
        mod = mod.to(device=device, dtype=dtype)
        g = generator(device)
        S = sum(h * w for h, w in shapes)
        x = torch.randn(s["B"], S, C, generator=g, device=device).to(dtype).requires_grad_(mode == "fwdbwd")
        st, starts = shape_tensors(shapes, device)
        refs = torch.rand(s["B"], S, len(shapes), 2, generator=g, device=device).to(dtype)
        return module_step(lambda: mod(x, refs, x, st, starts), [x], [mod], mode)
    return prepare


register(OpSpec(
    name=OP,
    summary="multi-scale deformable attention core (Mask2Former pixel-decoder encoder, strides 8/16/32)",
    issue="issue 14",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _core_prep("fastseg"), fastseg=True, description="fastseg.ops.ms_deform_attn (Triton)"),
        Impl("eager", _core_prep("eager"), description="official ms_deform_attn_core_pytorch (grid_sample)"),
        Impl("compile", _core_prep("compile"), gpu_only=True, description="torch.compile(ms_deform_attn_core_pytorch)"),
    ],
))

register(OpSpec(
    name=OP + "-module",
    summary="multi-scale deformable attention module (projections + softmax + core), Mask2Former encoder shapes",
    issue="issue 14",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _module_prep(True), fastseg=True, description="fastseg.nn.MSDeformAttn"),
        Impl("eager", _module_prep(False), description="official MSDeformAttn on the PyTorch core"),
    ],
))
