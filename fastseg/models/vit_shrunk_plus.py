"""SegViTv2's Shrunk++ encoder: edge-aware query-based down-sampling (EQD) and query-based up-sampling (QU).

SegViTv2 (Zhang et al., arXiv 2306.06289, IJCV 2023) has **no released code** (zbwxp/SegVit's README: "we are
refactoring code for release"), so this is written from the paper's description, and the full text could not
be re-read while writing it: nothing here quotes the paper's equations, and every concrete choice below is
ours. What the paper describes, and this follows:

* Shrunk++ = the Shrunk encoder (:class:`fastseg.models.vit.ViTShrink`: query-based down-sampling, QD — the
  attention queries are a nearest 2x down-sampled subset of the tokens, keys / values all tokens) made
  *edge-aware*: a light edge branch predicts which tokens lie on object boundaries, and those tokens are kept
  as extra queries next to the down-sampled grid, so that boundary detail survives the down-sampling (EQD);
* a query-based up-sampling (QU) step brings the low-resolution tokens back to the full (1/16) token grid: the
  full-resolution tokens are the queries, the low-resolution tokens keys / values;
* the edge branch is supervised with edge maps derived from the segmentation labels (binary cross-entropy).

Our choices (not from released code):

* edge branch: ``edge_head = Linear(C, C) -> GELU -> Linear(C, 1)`` on the input tokens of layer
  ``shrink_idx`` (after nothing else), one logit per token (B, N);
* EQD queries: the every-second-row-and-column grid (as QD, any h, w) plus the ``k = round(edge_ratio * N)``
  other tokens with the highest edge logits (``edge_ratio`` 0.1 by default; a fixed ``k`` keeps the batch
  rectangular; top-k is not differentiable, the edge branch learns from its own loss only);
* QU: one more encoder layer in cross mode (:class:`~fastseg.models.vit.TransformerEncoderLayer`
  ``shrink=True``: pre-norm attention + FFN, residual on the queries), queries = the tokens entering layer
  ``shrink_idx`` (full grid), keys / values = the last layer's tokens; the output is the last stage, at 1/16;
* edge targets (:func:`edge_targets`): a pixel is an edge where its label differs from its right or lower
  neighbour (pixels with ``ignore_index`` never count), a token is an edge if any pixel of its patch is;
  the loss (:func:`edge_loss`) is BCE with logits, mean over tokens, weight 1 in
  :class:`fastseg.models.segvit.SegViT`.

SegViTv2's continual-learning recipe (frozen old-class queries, new class queries / heads per step) is out of
scope here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import TransformerEncoderLayer, VisionTransformer

__all__ = ["ViTShrunkPlus", "EdgeAwareQueryDownsample", "edge_targets", "edge_loss"]


class EdgeAwareQueryDownsample(nn.Module):
    """EQD query selection. ``forward(x, hw_shape)``: x (B, N, C) tokens of an (h, w) grid ->
    ``(queries (B, Nd + k, C), index (B, Nd + k) int64 token ids, edge_logits (B, N))`` with
    Nd = ceil(h/2) * ceil(w/2) grid tokens first (row-major), then the k highest-edge-logit other tokens."""

    def __init__(self, embed_dims: int, edge_ratio: float = 0.1):
        super().__init__()
        self.edge_ratio = edge_ratio
        self.edge_head = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.GELU(), nn.Linear(embed_dims, 1))

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]):
        B, N, C = x.shape
        h, w = hw_shape
        if N != h * w:
            raise ValueError(f"EQD needs x without cls token: got {N} tokens for a {h}x{w} grid")
        edge_logits = self.edge_head(x).squeeze(-1)
        ids = torch.arange(N, device=x.device).reshape(h, w)
        grid = ids[::2, ::2].reshape(-1)
        k = min(int(round(self.edge_ratio * N)), N - grid.numel())
        index = grid.expand(B, -1)
        if k > 0:
            scores = edge_logits.detach().clone()
            scores[:, grid] = float("-inf")
            index = torch.cat([index, scores.topk(k, dim=1).indices], dim=1)
        queries = torch.gather(x, 1, index[..., None].expand(-1, -1, C))
        return queries, index, edge_logits


class ViTShrunkPlus(VisionTransformer):
    """Shrunk++ ViT (see the module docstring for what is the paper's and what is ours).

    Layers ``< shrink_idx`` run on the full (h, w) token grid, layer ``shrink_idx`` is the EQD layer (EQD queries,
    all tokens as keys / values), later layers run on the ~N/4 + k kept tokens, and ``qu`` up-samples the last
    layer's tokens back to the full grid. ``forward(img)`` -> tuple of (B, C, h, w) maps for ``out_indices``,
    which may name layers before ``shrink_idx`` and the last layer (the QU output); the edge logits (B, h*w) of
    the last call are in ``self.edge_logits`` (for :func:`edge_loss`). Needs ``with_cls_token=False``.
    """

    def __init__(self, shrink_idx: int = 8, edge_ratio: float = 0.1, img_size=224, **kwargs):
        kwargs.setdefault("with_cls_token", False)
        super().__init__(img_size=img_size, **kwargs)
        if self.with_cls_token:
            raise ValueError("ViTShrunkPlus needs with_cls_token=False")
        n = len(self.layers)
        if not 0 < shrink_idx < n:
            raise ValueError(f"shrink_idx must be in [1, {n - 1}], got {shrink_idx}")
        bad = [i for i in self.out_indices if shrink_idx <= i < n - 1]
        if bad:
            raise ValueError(f"out_indices {bad}: Shrunk++ outputs layers before shrink_idx={shrink_idx} "
                             f"and the last layer (up-sampled by QU) only")
        self.shrink_idx = shrink_idx
        ref = self.layers[0]
        self.eqd = EdgeAwareQueryDownsample(self.embed_dims, edge_ratio)
        self.qu = TransformerEncoderLayer(self.embed_dims, ref.attn.num_heads,
                                          ref.ffn.layers[0][0].out_features, qkv_bias=ref.attn.attn.in_proj_bias
                                          is not None, norm_eps=ref.ln1.eps)
        self.edge_logits = None

    def forward(self, img: torch.Tensor):
        x, hw_shape = self.embed(img)
        outs = []
        full = None
        for i, layer in enumerate(self.layers):
            if i == self.shrink_idx:
                full = x
                queries, _, self.edge_logits = self.eqd(x, hw_shape)
                x = layer((queries, x), shrink=True)
            else:
                x = layer(x)
            if i == len(self.layers) - 1:
                if self.final_norm:
                    x = self.ln1(x)
                x = self.qu((full, x), shrink=True)
            if i in self.out_indices:
                outs.append(self._output(x, hw_shape))
        return tuple(outs)


def edge_targets(label: torch.Tensor, patch_size: int, ignore_index: int = 255) -> torch.Tensor:
    """label (B, H, W) int -> (B, ceil(H/p) * ceil(W/p)) float {0, 1} token edge targets (our definition, see
    the module docstring; the label is padded bottom / right like the image's patch embedding)."""
    lab = label
    valid = lab != ignore_index
    edge = torch.zeros_like(lab, dtype=torch.bool)
    dx = (lab[:, :, 1:] != lab[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    dy = (lab[:, 1:, :] != lab[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    edge[:, :, :-1] |= dx
    edge[:, :, 1:] |= dx
    edge[:, :-1, :] |= dy
    edge[:, 1:, :] |= dy
    H, W = lab.shape[-2:]
    e = F.pad(edge[:, None].float(), [0, (-W) % patch_size, 0, (-H) % patch_size])
    return F.max_pool2d(e, patch_size).flatten(1)


def edge_loss(edge_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over tokens: (B, N), (B, N) -> scalar."""
    return F.binary_cross_entropy_with_logits(edge_logits, targets.to(edge_logits))
