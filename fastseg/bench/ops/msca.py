"""SegNeXt's multi-scale convolutional attention (issue 4): fastseg.nn.MSCA vs the reference
``fastseg.reference.AttentionModule`` eager (NCHW and channels_last) and torch.compile, at MSCAN stage shapes."""
from __future__ import annotations

import math

import torch

from ..measure import Prepared
from ..registry import BenchError, Impl, MemprofSpec, OpSpec, register, require
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


def _setup(s, dtype, device, mode, ref_cls, cls, channels_last, *args):
    """Input x (B, C, H, W) and the module ``ref_cls(*args)``, or ``cls(*args)`` holding its state_dict."""
    g = generator(device)
    x = randn((s["B"], s["C"], s["H"], s["W"]), dtype, device, g, False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(mode == "fwdbwd")
    torch.manual_seed(0)
    ref = ref_cls(*args)
    mod = ref if cls is None else cls(*args)
    if cls is not None:
        mod.load_state_dict(ref.state_dict())
    mod = mod.to(device=device, dtype=dtype)
    if channels_last:
        mod = mod.to(memory_format=torch.channels_last)
    return x, mod


def _step(x, mod, mode, compile_: bool) -> Prepared:
    fn = compiled(mod) if compile_ else mod
    return module_step(lambda: fn(x), [x], [mod], mode)


def _prep(fused: bool, channels_last: bool, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        ref_cls = require("fastseg.reference", "AttentionModule", "the MSCA reference lands with issue 4")
        cls = require("fastseg.nn", "MSCA", WHAT) if fused else None
        x, mod = _setup(s, dtype, device, mode, ref_cls, cls, channels_last, s["C"])
        return _step(x, mod, mode, compile_)
    return prepare


def analytic_fused_bytes(s: dict, dtype: torch.dtype) -> dict:
    """fastseg.nn.MSCA's training step (input and parameters in ``dtype``), from the shapes: {part: bytes}.

    ``saved: ...`` parts are what the fused op keeps for backward beyond its input and weights (the summed
    depthwise branches ``s``, the packed depthwise weights in the accumulation dtype, the bias in the
    accumulation dtype when the weights are half precision), checked against autograd's saved tensors by
    ``tests/test_cli.py``. Not counted: the backward's small per-tile partial sums of the weight gradients and
    the kernels' scratch slots, whose sizes depend on the launch grid.
    """
    from fastseg.kernels.msca import WPACK

    el = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    B, C, H, W = s["B"], s["C"], s["H"], s["W"]
    x = B * C * H * W * el
    weights = (C * 103 + 7 * C + C * C + C) * el  # 7 depthwise convs (103 taps in all) + 1x1 conv3
    parts = {
        "input x": x,
        "weights": weights,
        "saved: s (sum of the depthwise branches)": x,
        "saved: packed depthwise weights (fp32)": C * WPACK * acc,
        "output": x,
        "gradients of input and weights": x + weights,
        # fp32 for fp32 / fp64 inputs, the input's dtype for fp16 / bf16 (kernels/msca.py: msca_pw_bwd)
        "backward: ds, dx_direct": 2 * B * C * H * W * (el if el < 4 else acc),
    }
    if el != acc:
        parts["saved: conv3 bias (fp32)"] = C * acc
    return parts


def _cpu_estimate(s: dict, dtype: torch.dtype) -> int:
    # eager: ~12 activations of x's size saved for backward, plus as many transient (generous)
    return 24 * s["B"] * s["C"] * s["H"] * s["W"] * max(4, torch.empty((), dtype=dtype).element_size())


MEMPROF_C = 64  # MSCAN-B/S/L stage 1 (MSCAN-T: 32)


def _memprof_shape(queries, img_h, img_w, batch, extra) -> dict:
    return {"B": batch, "C": MEMPROF_C, "H": math.ceil(img_h / 4), "W": math.ceil(img_w / 4)}


register(OpSpec(
    name=OP,
    summary="SegNeXt MSCA attention module (5x5 dw + 3 strip branches + 1x1 + gate)",
    issue="issue 4",
    cpu_note="the reference's convolutions; in inference NCHW input runs channels_last inside (oneDNN's depthwise "
             "convs are 2-3x faster so), in training it stays in the caller's layout (a channels_last copy would "
             "be one more x-sized tensor saved for backward), so fwdbwd equals eager in the same layout",
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
    memprof=MemprofSpec(
        shape=_memprof_shape, eager="eager", fused="fastseg", analytic=analytic_fused_bytes,
        cpu_estimate=_cpu_estimate, queries=False,
        analytic_what="input, weights, what the fused op saves for backward, output, gradients, the backward's "
                      "fp32 ds/dx buffers; not the small per-tile partial sums and scratch",
        description=f"one MSCA module (C={MEMPROF_C}, MSCAN-B stage 1) at stride 4 of the input, forward+backward",
        cpu_grid=(None, "128x128,256x256", "1,2"), quick_grid=(None, "128x128", "1"),
    ),
))


# ---------------------------------------------------------------------------------------------------------
# MSCAN's MLP (fc1 -> 3x3 depthwise + bias -> GELU -> fc2) with the depthwise conv + GELU fused (issue 4)
# ---------------------------------------------------------------------------------------------------------
MLP_RATIOS = [8, 8, 4, 4]


def mlp_stages(model: str, image_hw, batch):
    return [{"B": batch, "C": c, "hidden": c * r, "H": math.ceil(image_hw[0] / s), "W": math.ceil(image_hw[1] / s)}
            for c, r, s in zip(MSCAN[model], MLP_RATIOS, STRIDES)]


MLP_PRESETS = {
    "quick": [{"B": 2, "C": 32, "hidden": 256, "H": 64, "W": 64}],
    "cpu": [{"B": 2, "C": 32, "hidden": 256, "H": 32, "W": 32}, {"B": 2, "C": 64, "hidden": 512, "H": 16, "W": 16}],
    "ade": mlp_stages("t", (512, 512), 16) + mlp_stages("b", (512, 512), 16),
    "cityscapes": mlp_stages("t", (1024, 1024), 8) + mlp_stages("b", (1024, 1024), 8),
    "default": mlp_stages("t", (512, 512), 16)[:3] + mlp_stages("b", (512, 512), 16)[:2],
}
MLP_PRESETS["full"] = MLP_PRESETS["ade"] + MLP_PRESETS["cityscapes"]


def _mlp_prep(fused: bool, channels_last: bool = False, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        ref_cls = require("fastseg.models.mscan", "Mlp", "the MSCAN reference lands with issue 4")
        cls = require("fastseg.nn", "MSCANMlp", "the fused MLP depthwise conv lands with issue 4") if fused else None
        x, mod = _setup(s, dtype, device, mode, ref_cls, cls, channels_last, s["C"], s["hidden"])
        return _step(x, mod, mode, compile_)
    return prepare


register(OpSpec(
    name="mlp-dwconv",
    summary="SegNeXt MSCAN MLP (fc1, 3x3 depthwise + bias + GELU fused, fc2)",
    issue="issue 4",
    cpu_note="the reference's convolutions and GELU, so it equals eager in the same layout (no cheaper PyTorch "
             "formulation of a 3x3 depthwise conv + GELU found); use channels_last on a CPU",
    shape_keys={"B": 8, "C": 32, "hidden": 256, "H": 64, "W": 64},
    presets=MLP_PRESETS,
    label=lambda s: f"B={s['B']} C={s['C']}->{s['hidden']} {s['H']}x{s['W']}",
    impls=[
        Impl("fastseg", _mlp_prep(True), fastseg=True, description="fastseg.nn.MSCANMlp, NCHW"),
        Impl("fastseg-cl", _mlp_prep(True, True), description="fastseg.nn.MSCANMlp, channels_last"),
        Impl("eager", _mlp_prep(False), description="MSCAN Mlp eager, NCHW"),
        Impl("eager-cl", _mlp_prep(False, True), description="MSCAN Mlp eager, channels_last"),
        Impl("compile", _mlp_prep(False, False, True), gpu_only=True, description="torch.compile(Mlp)"),
    ],
))
