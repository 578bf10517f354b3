"""Semantic, panoptic and instance inference of Mask2Former / MaskFormer, per image.

Reference functions take ``mask_cls`` (Q, K+1) class logits and ``mask_pred`` (Q, H, W) mask logits already
upsampled to the output size, as the official code. The ``*_streaming`` versions take the query embeddings
(Q, C) and mask features (C, h, w) instead and upsample one tile of output rows at a time
(:func:`fastseg.models.fused.iter_upsampled_logits`): they never hold Q × H × W values (only the output,
and per-pixel (H, W) maps for panoptic). See :mod:`fastseg.models.fused` for where rounding can flip a tie.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import iter_resampled_logits, iter_upsampled_logits, resample_matrices

__all__ = [
    "semantic_inference", "panoptic_inference", "instance_inference",
    "semantic_inference_streaming", "panoptic_inference_streaming", "instance_inference_streaming",
]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(Q, K+1), (Q, H, W) -> per-class scores (K, H, W)."""
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", mask_cls, mask_pred.sigmoid())


def semantic_inference_streaming(mask_cls, embeds, features, size, tile_rows=None) -> torch.Tensor:
    """Same result as ``semantic_inference(mask_cls, upsample(embeds·features, size))``: (K, H, W)."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    out = probs.new_empty((probs.shape[1], size[0], size[1]))
    for y0, y1, logits in iter_upsampled_logits(embeds, features, size, tile_rows):
        out[:, y0:y1] = torch.einsum("qc,qhw->chw", probs, logits.sigmoid())
    return out


def _segments(cur_classes, mask_areas, original_areas, masks_fn, panoptic_seg, thing_ids, overlap_threshold):
    """The official segment loop. masks_fn(k) -> bool (H, W) mask of segment candidate k."""
    segments_info = []
    current_segment_id = 0
    stuff_memory_list = {}
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k].item())
        isthing = pred_class in thing_ids
        mask_area = int(mask_areas[k])
        original_area = int(original_areas[k])
        mask = masks_fn(k)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if pred_class in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[pred_class]
                    continue
                stuff_memory_list[pred_class] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": bool(isthing), "category_id": pred_class})
    return panoptic_seg, segments_info


def _keep(mask_cls, num_classes, object_mask_threshold):
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    return scores[keep], labels[keep], keep


def panoptic_inference(mask_cls, mask_pred, num_classes: int, thing_ids=(), object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8):
    """Official panoptic inference. Returns (panoptic_seg (H, W) int32, segments_info list)."""
    cur_scores, cur_classes, keep = _keep(mask_cls, num_classes, object_mask_threshold)
    cur_masks = mask_pred.sigmoid()[keep]
    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    if cur_masks.shape[0] == 0:
        return panoptic_seg, []
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    mask_areas = [(cur_mask_ids == k).sum().item() for k in range(cur_classes.shape[0])]
    original_areas = [(cur_masks[k] >= 0.5).sum().item() for k in range(cur_classes.shape[0])]
    return _segments(cur_classes, mask_areas, original_areas,
                     lambda k: (cur_mask_ids == k) & (cur_masks[k] >= 0.5),
                     panoptic_seg, set(thing_ids), overlap_threshold)


def _tiles(embeds, features, size, tile_rows, post):
    """(output (H, W), iterator of row tiles): upsampled to ``size``, or with ``post = (image_size,
    output_size)`` also cropped and resized as detectron2's ``sem_seg_postprocess``."""
    if post is None:
        return tuple(size), iter_upsampled_logits(embeds, features, size, tile_rows)
    my, mx = resample_matrices(tuple(features.shape[-2:]), size, *post, device=features.device, dtype=features.dtype)
    return (my.shape[0], mx.shape[0]), iter_resampled_logits(embeds, features, my, mx, tile_rows)


