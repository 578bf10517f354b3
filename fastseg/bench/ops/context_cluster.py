"""Context Clusters' cluster block (issue 5): fastseg.nn.ContextCluster vs ``fastseg.reference.Cluster`` eager
and torch.compile, at coc_tiny / coc_medium stage shapes."""
from __future__ import annotations

import torch

from ..measure import Prepared
from ..registry import Impl, OpSpec, register, require
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


register(OpSpec(
    name=OP,
    summary="Context Clusters cluster block (proposal, cosine sim, argmax, aggregate, dispatch)",
    issue="issue 5",
    shape_keys=SHAPE_KEYS,
    presets=PRESETS,
    label=label,
    impls=[
        Impl("fastseg", _prep(True), fastseg=True, description="fastseg.nn.ContextCluster"),
        Impl("eager", _prep(False), description="reference Cluster eager"),
        Impl("compile", _prep(False, True), gpu_only=True, description="torch.compile(reference Cluster)"),
    ],
))
