"""The memory-lean ("fused") path of Mask2Former's mask head, in plain PyTorch.

Mask logits are ``x = e · F`` (query embedding e: (Q, C), mask features F: (C, H/4, W/4)). Everything the
model needs from them is linear in F until the sigmoid, so it never forms (Q, H/4, W/4) logits:

* attention masks: ``resize(e·F) = e·resize(F)``; F is resized once per attention level
  (:func:`resize_mask_features`) and the mask is the sign of ``e · F_level`` (:func:`level_allowed`);
* matcher: ``sample(e·F, p) = e·sample(F, p)`` at the points shared by all queries (:func:`shared_point_logits`:
  F sampled once, one GEMM); losses and uncertainty sampling: each matched mask has its own points, so
  :func:`point_logits` forms the logit maps of a chunk of matched masks only (never all Q), samples them and
  recomputes the chunk in backward, so it holds O(chunk) memory;
* inference: bilinear upsampling is separable and linear, so logits are produced one tile of output rows at
  a time (:func:`iter_upsampled_logits`).

Floating-point ties (where a bit can differ from the reference path, which rounds differently):

* attention mask: the reference masks where ``sigmoid(x) < 0.5`` with x = resize(e·F); this path masks where
  ``x < 0`` with x = e·resize(F). The two x differ by rounding (~1 ulp of the dot product), so a bit can flip
  when |x| is at rounding level; and in float32/bf16 ``sigmoid(x)`` rounds to exactly 0.5 for
  |x| ≲ 6e-8 / 4e-3, where the reference allows attention but the sign test masks negative x. NaN logits are
  allowed in both. In float64 with non-degenerate data both agree bit for bit (the tests check it).
* uncertainty sampling picks the top-k of −|x| over random points; near-equal uncertainties can swap.
* inference: the argmax over classes/queries and the ``x > 0`` / ``sigmoid ≥ 0.5`` instance/panoptic
  thresholds see the same rounding-level differences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .common import point_sample

__all__ = [
    "resize_mask_features", "level_allowed", "point_logits", "shared_point_logits", "iter_upsampled_logits",
    "linear_indices", "resample_matrices", "iter_resampled_logits",
]

_CHUNK_ELEMS = 1 << 24  # default working-set bound (elements) of the chunked ops


def resize_mask_features(mask_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w): bilinear, align_corners=False (as the reference resizes logits)."""
    return F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def level_allowed(embeds: torch.Tensor, level_features: torch.Tensor) -> torch.Tensor:
    """Attention mask of one level as bool (B, Q, h·w), True = may attend (SDPA convention).

    embeds: (B, Q, C); level_features: (B, C, h, w) from :func:`resize_mask_features`. A key is masked
    where ``e · F_level < 0`` (the reference's ``sigmoid < 0.5``); a query with every key masked attends
    everywhere (the official reset).
    """
    logits = torch.bmm(embeds.detach(), level_features.flatten(2))
    allowed = ~(logits < 0)
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | empty


