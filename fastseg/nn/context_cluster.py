"""Drop-in replacement for Context Clusters' ``Cluster`` token mixer, running the fused Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.context_cluster import context_cluster_packed

__all__ = ["ContextCluster"]


class ContextCluster(nn.Module):
    """Same constructor, attributes and state_dict as the original ``Cluster`` (``f``, ``v``, ``proj``,
    ``sim_alpha``, ``sim_beta``). Input [b, dim, w, h] -> [b, out_dim, w, h] (or [b, out_dim,
    fold_w*proposal_w, fold_h*proposal_h] with ``return_center``, folds applying only when both are > 1).

    ``f`` and ``v`` run as one 1x1 convolution (their weights concatenated, so the input is read once and the
    packed gradient flows back through one convolution); everything between it and ``proj`` is
    :func:`fastseg.ops.context_cluster_packed`.
    """

    def __init__(self, dim, out_dim, proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24,
                 return_center=False):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # for similarity
        self.proj = nn.Conv2d(heads * head_dim, out_dim, kernel_size=1)  # for projecting channel number
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # for value
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.centers_proposal = nn.AdaptiveAvgPool2d((proposal_w, proposal_h))  # no parameters; kept for parity
        self.proposal_w = proposal_w
        self.proposal_h = proposal_h
        self.fold_w = fold_w
        self.fold_h = fold_h
        self.return_center = return_center

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
