"""Whole-model cases: MSCAN (issue 4) and CoC (issue 5) training steps, and the Mask2Former decoder (issue 7).

A training step here is forward + backward of a scalar loss (no optimizer step); fp16/bf16 run under
``torch.autocast`` with fp32 parameters, as mixed-precision training does. ``fwd`` is an eval-mode forward.
"""
from __future__ import annotations

import torch

from ..measure import Prepared, Unavailable, make_step
from ..registry import Impl, MemprofSpec, OpSpec, register, require
from .common import autocast, generator, image_model_step, param_dtype, randn


def _model_prep(factory_name: str, what: str, fused: bool, compile_: bool = False, size_key: str | None = None):
    def prepare(s, dtype, device, mode) -> Prepared:
        name = factory_name.format(**s) if size_key else factory_name
        factory = require("fastseg.models", name, what)
        torch.manual_seed(0)
        try:
            model = factory(fused=fused)
        except TypeError as exc:
            raise Unavailable(f"fastseg.models.{name}(fused=...) not supported in this build: {exc}") from None
        model = model.to(device=device, dtype=param_dtype(dtype)).train(mode == "fwdbwd")
        x = randn((s["B"], 3, s["H"], s["W"]), param_dtype(dtype), device, generator(device))
        return image_model_step(model, x, dtype, device, mode, compile_)
    return prepare


register(OpSpec(
    name="mscan",
    summary="SegNeXt MSCAN encoder, whole model (train step = forward + backward)",
    issue="issue 4",
    heavy=True,
    shape_keys={"model": "t", "B": 8, "H": 512, "W": 512},
    presets={
        "quick": [{"model": "t", "B": 2, "H": 256, "W": 256}],
        "cpu": [{"model": "t", "B": 1, "H": 128, "W": 128}],
        "default": [{"model": "t", "B": 16, "H": 512, "W": 512}, {"model": "b", "B": 8, "H": 512, "W": 512}],
        "ade": [{"model": m, "B": 16, "H": 512, "W": 512} for m in ("t", "b")],
        "cityscapes": [{"model": m, "B": 8, "H": 1024, "W": 1024} for m in ("t", "b")],
        "full": [{"model": m, "B": b, "H": h, "W": w} for m in ("t", "b")
                 for b, h, w in ((16, 512, 512), (8, 1024, 1024), (16, 512, 683))],
    },
    label=lambda s: f"MSCAN-{s['model'].upper()} B={s['B']} {s['H']}x{s['W']}",
    impls=[
        Impl("fastseg", _model_prep("mscan_{model}", "MSCAN lands with issue 4", True, size_key="model"), fastseg=True,
             description="fastseg.models.mscan_*(fused=True): fused MSCA"),
        Impl("fastseg-all", _model_prep("mscan_{model}", "MSCAN lands with issue 4", "all", size_key="model"),
             description="fastseg.models.mscan_*(fused='all'): fused MSCA, fused MLP dw conv + GELU, BN folded in eval"),
        Impl("eager", _model_prep("mscan_{model}", "MSCAN lands with issue 4", False, size_key="model"),
             description="fastseg.models.mscan_*(fused=False)"),
        Impl("compile", _model_prep("mscan_{model}", "MSCAN lands with issue 4", False, True, size_key="model"),
             gpu_only=True, description="torch.compile(mscan_*(fused=False))"),
    ],
))

