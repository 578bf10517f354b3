"""CAC's context-aware classifier (issue 17): ``eager`` = the reference block
(:class:`fastseg.reference.cac.CACClassifier`, the classifier part of the official heads: ``conv_seg``, ``proj``,
``apd_proj``; dropout 0.1 as the official configs), ``fastseg`` = the drop-in
:class:`fastseg.nn.ContextAwareClassifier` (Triton soft prototypes, cosine classifiers, oracle prototypes,
entropy distillation and the three upsampled cross-entropies), ``compile`` = ``torch.compile`` of the eager block.

The case: (B, C, H, W) decoder features. ``fwd``: inference (base logits, soft prototypes, projector, cosine
classifier) → (B, K, H, W). ``fwdbwd``: the official training loss (refined CE at the label size H·stride, base
CE, oracle classifier CE, entropy-weighted distillation) and its backward. Labels: random classes with 10%
ignored (255) at the image size.
"""
from __future__ import annotations

import torch

from ..measure import Prepared
from ..registry import Impl, OpSpec, register, require
from .common import compiled, generator, module_step, randn

OP = "cac"
SHAPE_KEYS = {"B": 16, "C": 512, "K": 150, "H": 64, "W": 64, "stride": 8}
WHAT = "the fused CAC classifier (fastseg.nn.ContextAwareClassifier) is not in this build"


def _case(batch, channels, stride, classes=150, image=(512, 512)):
    return {"B": batch, "C": channels, "K": classes, "H": image[0] // stride, "W": image[1] // stride,
            "stride": stride}


PRESETS = {
    "quick": [{"B": 2, "C": 128, "K": 150, "H": 32, "W": 32, "stride": 8}],
    "cpu": [{"B": 1, "C": 64, "K": 150, "H": 16, "W": 16, "stride": 8}],
    # ADE20K 512x512 crops: FCN / DeepLabV3+ (C=512, stride 8), SegNeXt-T's Ham head (C=256, stride 8),
    # UPerNet (C=512, stride 4)
    "ade": [_case(2, 512, 8), _case(8, 512, 8), _case(16, 512, 8), _case(16, 256, 8), _case(8, 512, 4)],
    # COCO-Stuff-164k 512x512 crops, 171 classes
    "coco": [_case(8, 512, 8, 171), _case(16, 512, 8, 171)],
    # 1024x2048 inputs at stride 8 (128 x 256 features; Cityscapes-size images with the ADE / COCO-Stuff heads)
    "large": [_case(2, 512, 8, 150, (1024, 2048)), _case(2, 512, 8, 171, (1024, 2048))],
}
PRESETS["default"] = PRESETS["ade"][:4] + PRESETS["coco"][:1] + PRESETS["large"][:1]
PRESETS["full"] = PRESETS["ade"] + PRESETS["coco"] + PRESETS["large"]


def label(s):
    return f"B={s['B']} C={s['C']} K={s['K']} {s['H']}x{s['W']} stride={s['stride']}"


def _prep(fused: bool, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        if fused:
            cls = require("fastseg.nn", "ContextAwareClassifier", WHAT)
        else:
            cls = require("fastseg.reference.cac", "CACClassifier", "the CAC reference lands with issue 17")
        g = generator(device)
        x = randn((s["B"], s["C"], s["H"], s["W"]), dtype, device, g, mode == "fwdbwd")
        size = (s["B"], 1, s["H"] * s["stride"], s["W"] * s["stride"])
        y = torch.randint(0, s["K"], size, generator=g, device=device)
        y[torch.rand(size, generator=g, device=device) < 0.1] = 255
        torch.manual_seed(0)
        head = cls(s["C"], s["K"]).to(device=device, dtype=dtype).train(mode == "fwdbwd")
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
             description="fastseg.nn.ContextAwareClassifier: Triton prototypes, cosine classifiers, distillation, "
                         "upsample + CE"),
        Impl("eager", _prep(False), description="fastseg.reference.cac.CACClassifier (the heads' classifier), eager"),
        Impl("compile", _prep(False, True), gpu_only=True, description="torch.compile of the eager classifier"),
    ],
    notes=["CAC: the classifier part of the head on decoder features (conv_seg, proj, apd_proj); the conv_seg "
           "1x1 conv and the projector MLPs are PyTorch in both rows."],
))
