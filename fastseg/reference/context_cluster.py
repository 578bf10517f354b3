"""Plain PyTorch copy of Context Clusters' ``Cluster`` token mixer (Ma et al., "Image as Set of Points", ICLR'23).

Faithful to ``ma-xu/Context-Cluster`` ``models/context_cluster.py`` (same constructor, parameters, state_dict
keys and math), with the einops rearranges written as reshapes/permutes. Readable on purpose: it builds the
(b, M, N) similarity, the one-hot mask and the (b, M, N, c) broadcast products, as the original does.

Naming follows the original: a feature map is ``[b, c, w, h]`` (dim 2 is called ``w``), ``fold_w`` /
``proposal_w`` act on dim 2 and ``fold_h`` / ``proposal_h`` on dim 3.

Normaliser of the aggregate step (``normalizer``): the official code divides the aggregated center by
``sim.sum + 1`` since its commit 3ccb0b6 of 2023-05-31 ("fix bug mask.sum to sim.sum", the paper's Eq. 1;
the released checkpoints were retrained after it), where ``sim`` is the similarity already multiplied by the
one-hot mask, i.e. the sum of the sigmoid similarities of the points assigned to the center. That is the
default, ``normalizer="sim"``. ``normalizer="mask"`` is the code before that commit (``mask.sum + 1``, the
cluster size + 1), for checkpoints trained with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Cluster", "pairwise_cos_sim", "cluster_core", "fold_regions", "unfold_regions", "NORMALIZERS",
           "check_normalizer"]

#: values of ``normalizer``: "sim" (official code since 2023-05-31, default), "mask" (before it)
NORMALIZERS = ("sim", "mask")


def check_normalizer(normalizer) -> str:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS} ('sim': the official code since 2023-05-31, "
                         f"'mask': before it), got {normalizer!r}")
    return normalizer


def pairwise_cos_sim(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix. x1: [B, ..., M, D], x2: [B, ..., N, D] -> [B, ..., M, N]."""
    x1 = F.normalize(x1, dim=-1)
    x2 = F.normalize(x2, dim=-1)
    return torch.matmul(x1, x2.transpose(-2, -1))


def fold_regions(t: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """``b c (f1 w) (f2 h) -> (b f1 f2) c w h``."""
    b, c, W, H = t.shape
    w, h = W // fold_w, H // fold_h
    t = t.reshape(b, c, fold_w, w, fold_h, h).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b * fold_w * fold_h, c, w, h)


def unfold_regions(t: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """``(b f1 f2) c w h -> b c (f1 w) (f2 h)``."""
    bf, c, w, h = t.shape
    b = bf // (fold_w * fold_h)
    t = t.reshape(b, fold_w, fold_h, c, w, h).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, c, fold_w * w, fold_h * h)