def panoptic_inference_streaming(mask_cls, embeds, features, size, num_classes: int, thing_ids=(),
                                 object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                                 tile_rows=None, post=None):
    """Same as :func:`panoptic_inference` on upsampled ``embeds·features``, holding only (H, W) maps:
    the per-pixel argmax query and whether that query's mask is ≥ 0.5 there. ``post``: (image_size,
    output_size) to crop and resize as the official code does before inference."""
    cur_scores, cur_classes, keep = _keep(mask_cls, num_classes, object_mask_threshold)
    (H, W), tiles = _tiles(embeds[keep], features, size, tile_rows, post)
    panoptic_seg = torch.zeros((H, W), dtype=torch.int32, device=features.device)
    n = cur_classes.shape[0]
    if n == 0:
        return panoptic_seg, []
    ids = torch.empty((H, W), dtype=torch.int64, device=features.device)
    ok = torch.empty((H, W), dtype=torch.bool, device=features.device)
    original_areas = torch.zeros(n, dtype=torch.int64, device=features.device)
    for y0, y1, logits in tiles:
        m = logits.sigmoid()
        tile_ids = (cur_scores.view(-1, 1, 1) * m).argmax(0)
        ids[y0:y1] = tile_ids
        ok[y0:y1] = m.gather(0, tile_ids[None])[0] >= 0.5
        original_areas += (m >= 0.5).flatten(1).sum(1)
    mask_areas = torch.bincount(ids.flatten(), minlength=n).tolist()
    return _segments(cur_classes, mask_areas, original_areas.tolist(), lambda k: (ids == k) & ok,
                     panoptic_seg, set(thing_ids), overlap_threshold)


def _topk(mask_cls, num_classes, topk, thing_ids):
    num_queries = mask_cls.shape[0]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(min(topk, scores.numel()), sorted=False)
    labels_per_image = labels[topk_indices]
    query_idx = topk_indices // num_classes
    if thing_ids is not None:  # panoptic_on: only "thing" classes
        keep = torch.tensor([int(lab) in set(thing_ids) for lab in labels_per_image.tolist()],
                            dtype=torch.bool, device=mask_cls.device)
        scores_per_image, labels_per_image, query_idx = scores_per_image[keep], labels_per_image[keep], query_idx[keep]
    return scores_per_image, labels_per_image, query_idx


def instance_inference(mask_cls, mask_pred, num_classes: int, test_topk_per_image: int = 100, thing_ids=None):
    """Official instance inference. Returns {"pred_masks" (k, H, W) float, "scores" (k,), "pred_classes" (k,)}.
    ``thing_ids`` (when panoptic is also on) keeps thing classes only."""
    scores_per_image, labels_per_image, query_idx = _topk(mask_cls, num_classes, test_topk_per_image, thing_ids)
    mask_pred = mask_pred[query_idx]
    pred_masks = (mask_pred > 0).to(mask_pred.dtype)
    mask_scores = (mask_pred.sigmoid().flatten(1) * pred_masks.flatten(1)).sum(1) / (pred_masks.flatten(1).sum(1) + 1e-6)
    return {"pred_masks": pred_masks, "scores": scores_per_image * mask_scores, "pred_classes": labels_per_image}


def instance_inference_streaming(mask_cls, embeds, features, size, num_classes: int, test_topk_per_image: int = 100,
                                 thing_ids=None, tile_rows=None, post=None):
    """Same as :func:`instance_inference`; only the selected queries' masks (the output) are formed.
    ``post``: as in :func:`panoptic_inference_streaming`."""
    scores_per_image, labels_per_image, query_idx = _topk(mask_cls, num_classes, test_topk_per_image, thing_ids)
    k = query_idx.shape[0]
    (H, W), tiles = _tiles(embeds[query_idx], features, size, tile_rows, post)
    pred_masks = features.new_empty((k, H, W))
    num = features.new_zeros(k)
    den = features.new_zeros(k)
    for y0, y1, logits in tiles:
        m = (logits > 0).to(logits.dtype)
        pred_masks[:, y0:y1] = m
        num += (logits.sigmoid() * m).flatten(1).sum(1)
        den += m.flatten(1).sum(1)
    mask_scores = num / (den + 1e-6)
    return {"pred_masks": pred_masks, "scores": scores_per_image * mask_scores, "pred_classes": labels_per_image}
