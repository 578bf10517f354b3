"""MaskFormer (issue 16): training step and inference, reference path vs ``set_fused(True)``.

The case is MaskFormer's head as the official ADE20k / COCO R50 configs (FPN pixel decoder conv/mask dim 256, DETR
decoder with 6 layers, hidden 256, 8 heads, feed-forward 2048, dropout 0.1, deep supervision; criterion:
Hungarian matching, class CE, sigmoid focal ×20 + dice ×1 on every matched mask at the target resolution, every
layer) on random backbone features with ResNet-50's channels (256, 512, 1024, 2048 at strides 4..32) —
``backbone=mscan_t`` runs the whole model with fastseg's MSCAN-T backbone on random images instead. Targets:
``T`` blob-shaped bool masks per image at the image size, random labels. A training step is forward +
criterion + backward (gradients of every parameter, and of the features); ``fwd`` is the eval forward plus
semantic inference at the image size. fp16/bf16 run under ``torch.autocast`` with fp32 parameters.

``fastseg``: ``set_fused(True)`` (fused mask losses from the embeddings, fused matcher costs where the matcher
has them, fastseg's fused cross-attention); ``reference``: the official formulation in PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..measure import Prepared, Unavailable, make_step
from ..registry import Impl, MemprofSpec, OpSpec, register, require
from .common import autocast, generator, param_dtype, randn

OP = "maskformer"
WHAT = "MaskFormer (fastseg.models.build_maskformer) with set_fused lands with issue 16"
R50_CHANNELS = (256, 512, 1024, 2048)
SHAPE_KEYS = {"B": 8, "Q": 100, "H": 512, "W": 512, "T": 20, "K": 150, "backbone": "r50-features"}

PRESETS = {
    "cpu": [{"B": 1, "Q": 20, "H": 64, "W": 64, "T": 3}],
    "quick": [{"B": 2, "Q": 100, "H": 256, "W": 256, "T": 10}],
    # ADE20K 512x512 crops (B=16 official, 8 per GPU here)
    "ade": [{"B": b, "Q": 100, "H": 512, "W": 512, "T": 20, "K": 150} for b in (2, 8)],
    # COCO panoptic: short side 640..1024 (crops up to 1024x1024), 133 classes
    "coco": [{"B": 2, "Q": 100, "H": h, "W": w, "T": 30, "K": 133} for h, w in ((640, 640), (800, 1216), (1024, 1024))],
    # Cityscapes 1024x2048 crops
    "cityscapes": [{"B": 2, "Q": 100, "H": 1024, "W": 2048, "T": 30, "K": 19}],
}
PRESETS["default"] = [PRESETS["ade"][1], PRESETS["coco"][2], PRESETS["cityscapes"][0]]
PRESETS["full"] = PRESETS["ade"] + PRESETS["coco"] + PRESETS["cityscapes"]


def label(s):
    bb = "" if s["backbone"] == "r50-features" else f"{s['backbone']} "
    return f"{bb}B={s['B']} Q={s['Q']} image {s['H']}x{s['W']} T={s['T']} K={s['K']}"


def _targets(s, g, device):
    from .masked_attention import blob_mask

    B, T, H, W = s["B"], s["T"], s["H"], s["W"]
    return [{"labels": torch.randint(0, s["K"], (T,), generator=g, device=device),
             "masks": blob_mask(1, T, H, W, 0.1, g, device)[0].view(T, H, W)} for _ in range(B)]


def maskformer_case(s: dict, dtype: torch.dtype, device, train: bool, fused: bool) -> dict:
    """{"forward", "leaves", "resident"} of one MaskFormer step (see the module docstring)."""
    build = require("fastseg.models", "build_maskformer", WHAT)
    pdtype = param_dtype(dtype)
    g = generator(device)
    H, W = s["H"], s["W"]
    torch.manual_seed(0)
    if s["backbone"] == "r50-features":
        model = build(nn.Identity(), s["K"], in_channels=list(R50_CHANNELS), num_queries=s["Q"])
        inputs = [randn((s["B"], c, -(-H // st), -(-W // st)), pdtype, device, g, train)
                  for c, st in zip(R50_CHANNELS, (4, 8, 16, 32))]
    else:
        try:
            model = build(s["backbone"], s["K"], num_queries=s["Q"])
        except ImportError as exc:
            raise Unavailable(str(exc)) from None
        inputs = randn((s["B"], 3, H, W), pdtype, device, g)
    if fused:
        if not hasattr(model, "set_fused"):
            raise Unavailable(WHAT)
        model.set_fused(True)
    model = model.to(device=device, dtype=pdtype).train(train)
    targets = _targets(s, g, device) if train else []

    def forward():
        with autocast(device, dtype):
            if train:
                return sum(model(inputs, targets).values())
            return model.semantic_inference(model(inputs), (H, W))
    leaves = [p for p in model.parameters() if p.requires_grad]
    feats = inputs if isinstance(inputs, list) else []
    if train:
        leaves += feats
    return {"forward": forward, "leaves": leaves,
            "resident": [model, *feats, *([] if feats else [inputs])] + [t["masks"] for t in targets]}


def _prep(fused: bool):
    def prepare(s, dtype, device, mode) -> Prepared:
        case = maskformer_case(s, dtype, device, mode == "fwdbwd", fused)
        return Prepared(make_step(case["forward"], case["leaves"], mode), resident=case["resident"],
                        forward=case["forward"])
    return prepare


def _memprof_shape(q, h, w, b, extra):
    return {**SHAPE_KEYS, "B": b, "Q": q, "H": h, "W": w, **{k: v for k, v in extra.items() if k in SHAPE_KEYS}}


def _analytic(s, dtype):
    raise Unavailable("no analytic memory model of the fused MaskFormer (decoder, matcher, six layers' losses); "
                      "on a GPU both paths are measured")


def _cpu_estimate(s, dtype):
    # reference: per layer ~6 fp32 tensors of the matched masks at full resolution, 6 layers; + the (L, B, Q, h, w)
    # mask logits and ~1 KB per input pixel of pixel-decoder activations
    B, Q, H, W, T = s["B"], s["Q"], s["H"], s["W"], s["T"]
    return 6 * 6 * 4 * B * T * H * W + 6 * 4 * B * Q * H * W // 16 + 1024 * B * H * W


register(OpSpec(
    name=OP,
    summary="MaskFormer head (FPN + DETR decoder + full-resolution focal/dice criterion): train step / inference",
    issue="issue 16",
    heavy=True,
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _prep(True), fastseg=True,
             description="MaskFormer.set_fused(True): fused mask losses + matcher costs + cross-attention"),
        Impl("reference", _prep(False), description="MaskFormer, the official formulation in PyTorch"),
    ],
    memprof=MemprofSpec(
        shape=_memprof_shape, eager="reference", fused="fastseg", analytic=_analytic, cpu_estimate=_cpu_estimate,
        description="MaskFormer head on R50-shaped features; --mode fwdbwd: training step, --mode fwd: inference "
                    "incl. semantic inference at the input size",
        cpu_grid=("20,50", "64x64,128x128", "1"), quick_grid=("20", "64x64", "1"),
    ),
    notes=["Targets: T blob masks per image at the image size (bool). The fused path's attention dropout draws "
           "other random numbers than nn.MultiheadAttention's (same distribution)."],
))