register(OpSpec(
    name="coc",
    summary="Context Clusters coc_tiny / coc_medium classifier, whole model (train step)",
    issue="issue 5",
    heavy=True,
    shape_keys={"model": "tiny", "B": 64, "H": 224, "W": 224},
    presets={
        "quick": [{"model": "tiny", "B": 4, "H": 224, "W": 224}],
        "cpu": [{"model": "tiny", "B": 2, "H": 128, "W": 128}],  # sizes: multiples of 32 (fold 8 at stride 4),
        "default": [{"model": "tiny", "B": 128, "H": 224, "W": 224}],
        "imagenet": [{"model": m, "B": 128, "H": 224, "W": 224} for m in ("tiny", "medium")],
        "full": [{"model": m, "B": b, "H": 224, "W": 224} for m in ("tiny", "medium") for b in (64, 128)],
    },
    label=lambda s: f"coc_{s['model']} B={s['B']} {s['H']}x{s['W']}",
    impls=[
        Impl("fastseg", _model_prep("coc_{model}", "CoC lands with issue 5", True, size_key="model"), fastseg=True,
             description="fastseg.models.coc_*(fused=True)"),
        Impl("eager", _model_prep("coc_{model}", "CoC lands with issue 5", False, size_key="model"),
             description="fastseg.models.coc_*(fused=False)"),
        Impl("compile", _model_prep("coc_{model}", "CoC lands with issue 5", False, True, size_key="model"),
             gpu_only=True, description="torch.compile(coc_*(fused=False))"),
    ],
))


# ---------------------------------------------------------------------------------------------------------
# Issue 7: the Mask2Former decoder alone ("mask2former-decoder") and the whole model with an MSCAN backbone
# ("mask2former"), reference vs fused path. A training step is forward + Mask2Former's criterion (Hungarian
# matcher, point-sampled losses on every prediction) + backward; inference ("fwd") is the eval forward plus
# semantic inference at the input size (the (B, K, H, W) scores are the output itself, held by both paths).
#
# Optional hooks in fastseg/models/mask2former.py override the decoder case:
#   def decoder_bench_case(*, batch, queries, image_hw, dtype, device, train, fused) -> dict
#       returns {"forward": callable() -> tensor (the scalar loss when train, else the outputs),
#                "leaves": [tensors to differentiate], "resident": [tensors/modules the case holds]}
#   def decoder_memory_accounting(*, batch, queries, image_hw, dtype) -> {part: bytes}
#       (what the fused decoder keeps, exactly) for `fastseg memprof` on CPU; without it the fused column of a
#       CPU memprof is "unavailable" (on a GPU both paths are measured).
# ---------------------------------------------------------------------------------------------------------
M2F_WHAT = ("the Mask2Former decoder (fastseg.models.MultiScaleMaskedTransformerDecoder) lands with issue 7 "
            "(see fastseg/bench/ops/models.py)")


def _m2f_targets(batch, image_hw, num_classes, objects, g, device):
    """Random targets: ``objects`` blob-shaped masks per image (about 10% of the pixels each), at the image size."""
    from .masked_attention import blob_mask

    H, W = image_hw
    return [{"labels": torch.randint(0, num_classes, (objects,), generator=g, device=device),
             "masks": blob_mask(1, objects, H, W, 0.1, g, device)[0].view(objects, H, W)} for _ in range(batch)]


def _m2f_loss(criterion, out, targets):
    losses = criterion(out, targets)
    weights = criterion.weight_dict
    return sum(v * weights[k] for k, v in losses.items() if k in weights)


def _semantic(out, image_hw):
    infer = require("fastseg.models.mask2former", "semantic_inference_from_outputs", M2F_WHAT)
    return infer(out, image_hw)  # per image (K, H, W): the output itself


