"""ECENet (issue 17), reference only: the whole model, the head alone, and its SAU attention.

* ``ecenet``: MSCAN-{t,s,b,l} + :class:`fastseg.models.ECENetHead` (C = 256, 150 classes). ``fwd``: eval
  forward at the image size; ``fwdbwd``: ``forward_train`` (CE + 5·focal + 2·dice on the masks + 0.2·diversity)
  and the backward of every parameter. Heavy (whole model).
* ``ecenet-head``: the head on random stage features (strides 4/8/16/32 of an H×W image, MSCAN-T widths).
* ``ecenet-sau``: the stride-4 SAU attention core (pixels × classes, head-mean logits emitted):
  ``eager`` = :func:`fastseg.reference.ecenet.sau_attention`; ``sdpa`` = SDPA on the negated scale plus one
  GEMM over the concatenated heads for the logits (plain PyTorch, nothing (B, h, HW, K) in forward);
  ``fastseg`` = the fused ATM attention (``fastseg.ops.atm_attention``) called with ``-scale`` and its logits
  negated — unavailable until that op is merged.

Labels: per image 12 of the K classes in 16×16-pixel blocks (ADE20K images hold ~10–20 classes; uniform random
labels would put all 150 in every image and inflate the mask loss), 10% ignored (255).

Hot parts (docs/ecenet.md has the measured CPU breakdown): the stride-4 SAU stage — its (B, 4, HW, K)
attention (several copies: logits, the port's ``max − a``, softmax, the saved logits) and its conv MLP at
4C = 1024 channels (fc1 → depthwise 3×3 → GELU → fc2, the same structure as MSCAN's ``Mlp``, which fastseg
fuses as ``fastseg.ops.dwconv3x3_gelu``) — and the full-resolution cross-entropy (maps onto
``fastseg.ops.upsampled_cross_entropy``).
"""
from __future__ import annotations

import torch

from ..measure import Prepared
from ..registry import Impl, OpSpec, register, require
from .common import autocast, compiled, generator, module_step, param_dtype, randn

__all__ = ["ecenet_labels"]

WHAT = "the ECENet reference lands with issue 17"
MSCAN_DIMS = {"t": (32, 64, 160, 256), "s": (64, 128, 320, 512), "b": (64, 128, 320, 512), "l": (64, 128, 320, 512)}


