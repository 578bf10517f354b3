"""MaskFormer's matcher mask costs in one pass: the (Q, T) sigmoid-focal and dice cost matrices of one image.

``matcher_mask_costs(logits, target)``: logits (Q, h, w) (the stride-4 predictions), target (T, H, W) binary
masks (float, uint8 or bool) at any resolution. As facebookresearch/MaskFormer's ``HungarianMatcher``:
the target is zero-padded to ``padded_size`` (the batch's (H_max, W_max); default its own size), resized to
(h, w) with ``F.interpolate(mode="nearest")``, and

    focal[q, t] = mean_p α(1−σ)²·BCE(x, 1)·t + (1−α)σ²·BCE(x, 0)·(1 − t)       (α = 0.25, γ = 2)
    dice[q, t]  = 1 − (2·σ·tᵀ + 1) / (Σσ + Σt + 1),  σ = sigmoid(x).

``matcher_mask_costs_from_embeddings(embeds, features, target)`` takes the mask embeddings (Q, C) and mask
features (C, h, w) instead (logits = embeds @ features, formed tile by tile: no (Q, h, w) tensor at all).
``matcher_mask_costs_batch(targets, logits=(B, Q, h, w) | embeds=(B, Q, C), features=(B, C, h, w))``: every
image of a batch (per-image targets of different T and size) in one launch of each kernel.

Returns (focal, dice) (a list of them for the batch), each (Q, T), float32 (float64 for float64 inputs). No
autograd: the matcher runs under ``no_grad``. Triton (one cost kernel + one finalize launch) on CUDA and under
``TRITON_INTERPRET=1``; on CPU otherwise a plain PyTorch path (which materialises the resized target and the
(Q, h·w) focal terms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend

__all__ = ["matcher_mask_costs", "matcher_mask_costs_from_embeddings", "matcher_mask_costs_batch"]

_OP = "matcher_mask_costs"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_targets(targets, batch):
    if not isinstance(targets, (list, tuple)) or len(targets) != batch:
        raise ValueError(f"{_OP}: expected a list of {batch} target tensors, got "
                         f"{len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__}")
    for t in targets:
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{_OP}: each target must be (T, H, W), got {tuple(getattr(t, 'shape', ()))}")
        if t.is_complex():
            raise TypeError(f"{_OP}: targets must be real (float, integer or bool), got {t.dtype}")


def _padded(targets, padded_size):
    H = max(t.shape[1] for t in targets)
    W = max(t.shape[2] for t in targets)
    if padded_size is None:
        return H, W
    Hp, Wp = (int(s) for s in padded_size)
    if Hp < H or Wp < W:
        raise ValueError(f"{_OP}: padded_size {tuple(padded_size)} must be at least the targets' size {(H, W)}")
    return Hp, Wp


def _check_float(name, t, dim):
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        raise ValueError(f"{_OP}: {name} must be a {dim}-d tensor, got {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{_OP}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _torch_costs(x, target, Hp, Wp, alpha):
    """Plain PyTorch: x (Q, h, w) logits in the accumulation dtype."""
    Q, h, w = x.shape
    H, W = target.shape[1:]
    tgt = F.pad(target.to(x.dtype), (0, Wp - W, 0, Hp - H))  # the zero padding to the batch's size
    tgt = F.interpolate(tgt[:, None], size=(h, w), mode="nearest")[:, 0].flatten(1)
    x = x.flatten(1)
    prob = x.sigmoid()
    pos = alpha * (1 - prob) ** 2 * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = (1 - alpha) * prob ** 2 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    focal = (pos @ tgt.T + neg @ (1 - tgt).T) / (h * w)
    dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
    return focal, dice


def _run(targets, padded_size, alpha, logits=None, embeds=None, features=None):
    ref = logits if logits is not None else features
    B = ref.shape[0]
    _check_targets(targets, B)
    Hp, Wp = _padded(targets, padded_size)
    device = _backend.check_same_device(_OP, logits=logits, embeds=embeds, features=features)
    for t in targets:
        if t.device != device:
            raise ValueError(f"{_OP}: targets must be on the predictions' device {device}, got {t.device}")
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    Q = logits.shape[1] if logits is not None else embeds.shape[1]
    h, w = ref.shape[-2:]
    if h * w == 0:
        raise ValueError(f"{_OP}: the predictions have no pixels ({h}x{w})")
    if Q == 0 or all(t.shape[0] == 0 for t in targets):
        return [(torch.zeros(Q, t.shape[0], dtype=acc, device=device),
                 torch.zeros(Q, t.shape[0], dtype=acc, device=device)) for t in targets]
    if _backend.select(_OP, device) == "torch":
        out = []
        for b, t in enumerate(targets):
            x = logits[b].to(acc) if logits is not None else \
                torch.einsum("qc,chw->qhw", embeds[b].to(acc), features[b].to(acc))
            out.append(_torch_costs(x, t, Hp, Wp, float(alpha)))
        return out
    if ref.dtype == torch.float64 and device.type == "cuda":
        raise TypeError(f"{_OP}: float64 runs only under the Triton interpreter; use fp32/fp16/bf16 on CUDA")
    from ..kernels import mask_cost as K

    targets = [t.view(torch.uint8) if t.dtype == torch.bool else t for t in targets]
    if len({t.dtype for t in targets}) > 1:  # the kernel reads one target dtype
        targets = [t.float() for t in targets]
    return K.mask_costs(targets, (Hp, Wp), logits=logits, embeds=embeds, features=features, alpha=float(alpha))


@torch.no_grad()
def matcher_mask_costs(logits: torch.Tensor, target: torch.Tensor, padded_size: tuple[int, int] | None = None,
                       alpha: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice) (Q, T) costs of logits (Q, h, w) against target (T, H, W); see the module docstring."""
    _check_float("logits", logits, 3)
    return _run([target], padded_size, alpha, logits=logits[None])[0]