def _m2f_default_case(*, batch, queries, image_hw, dtype, device, train, fused, num_classes=150, objects=10):
    """The issue-7 decoder (``MultiScaleMaskedTransformerDecoder``, hidden 256, 8 heads, 9 layers) on random
    multi-scale features at strides 32/16/8 and mask features at stride 4. Training: Mask2Former's criterion on
    random targets, gradients of the decoder parameters and of the input features. Inference: eval forward +
    semantic inference at the image size. ``fused``: the decoder's memory-lean path, its cross-attention
    patched to fastseg's kernel; reference: ``nn.MultiheadAttention`` as the official code."""
    decoder_cls = require("fastseg.models", "MultiScaleMaskedTransformerDecoder", M2F_WHAT)
    build_criterion = require("fastseg.models", "build_mask2former_criterion", M2F_WHAT)
    torch.manual_seed(0)
    decoder = decoder_cls(256, num_classes=num_classes, num_queries=queries, fused=fused)
    if fused:
        patch = require("fastseg", "patch", "fastseg.patch lands with issue 7")
        require("fastseg.nn", "MaskedCrossAttention", "the fused masked attention lands with issue 3")
        patch(decoder)
    pdtype = param_dtype(dtype)
    decoder = decoder.to(device=device, dtype=pdtype).train(train)
    criterion = build_criterion(num_classes).to(device)
    g = generator(device)
    (H, W), B = image_hw, batch
    feats = [randn((B, 256, -(-H // s), -(-W // s)), pdtype, device, g, train) for s in (32, 16, 8)]
    mask_features = randn((B, 256, -(-H // 4), -(-W // 4)), pdtype, device, g, train)
    targets = _m2f_targets(B, image_hw, num_classes, objects, g, device) if train else []

    def forward():
        with autocast(device, dtype):
            out = decoder(feats, mask_features)
            if not train:
                return _semantic(out, image_hw)
            return _m2f_loss(criterion, out, targets)
    leaves = [p for p in decoder.parameters() if p.requires_grad] + (feats + [mask_features] if train else [])
    return {"forward": forward, "leaves": leaves, "resident": [decoder, *feats, mask_features]
            + [t["masks"] for t in targets]}


def _m2f_model_case(*, batch, queries, image_hw, dtype, device, train, fused, backbone="mscan_t", num_classes=150,
                    objects=10):
    """The whole Mask2Former (``build_mask2former(backbone)``, official decoder/encoder sizes) on random images.
    fused: ``set_fused(True)`` + ``fastseg.patch`` (masked cross-attention and the backbone's MSCA modules)."""
    build = require("fastseg.models", "build_mask2former", M2F_WHAT)
    torch.manual_seed(0)
    try:
        model = build(backbone, num_classes, num_queries=queries, fused=fused)
    except ImportError as exc:
        raise Unavailable(str(exc)) from None
    if fused:
        patch = require("fastseg", "patch", "fastseg.patch lands with issue 7")
        patch(model)
    model = model.to(device=device, dtype=param_dtype(dtype)).train(train)
    g = generator(device)
    H, W = image_hw
    x = randn((batch, 3, H, W), param_dtype(dtype), device, g)
    targets = _m2f_targets(batch, image_hw, num_classes, objects, g, device) if train else []

    def forward():
        with autocast(device, dtype):
            if train:
                return sum(model(x, targets).values())
            return _semantic(model(x), image_hw)
    leaves = [p for p in model.parameters() if p.requires_grad]
    return {"forward": forward, "leaves": leaves, "resident": [model, x] + [t["masks"] for t in targets]}


def _m2f_prep(fused: bool, whole_model: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        if whole_model:
            hook = _m2f_model_case
        else:
            try:
                hook = require("fastseg.models.mask2former", "decoder_bench_case", M2F_WHAT)
            except Unavailable:
                hook = _m2f_default_case
        case = hook(batch=s["B"], queries=s["Q"], image_hw=(s["H"], s["W"]), dtype=dtype, device=device,
                    train=mode == "fwdbwd", fused=fused)
        return Prepared(make_step(case["forward"], list(case["leaves"]), mode), resident=list(case.get("resident", [])),
                        forward=case["forward"])
    return prepare


def _m2f_analytic(s, dtype):
    raise Unavailable("no analytic memory model of the fused decoder (nine layers, heads, matcher and "
                      "point-sampled losses)")


def _m2f_cpu_estimate(s, dtype):
    # eager decoder: ~10 layers × (B·8·Q·L/64 attention + B·Q·H·W/16 mask logits) floats, generously
    return 10 * s["B"] * s["Q"] * s["H"] * s["W"] * 4 // 4


# shapes shared by the decoder and the whole model: (B, Q, image H x W)
M2F_PRESETS = {
    "quick": [{"B": 2, "Q": 100, "H": 256, "W": 256}],
    "default": [{"B": 8, "Q": 100, "H": 512, "W": 512}, {"B": 2, "Q": 200, "H": 1024, "W": 2048}],
    "ade": [{"B": b, "Q": q, "H": 512, "W": 512} for b in (2, 16) for q in (100, 200)],
    "cityscapes": [{"B": 2, "Q": q, "H": 1024, "W": 2048} for q in (100, 200)],
    "full": [{"B": b, "Q": q, "H": h, "W": w} for b in (2, 8, 16) for q in (100, 200)
             for h, w in ((512, 512), (1024, 1024), (1024, 2048))],
}


def _m2f_memprof_shape(q, h, w, b, extra):
    return {"B": b, "Q": q, "H": h, "W": w}


register(OpSpec(
    name="mask2former-decoder",
    summary="Mask2Former transformer decoder (9 layers + heads): training step / inference, reference vs fused",
    issue="issue 7",
    heavy=True,
    shape_keys={"B": 2, "Q": 100, "H": 512, "W": 512},
    presets={
        **M2F_PRESETS,
        "cpu": [{"B": 1, "Q": 50, "H": 128, "W": 128}],
        # more queries until one path runs out of memory (rows marked OOM)
        "limit": [{"B": 2, "Q": q, "H": 1024, "W": 2048} for q in (400, 800, 1600)]
        + [{"B": 16, "Q": q, "H": 512, "W": 512} for q in (400, 800, 1600)],
    },
    label=lambda s: f"B={s['B']} Q={s['Q']} image {s['H']}x{s['W']}",
    impls=[
        Impl("fastseg", _m2f_prep(True), fastseg=True, description="decoder, fused path + fastseg.patch"),
        Impl("reference", _m2f_prep(False), description="decoder, reference path (nn.MultiheadAttention)"),
    ],
    memprof=MemprofSpec(
        shape=_m2f_memprof_shape, eager="reference", fused="fastseg",
        analytic=_m2f_analytic, cpu_estimate=_m2f_cpu_estimate,
        description="the Mask2Former decoder (9 layers + heads, criterion); --mode fwdbwd: training step, "
                    "--mode fwd: inference incl. semantic inference at the input size",
        # a CPU training step of the whole decoder takes seconds: a small grid by default there
        cpu_grid=("50,100", "128x128,256x256", "1"), quick_grid=("50", "128x128,256x256", "1"),
    ),
))


def _m2f_model_cpu_estimate(s, dtype):
    # decoder as above plus MSCAN-T + deformable pixel decoder activations (~2 KB per input pixel per image)
    return _m2f_cpu_estimate(s, dtype) + 2048 * s["B"] * s["H"] * s["W"]


def _m2f_model_analytic(s, dtype):
    raise Unavailable("no analytic memory model of the whole fused Mask2Former; on a GPU both paths are measured")


register(OpSpec(
    name="mask2former",
    summary="Mask2Former with an MSCAN-T backbone, whole model: training step / inference, reference vs fused",
    issue="issue 7",
    heavy=True,
    shape_keys={"B": 2, "Q": 100, "H": 512, "W": 512},
    presets={**M2F_PRESETS, "cpu": [{"B": 1, "Q": 20, "H": 64, "W": 64}]},
    label=lambda s: f"MSCAN-T B={s['B']} Q={s['Q']} image {s['H']}x{s['W']}",
    impls=[
        Impl("fastseg", _m2f_prep(True, whole_model=True), fastseg=True,
             description="build_mask2former('mscan_t', fused=True) + fastseg.patch"),
        Impl("reference", _m2f_prep(False, whole_model=True),
             description="build_mask2former('mscan_t'), reference path"),
    ],
    memprof=MemprofSpec(
        shape=_m2f_memprof_shape, eager="reference", fused="fastseg",
        analytic=_m2f_model_analytic, cpu_estimate=_m2f_model_cpu_estimate,
        description="Mask2Former + MSCAN-T, whole model; --mode fwdbwd: training step, --mode fwd: inference",
        cpu_grid=("20,50", "64x64,128x128", "1"), quick_grid=("20", "64x64", "1"),
    ),
))
