"""Record of Context Clusters' aggregate/dispatch token mixer: ``fastseg.nn.ContextCluster``."""
from __future__ import annotations

import torch
from torch import nn

from .fused_op import FusedOp, Probe, finish, randn

__all__ = ["RECORD"]


def _is_context_cluster(parent: nn.Module, name: str, m: nn.Module) -> bool:
    """Context Clusters' ``Cluster``: convs ``f``, ``v``, ``proj``, parameters ``sim_alpha``, ``sim_beta``,
    pooling ``centers_proposal`` and the ``heads`` / ``head_dim`` / ``fold_w`` / ``fold_h`` attributes."""
    ok = all(isinstance(getattr(m, n, None), nn.Conv2d) for n in ("f", "v", "proj"))
    ok = ok and all(isinstance(getattr(m, n, None), nn.Parameter) for n in ("sim_alpha", "sim_beta"))
    ok = ok and isinstance(getattr(m, "centers_proposal", None), nn.AdaptiveAvgPool2d)
    return ok and all(hasattr(m, a) for a in ("heads", "head_dim", "fold_w", "fold_h"))


def _proposal(m: nn.Module) -> tuple[int, int]:
    size = m.centers_proposal.output_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _build(cls, m: nn.Module) -> nn.Module:
    if hasattr(cls, "from_module"):
        return cls.from_module(m)
    pw, ph = _proposal(m)
    new = cls(m.f.in_channels, m.proj.out_channels, proposal_w=pw, proposal_h=ph, fold_w=m.fold_w,
              fold_h=m.fold_h, heads=m.heads, head_dim=m.head_dim, return_center=getattr(m, "return_center", False))
    return finish(new, m)


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    """One image, the module's channels; each (fold) region (proposal_w + 1) x (proposal_h + 2) points, so the
    centre pooling averages unequal windows and the two spatial dims differ."""
    pw, ph = _proposal(m)
    fold = m.fold_w > 1 and m.fold_h > 1
    fw, fh = (m.fold_w, m.fold_h) if fold else (1, 1)
    x = randn((1, m.f.in_channels, fw * (pw + 1), fh * (ph + 2)), g, device, dtype)
    return [Probe(f"x {tuple(x.shape)}", (x,), lambda mod, x: mod(x))]


def _check(device, dtype):
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    cls = require("fastseg.nn", "ContextCluster", "the fused context cluster lands with issue 5")
    ref_cls = require("fastseg.reference", "Cluster", "the Context Cluster reference lands with issue 5")
    args = dict(dim=16, out_dim=16, proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=2, head_dim=8)
    torch.manual_seed(0)
    ref = ref_cls(**args)
    fused = cls(**args)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


RECORD = FusedOp(
    name="context_cluster",
    summary="Context Clusters' aggregate/dispatch token mixer (Cluster)",
    nn_class="ContextCluster",
    matches=_is_context_cluster,
    build=_build,
    probe=_probe,
    check=_check,
    bench=("context-cluster", "coc"),
)
