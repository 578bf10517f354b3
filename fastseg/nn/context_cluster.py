"""Drop-in replacement for Context Clusters' ``Cluster`` token mixer, running the fused Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.context_cluster import context_cluster_packed
from ..reference.context_cluster import Cluster

__all__ = ["ContextCluster"]


class ContextCluster(Cluster):
    """The original ``Cluster``, subclassed: same constructor, attributes and state_dict (``f``, ``v``, ``proj``,
    ``sim_alpha``, ``sim_beta``). Input [b, dim, w, h] -> [b, out_dim, w, h] (or [b, out_dim,
    fold_w*proposal_w, fold_h*proposal_h] with ``return_center``, folds applying only when both are > 1).

    ``f`` and ``v`` run as one 1x1 convolution (their weights concatenated, so the input is read once and the
    packed gradient flows back through one convolution); everything between it and ``proj`` is
    :func:`fastseg.ops.context_cluster_packed`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.f.weight, self.v.weight])
        bias = None if self.f.bias is None else torch.cat([self.f.bias, self.v.bias])
        xv = F.conv2d(x, weight, bias)
        out = context_cluster_packed(xv, self.sim_alpha, self.sim_beta, self.heads, self.fold_w, self.fold_h,
                              self.proposal_w, self.proposal_h, self.return_center)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, fold=({self.fold_w}, {self.fold_h}), "
                f"proposal=({self.proposal_w}, {self.proposal_h}), return_center={self.return_center}")
