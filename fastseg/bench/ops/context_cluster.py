"""Context Clusters' cluster block (issue 5): fastseg.nn.ContextCluster vs ``fastseg.reference.Cluster`` eager
and torch.compile, at coc_tiny / coc_medium stage shapes."""
from __future__ import annotations

import torch

from ..measure import Prepared
from ..registry import BenchError, Impl, MemprofSpec, OpSpec, register, require
from .common import compiled, generator, module_step, randn

OP = "context-cluster"
SHAPE_KEYS = {"B": 64, "dim": 32, "H": 56, "W": 56, "proposal": 2, "fold": 8, "heads": 4, "head_dim": 24}
# (dims, heads, head_dim) per stage; proposal 2×2 and folds 8, 4, 2, 1 in every configuration
COC = {"tiny": ([32, 64, 196, 320], [4, 4, 8, 8], 24), "small": ([64, 128, 320, 512], [4, 4, 8, 8], 32),
       "medium": ([64, 128, 320, 512], [6, 6, 12, 12], 32)}
FOLDS = [8, 4, 2, 1]
WHAT = "the fused context cluster lands with issue 5"


def stages(model: str, image: int, batch: int):
    dims, heads, hd = COC[model]
    return [{"B": batch, "dim": d, "H": image // 4 // 2**i, "W": image // 4 // 2**i, "proposal": 2, "fold": f,
             "heads": h, "head_dim": hd} for i, (d, h, f) in enumerate(zip(dims, heads, FOLDS))]


PRESETS = {
    "quick": stages("tiny", 224, 8)[:2],
    "cpu": [dict(s, B=2) for s in stages("tiny", 224, 2)[:2]],
    "imagenet": stages("tiny", 224, 128) + stages("medium", 224, 64),
    "ade": stages("tiny", 512, 16) + stages("medium", 512, 16),
    "default": stages("tiny", 224, 128)[:3] + stages("medium", 224, 64)[:2] + stages("tiny", 512, 16)[:1],
}
PRESETS["full"] = PRESETS["imagenet"] + stages("tiny", 224, 64) + stages("medium", 224, 128) + PRESETS["ade"]


def label(s):
    return (f"B={s['B']} dim={s['dim']} {s['H']}x{s['W']} heads={s['heads']}x{s['head_dim']} "
            f"fold={s['fold']} prop={s['proposal']}")


def _args(s):
    p, f = s["proposal"], s["fold"]
    return dict(dim=s["dim"], out_dim=s["dim"], proposal_w=p, proposal_h=p, fold_w=f, fold_h=f,
                heads=s["heads"], head_dim=s["head_dim"])


def _prep(fused: bool, compile_: bool = False):
    def prepare(s, dtype, device, mode) -> Prepared:
        ref_cls = require("fastseg.reference", "Cluster", "the Context Cluster reference lands with issue 5")
        cls = require("fastseg.nn", "ContextCluster", WHAT) if fused else None
        g = generator(device)
        x = randn((s["B"], s["dim"], s["H"], s["W"]), dtype, device, g, mode == "fwdbwd")
        torch.manual_seed(0)
        mod = ref_cls(**_args(s))
        if cls is not None:
            fused_mod = cls(**_args(s))
            fused_mod.load_state_dict(mod.state_dict())
            mod = fused_mod
        mod = mod.to(device=device, dtype=dtype)
        fn = compiled(mod) if compile_ else mod
        return module_step(lambda: fn(x), [x], [mod], mode)
    return prepare


def analytic_fused_bytes(s: dict, dtype: torch.dtype) -> dict:
    """fastseg.nn.ContextCluster's training step (input and parameters in ``dtype``), from the shapes.

    ``saved: ...`` parts are what autograd keeps beyond the input and parameters: the concatenated f/v 1x1
    weight, the packed f/v conv output, the fused op's assignment (int32), similarity, centers, aggregates
    and normaliser sums (fp32), and the op's output (the proj conv's input); checked against autograd's saved tensors
    by ``tests/test_cli.py``.
    """
    from fastseg.ops.context_cluster import effective_folds

    el = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    B, dim, H, W, heads, hd = s["B"], s["dim"], s["H"], s["W"], s["heads"], s["head_dim"]
    E = heads * hd
    F2, F3 = effective_folds(s["fold"], s["fold"])
    N = (H // F2) * (W // F3)  # pixels per region
    M = s["proposal"] ** 2  # centers per region
    n_inst = B * heads * F2 * F3
    x = B * dim * H * W * el
    weights = (2 * (E * dim + E) + dim * E + dim + 2) * el  # f, v, proj convs, sim_alpha, sim_beta
    return {
        "input x": x,
        "weights": weights,
        "saved: concatenated f/v weight": 2 * E * dim * el,
        "saved: f/v conv output (B, 2*heads*head_dim, H, W)": 2 * B * E * H * W * el,
        "saved: assignment (int32), similarity": n_inst * N * (4 + acc),
        "saved: centers, aggregates, normaliser sums": n_inst * M * (2 * hd + 1) * acc,
        "saved: cluster output (proj input)": B * E * H * W * el,
        "output": B * dim * H * W * el,
        "gradients of input and weights": x + weights,
        "backward: d(cluster output), d(f/v conv output)": 3 * B * E * H * W * el,
        # per pixel: dL/ds of the dispatch, dL/dz; per center: dL/dagg then dL/dcenter, normalised centers
        "backward: per-pixel and per-center scratch": n_inst * (2 * N + 2 * M * hd + 2) * acc,
    }


def _cpu_estimate(s: dict, dtype: torch.dtype) -> int:
    # eager reference: the (B*heads*folds, M, N) similarity and a dozen (B, heads*head_dim, H, W) activations
    E = s["heads"] * s["head_dim"]
    return 16 * s["B"] * max(E, s["dim"]) * s["H"] * s["W"] * 4


def _memprof_shape(queries, img_h, img_w, batch, extra) -> dict:
    """coc_tiny stage 1: stride 4, fold 8 (so the input must be a multiple of 32), 4 heads x 24."""
    if img_h % 32 or img_w % 32:
        raise BenchError(f"context-cluster memprof: input {img_h}x{img_w} must be a multiple of 32 "
                         "(stride 4, fold 8 of coc_tiny's first stage)")
    return stages("tiny", img_h, batch)[0] | {"H": img_h // 4, "W": img_w // 4}


register(OpSpec(
    name=OP,
    summary="Context Clusters cluster block (proposal, cosine sim, argmax, aggregate, dispatch)",
    issue="issue 5",
    cpu_note="the official math with the fold regions laid out once as points, a bmm aggregate and a gather "
             "dispatch instead of the original's two (b, M, N, c) broadcast products",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _prep(True), fastseg=True, description="fastseg.nn.ContextCluster"),
        Impl("eager", _prep(False), description="reference Cluster eager"),
        Impl("compile", _prep(False, True), gpu_only=True, description="torch.compile(reference Cluster)"),
    ],
    memprof=MemprofSpec(
        shape=_memprof_shape, eager="eager", fused="fastseg", analytic=analytic_fused_bytes,
        cpu_estimate=_cpu_estimate, queries=False,
        analytic_what="input, weights, what the block saves for backward, output, gradients, backward buffers",
        description="one context-cluster block (coc_tiny stage 1: dim 32, 4x24 heads, fold 8) at stride 4 of "
                    "the input, forward+backward",
        cpu_grid=(None, "256x256,512x512", "1,2"), quick_grid=(None, "128x128,256x256", "1"),
    ),
))
