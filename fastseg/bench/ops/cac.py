"""CAC's context-aware classifier (issue 17): the eager reference, and ``fastseg`` = the same head with its three
full-resolution cross-entropies fused (``set_fused(True)``: Triton upsample + cross-entropy). A fused path for the
prototype / cosine-classifier / distillation math is not built yet, so ``fwd`` (inference) has no fastseg row.

The case is the classifier part of a CAC head on (B, C, H, W) decoder features (``FCNHeadCAC`` with no convs:
``conv_seg``, ``proj``, ``apd_proj``; dropout 0.1 as the official configs). ``fwd``: inference (base logits,
soft prototypes, cosine classifier) → (B, K, H, W). ``fwdbwd``: the official training loss (refined CE at the
label size H·stride, base CE, oracle classifier CE, entropy-weighted distillation) and its backward.
Labels: random classes with 10% ignored (255) at the image size.
"""
from __future__ import annotations

import torch

from ..measure import Prepared, Unavailable
from ..registry import Impl, OpSpec, register, require
from .common import compiled, generator, module_step, randn

OP = "cac"
SHAPE_KEYS = {"B": 16, "C": 512, "K": 150, "H": 64, "W": 64, "stride": 8}
WHAT = "the fused upsample + cross-entropy op is not in this build"


def _ade(batch, channels, stride, image=512):
    return {"B": batch, "C": channels, "K": 150, "H": image // stride, "W": image // stride, "stride": stride}


PRESETS = {
    "quick": [{"B": 2, "C": 128, "K": 150, "H": 32, "W": 32, "stride": 8}],
    "cpu": [{"B": 1, "C": 64, "K": 150, "H": 16, "W": 16, "stride": 8}],
    # ADE20K 512x512 crops: FCN / DeepLabV3+ (C=512, stride 8), SegNeXt-T's Ham head (C=256, stride 8),
    # UPerNet (C=512, stride 4)
    "ade": [_ade(2, 512, 8), _ade(8, 512, 8), _ade(16, 512, 8), _ade(16, 256, 8), _ade(8, 512, 4)],
}
PRESETS["default"] = PRESETS["ade"][:4]
PRESETS["full"] = PRESETS["ade"]


def label(s):
    return f"B={s['B']} C={s['C']} K={s['K']} {s['H']}x{s['W']} stride={s['stride']}"


def _prep(fused: bool, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        head_cls = require("fastseg.models.cac_head", "FCNHeadCAC", "the CAC reference lands with issue 17")
        if fused:
            require("fastseg.ops", "upsampled_cross_entropy", WHAT)
            if mode != "fwdbwd":
                raise Unavailable("the fused path covers the training cross-entropies only (inference is the "
                                  "eager reference; a fused prototype / cosine classifier is not built yet)")
        g = generator(device)
        x = randn((s["B"], s["C"], s["H"], s["W"]), dtype, device, g, mode == "fwdbwd")
        size = (s["B"], 1, s["H"] * s["stride"], s["W"] * s["stride"])
        y = torch.randint(0, s["K"], size, generator=g, device=device)
        y[torch.rand(size, generator=g, device=device) < 0.1] = 255
        torch.manual_seed(0)
        head = head_cls(in_channels=s["C"], channels=s["C"], num_classes=s["K"], num_convs=0, concat_input=False)
        head = head.to(device=device, dtype=dtype).train(mode == "fwdbwd").set_fused(fused)
        if mode == "fwdbwd":
            def fn(inp):
                return head.forward_train(inp, y)["loss_ce"]
        else:
            fn = head
        fn = compiled(fn) if compile_ else fn
        return module_step(lambda: fn(x), [x], [head], mode, extra_resident=[y])
    return prepare


register(OpSpec(
    name=OP,
    summary="CAC context-aware classifier (soft prototypes, cosine classifier; training: oracle + distillation)",
    issue="issue 17",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _prep(True), fastseg=True,
             description="FCNHeadCAC classifier part, set_fused(True): Triton upsample + cross-entropy"),
        Impl("eager", _prep(False), description="fastseg.models.FCNHeadCAC classifier part, eager"),
        Impl("compile", _prep(False, True), gpu_only=True, description="torch.compile of the eager classifier"),
    ],
    notes=["CAC fastseg rows fuse only the three upsampled cross-entropies; the prototype / cosine-classifier / "
           "distillation math is the plain-PyTorch reference (a fused path for it is not built yet)."],
))