def ecenet_labels(batch, h, w, num_classes, g, device, classes_per_image=12, block=16, ignore=0.1):
    """(B, H, W) int64: ``classes_per_image`` classes per image in ``block``² blocks, ``ignore`` of pixels 255."""
    hb, wb = -(-h // block), -(-w // block)
    out = []
    for _ in range(batch):
        classes = torch.randperm(num_classes, generator=g, device=device)[:min(classes_per_image, num_classes)]
        idx = torch.randint(0, classes.numel(), (hb, wb), generator=g, device=device)
        lab = classes[idx].repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
        out.append(lab)
    labels = torch.stack(out)
    labels[torch.rand(labels.shape, generator=g, device=device) < ignore] = 255
    return labels


def _model_prep(compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        build = require("fastseg.models", f"mscan_{s['model']}_ecenet", WHAT)
        torch.manual_seed(0)
        model = build(num_classes=s["K"], channels=s["C"]).to(device=device, dtype=param_dtype(dtype))
        model.train(mode == "fwdbwd")
        g = generator(device)
        x = randn((s["B"], 3, s["H"], s["W"]), param_dtype(dtype), device, g)
        y = ecenet_labels(s["B"], s["H"], s["W"], s["K"], g, device)
        train = compiled(model.forward_train) if compile_ else model.forward_train
        infer = compiled(model) if compile_ else model

        def fn():
            with autocast(device, dtype):
                return train(x, y)["loss"] if mode == "fwdbwd" else infer(x)
        return module_step(fn, [], [model], mode, extra_resident=[x, y])
    return prepare


def _head_prep(compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        head_cls = require("fastseg.models", "ECENetHead", WHAT)
        torch.manual_seed(0)
        dims = MSCAN_DIMS[s["model"]]
        head = head_cls(in_channels=dims, channels=s["C"], num_classes=s["K"]).to(device=device,
                                                                                   dtype=param_dtype(dtype))
        head.train(mode == "fwdbwd")
        g = generator(device)
        feats = [randn((s["B"], c, -(-s["H"] // 2 ** (i + 2)), -(-s["W"] // 2 ** (i + 2))), param_dtype(dtype),
                       device, g, mode == "fwdbwd") for i, c in enumerate(dims)]
        y = ecenet_labels(s["B"], s["H"], s["W"], s["K"], g, device)
        train = compiled(head.forward_train) if compile_ else head.forward_train
        infer = compiled(head) if compile_ else head

        def fn():
            with autocast(device, dtype):
                if mode == "fwdbwd":
                    return sum(train(feats, y).values())
                return infer(feats)["seg_logits"]
        return module_step(fn, feats, [head], mode, extra_resident=[y])
    return prepare


def _sau_prep(impl: str):
    def prepare(s, dtype, device, mode) -> Prepared:
        ref = require("fastseg.reference.ecenet", "sau_attention", WHAT)
        fused = require("fastseg.ops", "atm_attention",
                        "the fused ATM attention (head-mean logits emitted) is not in this build") \
            if impl == "fastseg" else None
        g = generator(device)
        heads, d = s["heads"], s["C"] // s["heads"]
        n = (-(-s["H"] // s["stride"])) * (-(-s["W"] // s["stride"]))
        train = mode == "fwdbwd"
        q = randn((s["B"], heads, n, d), dtype, device, g, train)
        k = randn((s["B"], heads, s["K"], d), dtype, device, g, train)
        v = randn((s["B"], heads, s["K"], d), dtype, device, g, train)
        scale = d ** -0.5

        if impl in ("eager", "compile"):
            def core():
                return ref(q, k, v, scale)
        elif impl == "sdpa":
            def core():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=-scale)
                qc = q.transpose(1, 2).reshape(s["B"], n, heads * d)
                kc = k.transpose(1, 2).reshape(s["B"], s["K"], heads * d)
                return out, (qc @ kc.transpose(1, 2)) * (scale / heads)
        else:
            def core():
                out, logits = fused(q, k, v, -scale)
                return out, -logits

        def fn():
            out, logits = core()
            # a scalar using both outputs (the masks feed ECE / the loss, the output the residual stream)
            return out.float().square().mean() + logits.float().square().mean() if train else (out, logits)
        fn_ = compiled(fn) if impl == "compile" else fn
        return module_step(fn_, [q, k, v], [], mode)
    return prepare


def _label(s):
    return f"MSCAN-{s['model'].upper()} B={s['B']} {s['H']}x{s['W']} C={s['C']} K={s['K']}"


SHAPE = {"model": "t", "B": 16, "H": 512, "W": 512, "C": 256, "K": 150}

#: the whole model and the head alone run at the same shapes
_MODEL_PRESETS = {
    "cpu": [{"model": "t", "B": 1, "H": 64, "W": 64, "C": 64, "K": 19}],
    "quick": [{"model": "t", "B": 2, "H": 256, "W": 256}],
    "ade": [{"model": "t", "B": 16, "H": 512, "W": 512}, {"model": "b", "B": 16, "H": 512, "W": 512}],
    "default": [{"model": "t", "B": 16, "H": 512, "W": 512}],
    "full": [{"model": m, "B": b, "H": 512, "W": 512} for m in ("t", "b") for b in (8, 16)],
}

register(OpSpec(
    name="ecenet",
    summary="ECENet (MSCAN + ECENet head), whole model: training step (all losses) / inference — reference",
    issue="issue 17",
    heavy=True,
    shape_keys=dict(SHAPE),
    presets=_MODEL_PRESETS,
    label=_label,
    impls=[
        Impl("eager", _model_prep(), description="fastseg.models.mscan_*_ecenet, eager (reference)"),
        Impl("compile", _model_prep(True), gpu_only=True, description="torch.compile of the eager model"),
    ],
    notes=["ECENet has no fused path yet: rows are the plain-PyTorch reference (hot parts: docs/ecenet.md)."],
))

register(OpSpec(
    name="ecenet-head",
    summary="ECENet head alone (FR, ECE, 3 SAU stages, ghost upsampling, fusion; training: all losses)",
    issue="issue 17",
    shape_keys=dict(SHAPE),
    presets=_MODEL_PRESETS,
    label=lambda s: f"head({s['model']}) B={s['B']} {s['H']}x{s['W']} C={s['C']} K={s['K']}",
    impls=[
        Impl("eager", _head_prep(), description="fastseg.models.ECENetHead, eager (reference)"),
        Impl("compile", _head_prep(True), gpu_only=True, description="torch.compile of the eager head"),
    ],
))

register(OpSpec(
    name="ecenet-sau",
    summary="ECENet SAU attention core: H·W pixels attend to K class embeddings, head-mean logits emitted",
    issue="issue 17",
    shape_keys={"B": 16, "H": 512, "W": 512, "stride": 4, "C": 256, "heads": 4, "K": 150},
    presets={
        "cpu": [{"B": 1, "H": 128, "W": 128, "stride": 4, "C": 64, "heads": 4, "K": 19}],
        "quick": [{"B": 2, "H": 256, "W": 256}],
        "ade": [{"B": b, "H": 512, "W": 512, "stride": st} for b in (8, 16) for st in (4, 8)],
        "default": [{"B": 16, "H": 512, "W": 512, "stride": 4}],
        "full": [{"B": b, "H": 512, "W": 512, "stride": st} for b in (8, 16) for st in (4, 8, 16)],
    },
    label=lambda s: (f"B={s['B']} {s['H']}x{s['W']}/{s['stride']} C={s['C']} h={s['heads']} K={s['K']}"),
    impls=[
        Impl("fastseg", _sau_prep("fastseg"), fastseg=True,
             description="fastseg.ops.atm_attention(q, k, v, -scale), logits negated (the fused ATM kernels)"),
        Impl("eager", _sau_prep("eager"), description="fastseg.reference.ecenet.sau_attention (the port's math)"),
        Impl("sdpa", _sau_prep("sdpa"), description="SDPA with -scale + one GEMM for the head-mean logits"),
        Impl("compile", _sau_prep("compile"), gpu_only=True, description="torch.compile of the eager core"),
    ],
    notes=["ecenet-sau fastseg = SegViT's fused ATM attention with a negated scale (the port's softmax(max - a) "
           "is softmax(-a)); unavailable until fastseg.ops.atm_attention is merged."],
))

