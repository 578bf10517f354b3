"""SegViT's ATM cross-attention (issue 18): fastseg vs the official ``Attention`` and SDPA + separate logits.

One ATM decoder layer's cross-attention as the official ``TPN_DecoderLayer`` calls it: the class queries
(B, K, C) attend the ViT tokens of one stage (B, H·W, C) at stride 16 (``multihead_attn(q, memory, memory)``),
``Attention(C, heads, qkv_bias=True, attn_drop=0.1)``, returning the output and the head-mean pre-softmax
logits (B, K, H·W), both used downstream (so the training step back-propagates a loss of both). ``fwdbwd``
is a training step (attention dropout 0.1 on), ``fwd`` inference (eval mode). Official widths: ViT-B
``embed_dims`` 384 / 12 heads at 512², ViT-L 512 / 16 heads at 640² (head dim 32 in both); a head dim 64
row (1024 / 16) too. ``segvit``: the whole model (``fastseg.models.build_segvit``) with and without its ATM
cross-attention layers patched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..measure import Prepared, Unavailable
from ..registry import Impl, MemprofSpec, OpSpec, register, require
from .common import compiled, generator, image_model_step, module_step, param_dtype, randn, scalar_loss

OP = "atm-attention"
SHAPE_KEYS = {"B": 2, "K": 150, "H": 32, "W": 32, "C": 384, "heads": 12, "drop": 0.1}
VIT_B = {"C": 384, "heads": 12}  # SegViT ViT-B: embed_dims = 768 // 2, 12 heads
VIT_L = {"C": 512, "heads": 16}  # SegViT ViT-L: embed_dims = 1024 // 2, 16 heads
WIDE = {"C": 1024, "heads": 16}  # head dim 64


def _ade(batch: int, image: int, width: dict, classes: int = 150) -> dict:
    return {"B": batch, "K": classes, "H": image // 16, "W": image // 16, **width}


PRESETS = {
    "quick": [_ade(2, 512, VIT_B)],
    "cpu": [{"B": 1, "K": 150, "H": 16, "W": 16, **VIT_B}],
    # ADE20K: ViT-B at 512² (32×32 tokens), ViT-L at 640² (40×40); batch as the official configs (2 per GPU
    # for ViT-L) and larger
    "ade": [_ade(b, 512, VIT_B) for b in (2, 8)] + [_ade(b, 640, VIT_L) for b in (2, 8)]
    + [_ade(2, 512, VIT_L), _ade(2, 640, VIT_B), _ade(2, 640, WIDE), _ade(8, 640, WIDE)],
}
PRESETS["default"] = PRESETS["ade"][:4] + [_ade(2, 640, WIDE)]
PRESETS["d64"] = [_ade(2, 640, WIDE), _ade(8, 640, WIDE)]  # head dim 64 only (e.g. fastseg inspect --preset d64)
PRESETS["full"] = PRESETS["ade"] + [_ade(2, 640, VIT_L, 171), _ade(8, 512, VIT_B, 171)]


def label(s: dict) -> str:
    return f"B={s['B']} K={s['K']} {s['H']}x{s['W']} C={s['C']}/{s['heads']}h drop={s['drop']}"


def _inputs(s: dict, dtype, device, mode):
    ref_cls = require("fastseg.reference", "ATMAttention", "the ATM attention reference lands with issue 18")
    g = generator(device)
    grad = mode == "fwdbwd"
    q = randn((s["B"], s["K"], s["C"]), dtype, device, g, grad)
    mem = randn((s["B"], s["H"] * s["W"], s["C"]), dtype, device, g, grad)
    torch.manual_seed(0)
    ref = ref_cls(s["C"], s["heads"], qkv_bias=True, attn_drop=s["drop"]).to(device=device, dtype=dtype)
    return q, mem, ref.train(mode == "fwdbwd")


def _step(layer, q, mem, modules, mode) -> Prepared:
    return module_step(lambda: scalar_loss(layer(q, mem, mem)), [q, mem], modules, mode)


def prep_fastseg(s, dtype, device, mode) -> Prepared:
    cls = require("fastseg.nn", "ATMAttention", "the fused ATM attention lands with issue 18")
    q, mem, ref = _inputs(s, dtype, device, mode)
    mod = cls.from_module(ref)
    del ref
    return _step(mod, q, mem, [mod], mode)


def prep_eager(s, dtype, device, mode) -> Prepared:
    q, mem, ref = _inputs(s, dtype, device, mode)
    return _step(ref, q, mem, [ref], mode)


def prep_compile(s, dtype, device, mode) -> Prepared:
    q, mem, ref = _inputs(s, dtype, device, mode)
    return _step(compiled(ref), q, mem, [ref], mode)


def prep_sdpa(s, dtype, device, mode) -> Prepared:
    """The same layer with ``F.scaled_dot_product_attention`` for the output and the head-mean logits as one
    extra matmul over the concatenated heads (Σ_h q_h k_hᵀ = [q_1 … q_H][k_1 … k_H]ᵀ): the best one can do
    with stock PyTorch without materialising the per-head scores."""
    q, mem, ref = _inputs(s, dtype, device, mode)
    h = s["heads"]

    def layer(xq, xk, xv):
        B, Nq, C = xq.shape
        qc, kc, vc = ref.q(xq), ref.k(xk), ref.v(xv)
        heads = lambda t: t.unflatten(-1, (h, C // h)).transpose(1, 2)  # noqa: E731
        p = ref.attn_drop.p if ref.training else 0.0
        x = F.scaled_dot_product_attention(heads(qc), heads(kc), heads(vc), dropout_p=p, scale=ref.scale)
        logits = torch.matmul(qc, kc.transpose(1, 2)) * (ref.scale / h)
        x = ref.proj_drop(ref.proj(x.transpose(1, 2).reshape(B, Nq, C)))
        return x.transpose(0, 1), logits
    return _step(layer, q, mem, [ref], mode)


def analytic_fused_bytes(s: dict, dtype: torch.dtype) -> dict:
    """The fused layer's training-step memory from the shapes: {part: bytes}. ``saved: ...``: what the layer
    keeps for backward (the q / k / v projections, the attention output — also the input of ``proj`` — the row
    log-sum-exp and the dropout seed; the layer's inputs are inputs); the forward's transient partial results
    (one per key split of the flash-style forward) are counted as ``forward partials`` (freed before the backward), so the
    sum is an upper bound of the peak. ``tests/test_atm_attention.py`` checks the saved parts against what
    autograd really saves (interpreter)."""
    from fastseg.kernels.masked_attention import TILE, _block_d

    el = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4  # lse, logits and partials: fp32 (fp64 for fp64 inputs)
    B, K, N, C, h = s["B"], s["K"], s["H"] * s["W"], s["C"], s["heads"]
    # the flash-style forward's key splits on an H100 / H200 (~4 programs per SM, fastseg.kernels.
    # masked_attention._num_splits with 132 SMs)
    n_qb, n_kb = math.ceil(K / TILE[0]), math.ceil(N / TILE[1])
    splits = max(1, min(math.ceil(4 * 132 / (B * h * n_qb)), n_kb))
    inputs = (K + N) * B * C * el
    weights = (4 * C * C + 4 * C) * el
    return {
        "inputs (queries, memory)": inputs,
        "weights": weights,
        "saved: q projection": K * B * C * el,
        "saved: k, v projections": 2 * N * B * C * el,
        "saved: attention output (before proj)": K * B * C * el,
        "saved: logsumexp (fp32)": B * h * K * acc,
        "saved: dropout seed": 8 if s["drop"] > 0 else 0,
        "output x": K * B * C * el,
        "output logits (fp32)": B * K * N * acc,
        "forward partials (fp32, transient)": splits * B * h * K * (_block_d(C // h) + 2) * acc,
        "gradients of inputs and weights": inputs + weights,
        "backward dq, dk, dv": (K + 2 * N) * B * C * el,
    }


def _cpu_estimate(s: dict, dtype: torch.dtype) -> int:
    el = torch.empty((), dtype=dtype).element_size()
    B, K, N, h = s["B"], s["K"], s["H"] * s["W"], s["heads"]
    return B * h * K * N * (5 * el + 1) + 8 * N * B * s["C"] * el


def _memprof_shape(queries: int, img_h: int, img_w: int, batch: int, extra: dict) -> dict:
    width = {"b": VIT_B, "l": VIT_L, "wide": WIDE}[extra.get("vit", "b")]
    return {**SHAPE_KEYS, **width, "B": batch, "K": queries, "H": math.ceil(img_h / 16), "W": math.ceil(img_w / 16)}


register(OpSpec(
    name=OP,
    summary="SegViT ATM cross-attention (output + head-mean logits), one decoder layer",
    issue="issue 18",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", prep_fastseg, fastseg=True, description="fastseg.nn.ATMAttention (fused output + logits)"),
        Impl("eager", prep_eager, description="the official SegViT Attention (per-head scores materialised)"),
        Impl("sdpa", prep_sdpa, description="linears + F.scaled_dot_product_attention + logits as one matmul"),
        Impl("compile", prep_compile, gpu_only=True, description="torch.compile(official Attention)"),
    ],
    memprof=MemprofSpec(
        shape=_memprof_shape, eager="eager", fused="fastseg", analytic=analytic_fused_bytes,
        cpu_estimate=_cpu_estimate,
        description="one ATM cross-attention layer (ViT-B width: 384 / 12 heads), classes x resolution at "
                    "stride 16, forward+backward",
        cpu_grid=("150", "256,512", "1"), quick_grid=("150,171", "512,640", "2"),
    ),
))


# ------------------------------------------------------------------------------------- the whole SegViT model
def _segvit_prep(fused: bool, compile_: bool = False):
    """SegViT (``fastseg.models.build_segvit``, random init) at the input size; ``fused``: ``fastseg.patch`` swaps
    its ATM decoder layers' ``multihead_attn`` for :class:`fastseg.nn.ATMAttention` (nothing else). Training step:
    forward in train mode + backward of a scalar of the outputs (not ATMLoss); fp16 / bf16 under autocast with
    fp32 parameters. ``fwd``: eval forward."""
    def prepare(s, dtype, device, mode) -> Prepared:
        build = require("fastseg.models", "build_segvit", "the SegViT models land with issue 18")
        torch.manual_seed(0)
        model = build(s["model"], num_classes=s["K"], img_size=s["img"])
        model = model.to(device=device, dtype=param_dtype(dtype)).train(mode == "fwdbwd")
        if fused:
            import fastseg

            model, report = fastseg.patch(model, ops=["atm_attention"], verify=False)
            if not report.replaced:
                why = "; ".join(sorted({sk.reason for sk in report.skipped}))[:200]
                raise Unavailable("fastseg.patch found no ATM attention layer to swap"
                                  + (f" (skipped: {why})" if why else ""))
        x = randn((s["B"], 3, s["img"], s["img"]), param_dtype(dtype), device, generator(device))
        return image_model_step(model, x, dtype, device, mode, compile_)
    return prepare


register(OpSpec(
    name="segvit",
    summary="SegViT (ViT + ATM head), whole model; fastseg = ATM cross-attention layers patched",
    issue="issue 18",
    heavy=True,
    shape_keys={"model": "b", "B": 2, "img": 512, "K": 150},
    presets={
        "quick": [{"model": "t", "B": 1, "img": 256, "K": 150}],
        "cpu": [{"model": "t", "B": 1, "img": 128, "K": 150}],
        "default": [{"model": "b", "B": 4, "img": 512, "K": 150}, {"model": "l", "B": 2, "img": 640, "K": 150}],
        "ade": [{"model": "b", "B": b, "img": 512, "K": 150} for b in (2, 8)]
        + [{"model": "l", "B": b, "img": 640, "K": 150} for b in (2, 4)],
    },
    label=lambda s: f"SegViT-{s['model'].upper()} B={s['B']} {s['img']}x{s['img']} K={s['K']}",
    impls=[
        Impl("fastseg", _segvit_prep(True), fastseg=True,
             description="build_segvit + fastseg.patch(ops=['atm_attention']): fused ATM cross-attention"),
        Impl("eager", _segvit_prep(False), description="fastseg.models.build_segvit (official layers)"),
        Impl("compile", _segvit_prep(False, True), gpu_only=True, description="torch.compile(build_segvit(...))"),
    ],
    notes=["segvit: only the ATM cross-attention is fused; the ViT backbone and the rest of the head are the "
           "reference; the training step back-propagates a scalar of the outputs, not ATMLoss."],
))