@torch.no_grad()
def matcher_mask_costs_from_embeddings(embeds: torch.Tensor, features: torch.Tensor, target: torch.Tensor,
                                       padded_size: tuple[int, int] | None = None,
                                       alpha: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice) (Q, T) costs of logits embeds (Q, C) @ features (C, h, w) against target (T, H, W)."""
    _check_float("embeds", embeds, 2)
    _check_float("features", features, 3)
    return matcher_mask_costs_batch([target], embeds=embeds[None], features=features[None],
                                    padded_size=padded_size, alpha=alpha)[0]


@torch.no_grad()
def matcher_mask_costs_batch(targets: list[torch.Tensor], *, logits: torch.Tensor | None = None,
                             embeds: torch.Tensor | None = None, features: torch.Tensor | None = None,
                             padded_size: tuple[int, int] | None = None,
                             alpha: float = 0.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(focal, dice)] per image for a batch in one launch of each kernel: logits (B, Q, h, w), or embeds
    (B, Q, C) + features (B, C, h, w); targets: B tensors (T_b, H_b, W_b); padded_size default: the targets'
    (max H, max W), as the official matcher pads."""
    if (logits is None) == (embeds is None or features is None) or (logits is not None and embeds is not None):
        raise ValueError(f"{_OP}: give logits, or embeds and features")
    if logits is not None:
        _check_float("logits", logits, 4)
        return _run(targets, padded_size, alpha, logits=logits)
    _check_float("embeds", embeds, 3)
    _check_float("features", features, 4)
    if embeds.dtype != features.dtype:
        raise TypeError(f"{_OP}: embeds ({embeds.dtype}) and features ({features.dtype}) must share a dtype")
    if embeds.shape[0] != features.shape[0] or embeds.shape[2] != features.shape[1]:
        raise ValueError(f"{_OP}: embeds (B, Q, C={embeds.shape[2]}) and features (B, C={features.shape[1]}, h, w) "
                         "must have the same B and C")
    return _run(targets, padded_size, alpha, embeds=embeds, features=features)