def _chunk_logits(e: torch.Tensor, feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """e: (n, C); feat: (1, C, h, w); coords: (n, P, 2) -> (n, P) = point_sample(e·F, coords).

    The chunk's n logit maps (n, h, w) are one GEMM, then each is sampled on one channel: 4 reads per point
    instead of 4·C when F itself is sampled (e · point_sample(F) is the same number in exact arithmetic, and
    costs C times more gathers for the ~37k points of the uncertainty sampling)."""
    maps = torch.einsum("nc,chw->nhw", e, feat[0])
    return point_sample(maps[:, None], coords, align_corners=False)[:, 0]


def point_logits(embeds: torch.Tensor, features: torch.Tensor, batch_idx: torch.Tensor, coords: torch.Tensor,
                 chunk_elems: int = _CHUNK_ELEMS) -> torch.Tensor:
    """Mask logits at per-mask points without holding the masks: (N, P).

    embeds: (N, C) (one row per mask); features: (B, C, h, w); batch_idx: (N,) image of each mask;
    coords: (N, P, 2) in [0, 1] as (x, y). Equal to ``point_sample((e·F)[:, None], coords)[:, 0]``.
    Only a chunk of masks' logit maps exists at a time, and chunks are recomputed in backward (activation
    checkpointing), so the working set is about ``chunk_elems`` elements (at least one mask's h·w) whatever N;
    nothing of size (N, h, w) or (N, C, P) is kept.
    """
    N, P, _ = coords.shape
    if N == 0:
        return embeds.new_zeros(0, P) + 0 * embeds.sum()
    h, w = features.shape[2:]
    per = max(1, chunk_elems // max(1, h * w + 3 * P))
    order = torch.argsort(batch_idx, stable=True)
    bidx = batch_idx[order].tolist()
    grad = torch.is_grad_enabled() and (embeds.requires_grad or features.requires_grad)
    pieces = []
    start = 0
    while start < N:
        b = bidx[start]
        stop = start
        while stop < N and bidx[stop] == b and stop - start < per:
            stop += 1
        sel = order[start:stop]
        args = (embeds[sel], features[b:b + 1], coords[sel])
        pieces.append(checkpoint(_chunk_logits, *args, use_reentrant=False, preserve_rng_state=False)
                      if grad else _chunk_logits(*args))
        start = stop
    out = torch.cat(pieces, 0)
    return out[torch.argsort(order)]


def shared_point_logits(embeds: torch.Tensor, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Logits of every query at points shared by all queries of one image: (Q, P).

    embeds: (Q, C); features: (C, h, w); coords: (1, P, 2). One sampling of F, then one GEMM.
    """
    sampled = point_sample(features[None], coords, align_corners=False)[0]  # (C, P)
    return embeds @ sampled


def linear_indices(out_len: int, in_len: int, device, dtype):
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis:
    (i0, i1, w0, w1), each (out_len,)."""
    dtype = torch.promote_types(dtype, torch.float32)
    scale = torch.tensor(in_len / out_len, dtype=dtype, device=device)
    dst = torch.arange(out_len, device=device, dtype=dtype)
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_len - 1)
    i1 = torch.where(i0 < in_len - 1, i0 + 1, i0)
    w1 = (src - i0.to(dtype)).clamp(0, 1)
    return i0, i1, 1 - w1, w1


def iter_upsampled_logits(embeds: torch.Tensor, features: torch.Tensor, size: tuple[int, int],
                          tile_rows: int | None = None, chunk_elems: int = _CHUNK_ELEMS):
    """Yield ``(y0, y1, logits)`` with logits (n, y1 − y0, W) = rows y0:y1 of
    ``F.interpolate((e·F)[None], size, bilinear)[0]``; only one tile of rows is ever held.

    embeds: (n, C); features: (C, h, w); size: (H, W).
    """
    H, W = size
    _, h, w = features.shape
    n = embeds.shape[0]
    if tile_rows is None:
        tile_rows = max(1, chunk_elems // max(1, n * W))
    ry0, ry1, wy0, wy1 = linear_indices(H, h, features.device, features.dtype)
    rx0, rx1, wx0, wx1 = linear_indices(W, w, features.device, features.dtype)
    wy0, wy1, wx0, wx1 = (t.to(features.dtype) for t in (wy0, wy1, wx0, wx1))
    for y0 in range(0, H, tile_rows):
        y1 = min(H, y0 + tile_rows)
        lo, hi = int(ry0[y0]), int(ry1[y1 - 1])
        rows = torch.einsum("nc,chw->nhw", embeds, features[:, lo:hi + 1])
        v = rows[:, ry0[y0:y1] - lo] * wy0[y0:y1, None] + rows[:, ry1[y0:y1] - lo] * wy1[y0:y1, None]
        yield y0, y1, v[:, :, rx0] * wx0 + v[:, :, rx1] * wx1


def _axis_matrix(out_len: int, in_len: int, device, dtype) -> torch.Tensor:
    """Dense (out_len, in_len) matrix of PyTorch's bilinear resize (align_corners=False) along one axis."""
    i0, i1, w0, w1 = linear_indices(out_len, in_len, device, dtype)
    m = torch.zeros(out_len, in_len, device=device, dtype=w0.dtype)
    rows = torch.arange(out_len, device=device)
    m.index_put_((rows, i0), w0, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m


def resample_matrices(feature_hw: tuple[int, int], size: tuple[int, int], image_size: tuple[int, int],
                      output_size: tuple[int, int] | None = None, *, device=None, dtype=torch.float32):
    """Per-axis matrices (My (Ho, h), Mx (Wo, w)) of: bilinear upsampling from ``feature_hw`` to the padded
    input ``size``, crop to ``image_size``, bilinear resize to ``output_size`` (detectron2's
    ``sem_seg_postprocess``, which the official Mask2Former applies before panoptic / instance inference).
    Both steps are linear and separable, so ``out = My · (e·F) · Mxᵀ`` equals the two resizes (up to rounding)."""
    (h, w), (H, W), (ih, iw) = feature_hw, size, image_size
    oh, ow = output_size or image_size
    if not (0 < ih <= H and 0 < iw <= W):
        raise ValueError(f"image size {image_size} must fit in the padded input size {size}")
    my = _axis_matrix(oh, ih, device, dtype) @ _axis_matrix(H, h, device, dtype)[:ih]
    mx = _axis_matrix(ow, iw, device, dtype) @ _axis_matrix(W, w, device, dtype)[:iw]
    return my, mx


def iter_resampled_logits(embeds: torch.Tensor, features: torch.Tensor, my: torch.Tensor, mx: torch.Tensor,
                          tile_rows: int | None = None, chunk_elems: int = _CHUNK_ELEMS):
    """Yield ``(y0, y1, logits)``, logits (n, y1 − y0, Wo) = rows y0:y1 of ``My · (e·F) · Mxᵀ`` per query
    (see :func:`resample_matrices`); only one tile of rows is ever held. embeds: (n, C); features: (C, h, w)."""
    n = embeds.shape[0]
    Ho, Wo = my.shape[0], mx.shape[0]
    my, mx = my.to(features.dtype), mx.to(features.dtype)
    if tile_rows is None:
        tile_rows = max(1, chunk_elems // max(1, n * Wo))
    for y0 in range(0, Ho, tile_rows):
        y1 = min(Ho, y0 + tile_rows)
        used = my[y0:y1].ne(0).any(0).nonzero()
        lo, hi = int(used.min()), int(used.max())
        rows = torch.einsum("nc,chw->nhw", embeds, features[:, lo:hi + 1])
        v = torch.einsum("yr,nrw->nyw", my[y0:y1, lo:hi + 1], rows)
        yield y0, y1, torch.einsum("nyw,xw->nyx", v, mx)
