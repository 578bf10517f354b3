"""Drop-in replacement for Context Clusters' ``Cluster`` token mixer, running the fused Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.context_cluster import context_cluster_packed
from ..reference.context_cluster import Cluster

__all__ = ["ContextCluster"]


class ContextCluster(Cluster):
    """The original ``Cluster``, subclassed: same constructor, attributes and state_dict (``f``, ``v``, ``proj``,
    ``sim_alpha``, ``sim_beta``). Input [b, dim, w, h] -> [b, out_dim, w, h] (or [b, out_dim,
    fold_w*proposal_w, fold_h*proposal_h] with ``return_center``, folds applying only when both are > 1).
    ``normalizer``: "sim" (default, the official code since 2023-05-31) or "mask" (before it, for checkpoints
    trained with it); see :mod:`fastseg.reference.context_cluster`.

    ``f`` and ``v`` run as one 1x1 convolution (their weights concatenated, so the input is read once and the
    packed gradient flows back through one convolution); everything between it and ``proj`` is
    :func:`fastseg.ops.context_cluster_packed`.
    """

    @classmethod
    def from_module(cls, m: nn.Module) -> "ContextCluster":
        """A ContextCluster computing what the Cluster-like module ``m`` computes: its sizes (the proposal size
        from ``m.centers_proposal``), its ``normalizer`` (a module without one, e.g. the official ``Cluster``,
        is the current official math: "sim"), weights, device, dtype, requires_grad flags and train/eval mode."""
        size = m.centers_proposal.output_size
        pw, ph = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        new = cls(m.f.in_channels, m.proj.out_channels, proposal_w=pw, proposal_h=ph, fold_w=m.fold_w,
                  fold_h=m.fold_h, heads=m.heads, head_dim=m.head_dim,
                  return_center=getattr(m, "return_center", False), normalizer=getattr(m, "normalizer", "sim"))
        ref = next(m.parameters(), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(m.state_dict(), strict=True)
        flags = dict(m.named_parameters())
        for n, p in new.named_parameters():
            p.requires_grad_(flags[n].requires_grad)
        return new.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.f.weight, self.v.weight])
        bias = None if self.f.bias is None else torch.cat([self.f.bias, self.v.bias])
        xv = F.conv2d(x, weight, bias)
        out = context_cluster_packed(xv, self.sim_alpha, self.sim_beta, self.heads, self.fold_w, self.fold_h,
                                     self.proposal_w, self.proposal_h, self.return_center, self.normalizer)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, fold=({self.fold_w}, {self.fold_h}), "
                f"proposal=({self.proposal_w}, {self.proposal_h}), return_center={self.return_center}, "
                f"normalizer={self.normalizer!r}")
