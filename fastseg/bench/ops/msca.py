"""SegNeXt's multi-scale convolutional attention (issue 4): fastseg.nn.MSCA vs the reference
``fastseg.reference.AttentionModule`` eager (NCHW and channels_last) and torch.compile, at MSCAN stage shapes."""
from __future__ import annotations

import math

import torch

from ..measure import Prepared
from ..registry import Impl, OpSpec, register, require
from .common import compiled, generator, module_step, randn

OP = "msca"
SHAPE_KEYS = {"B": 8, "C": 64, "H": 64, "W": 64}
MSCAN = {"t": [32, 64, 160, 256], "s": [64, 128, 320, 512], "b": [64, 128, 320, 512], "l": [64, 128, 320, 512]}
STRIDES = [4, 8, 16, 32]
WHAT = "the fused MSCA lands with issue 4"


def stages(model: str, image_hw, batch):
    return [{"B": batch, "C": c, "H": math.ceil(image_hw[0] / s), "W": math.ceil(image_hw[1] / s)}
            for c, s in zip(MSCAN[model], STRIDES)]


PRESETS = {
    "quick": [{"B": 2, "C": 32, "H": 64, "W": 64}, {"B": 2, "C": 64, "H": 32, "W": 32}],
    "cpu": [{"B": 2, "C": 32, "H": 32, "W": 32}, {"B": 2, "C": 64, "H": 16, "W": 16}],
    # ADE20K training crops 512×512 (batch 16), MSCAN-T and -B stages, plus an ADE test-size (512×683) stage
    "ade": stages("t", (512, 512), 16) + stages("b", (512, 512), 16) + [{"B": 16, "C": 32, "H": 128, "W": 171}],
    # Cityscapes crops 1024×1024 (batch 8)
    "cityscapes": stages("t", (1024, 1024), 8) + stages("b", (1024, 1024), 8),
    "default": stages("t", (512, 512), 16)[:3] + stages("b", (512, 512), 16)[:2]
    + [{"B": 16, "C": 32, "H": 128, "W": 171}, {"B": 8, "C": 64, "H": 256, "W": 256}],
}
PRESETS["full"] = PRESETS["ade"] + PRESETS["cityscapes"] + stages("t", (512, 683), 16) + stages("b", (512, 683), 16)
PRESETS["mask2former-ade"] = PRESETS["ade"]


def label(s):
    return f"B={s['B']} C={s['C']} {s['H']}x{s['W']}"


def _setup(s, dtype, device, mode, cls, channels_last):
    g = generator(device)
    x = randn((s["B"], s["C"], s["H"], s["W"]), dtype, device, g, False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(mode == "fwdbwd")
    torch.manual_seed(0)
    ref = require("fastseg.reference", "AttentionModule", "the MSCA reference lands with issue 4")(s["C"])
    mod = ref if cls is None else cls(s["C"])
    if cls is not None:
        mod.load_state_dict(ref.state_dict())
    mod = mod.to(device=device, dtype=dtype)
    if channels_last:
        mod = mod.to(memory_format=torch.channels_last)
    return x, mod


def _prep(fused: bool, channels_last: bool, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        cls = require("fastseg.nn", "MSCA", WHAT) if fused else None
        x, mod = _setup(s, dtype, device, mode, cls, channels_last)
        fn = compiled(mod) if compile_ else mod
        return module_step(lambda: fn(x), [x], [mod], mode)
    return prepare


register(OpSpec(
    name=OP,
    summary="SegNeXt MSCA attention module (5x5 dw + 3 strip branches + 1x1 + gate)",
    issue="issue 4",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _prep(True, False), fastseg=True, description="fastseg.nn.MSCA, NCHW"),
        Impl("fastseg-cl", _prep(True, True), description="fastseg.nn.MSCA, channels_last"),
        Impl("eager", _prep(False, False), description="reference AttentionModule eager (cuDNN), NCHW"),
        Impl("eager-cl", _prep(False, True), description="reference AttentionModule eager, channels_last"),
        Impl("compile", _prep(False, False, True), gpu_only=True, description="torch.compile(reference)"),
    ],
))