def cluster_core(
    x: torch.Tensor,
    value: torch.Tensor,
    sim_alpha: torch.Tensor,
    sim_beta: torch.Tensor,
    heads: int,
    fold_w: int,
    fold_h: int,
    proposal_w: int,
    proposal_h: int,
    return_center: bool = False,
    normalizer: str = "sim",
) -> torch.Tensor:
    """Everything of ``Cluster.forward`` between the input convs (f, v) and the output conv (proj).

    x, value: [B, heads*head_dim, W, H] (outputs of ``f`` and ``v``); sim_alpha, sim_beta: shape [1].
    Returns [B, heads*head_dim, W, H] (or [B, heads*head_dim, fold_w*proposal_w, fold_h*proposal_h] with
    ``return_center``), in the dtype type promotion gives (as the original). ``normalizer``: "sim" (default,
    the official code) or "mask" (the official code before 2023-05-31), see the module docstring.
    """
    check_normalizer(normalizer)
    B, EC, W0, H0 = x.shape
    # "b (e c) w h -> (b e) c w h"
    x = x.reshape(B * heads, EC // heads, W0, H0)
    value = value.reshape(B * heads, EC // heads, W0, H0)
    fold = fold_w > 1 and fold_h > 1
    if fold:
        # split the big feature maps to small local regions to reduce computations.
        b0, c0, w0, h0 = x.shape
        assert w0 % fold_w == 0 and h0 % fold_h == 0, \
            f"Ensure the feature map size ({w0}*{h0}) can be divided by fold {fold_w}*{fold_h}"
        x = fold_regions(x, fold_w, fold_h)
        value = fold_regions(value, fold_w, fold_h)
    b, c, w, h = x.shape
    # centers_proposal = nn.AdaptiveAvgPool2d((proposal_w, proposal_h)) in the original
    centers = F.adaptive_avg_pool2d(x, (proposal_w, proposal_h))  # [b, c, C_W, C_H]; M = C_W*C_H, N = w*h
    value_centers = F.adaptive_avg_pool2d(value, (proposal_w, proposal_h)).flatten(2).transpose(1, 2)
    b, c, ww, hh = centers.shape
    sim = torch.sigmoid(
        sim_beta
        + sim_alpha * pairwise_cos_sim(
            centers.reshape(b, c, -1).permute(0, 2, 1),
            x.reshape(b, c, -1).permute(0, 2, 1),
        )
    )  # [b, M, N]
    # hard assignment of each point to one center
    sim_max, sim_max_idx = sim.max(dim=1, keepdim=True)
    mask = torch.zeros_like(sim)  # binary [b, M, N]
    mask.scatter_(1, sim_max_idx, 1.0)
    sim = sim * mask
    value2 = value.flatten(2).transpose(1, 2)  # "b c w h -> b (w h) c", [b, N, c]
    # aggregate step, [b, M, c]: divided by sim.sum + 1 (sim of the assigned points only: sim is masked here),
    # or by mask.sum + 1 (the cluster size) in the code before 2023-05-31
    norm = sim if normalizer == "sim" else mask
    out = ((value2.unsqueeze(dim=1) * sim.unsqueeze(dim=-1)).sum(dim=2) + value_centers) / (
        norm.sum(dim=-1, keepdim=True) + 1.0
    )
    if return_center:
        out = out.transpose(1, 2).reshape(b, c, ww, hh)  # "b (w h) c -> b c w h"
    else:
        # dispatch step: back to each point of a cluster, [b, N, c]
        out = (out.unsqueeze(dim=2) * sim.unsqueeze(dim=-1)).sum(dim=1)
        out = out.transpose(1, 2).reshape(b, c, w, h)
    if fold:
        out = unfold_regions(out, fold_w, fold_h)
    # "(b e) c w h -> b (e c) w h"
    return out.reshape(B, heads * c, out.shape[-2], out.shape[-1])


class Cluster(nn.Module):
    """The original Context Cluster token mixer. Input [b, dim, w, h] -> [b, out_dim, w, h].

    Parameters / state_dict: ``f``, ``v`` (1x1 convs dim -> heads*head_dim), ``proj`` (1x1 conv
    heads*head_dim -> out_dim), ``sim_alpha`` (init 1), ``sim_beta`` (init 0). Folding into
    ``fold_w x fold_h`` regions happens only when both are > 1 (as in the original). ``normalizer``: "sim"
    (default: the official code) or "mask" (the official code before 2023-05-31, for checkpoints trained with
    it); it is no parameter, so a state_dict loads either way.
    """

    def __init__(self, dim, out_dim, proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24,
                 return_center=False, normalizer="sim"):
        super().__init__()
        self.normalizer = check_normalizer(normalizer)
        self.heads = heads
        self.head_dim = head_dim
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # for similarity
        self.proj = nn.Conv2d(heads * head_dim, out_dim, kernel_size=1)  # for projecting channel number
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # for value
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.centers_proposal = nn.AdaptiveAvgPool2d((proposal_w, proposal_h))
        self.proposal_w = proposal_w
        self.proposal_h = proposal_h
        self.fold_w = fold_w
        self.fold_h = fold_h
        self.return_center = return_center

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, c, w, h]
        value = self.v(x)
        x = self.f(x)
        out = cluster_core(x, value, self.sim_alpha, self.sim_beta, self.heads, self.fold_w, self.fold_h,
                           self.proposal_w, self.proposal_h, self.return_center, self.normalizer)
        return self.proj(out)
