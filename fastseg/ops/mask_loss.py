"""MaskFormer's full-resolution mask losses (bilinear upsample + sigmoid focal + dice) without (T, H, W) tensors.

The official criterion (facebookresearch/MaskFormer ``mask_former/modeling/criterion.py``) upsamples each
matched stride-4 logit map to the target size (``F.interpolate(bilinear, align_corners=False)``) and returns

    loss_mask = Σ_t mean_pixels(α_t · ce · (1 − p_t)^γ) / num_masks      (α = 0.25, γ = 2)
    loss_dice = Σ_t [1 − (2 Σ σ(z)·y + 1) / (Σ σ(z) + Σ y + 1)] / num_masks

Here one Triton kernel computes the per-pair sums (Σ focal, Σ σ·y, Σ σ, Σ y) tile by tile and one computes
the gradient of the stride-4 logits through the transpose of the bilinear map (deterministic, no atomics);
the (T, H, W) upsampled logits, probabilities and focal terms are never stored.

* :func:`mask_losses` ``(logits (T, h, w), targets (N, H, W), num_masks, target_rows=None)``: from the
  matched logit maps. Saved for backward: logits and targets (inputs).
* :func:`mask_losses_from_embeddings` ``(embeds (T, C), features (B, C, h, w), batch_idx (T,), targets, ...)``
  (or ``batch_idx=None, pairs_per_image=[n_0, ...]``: host counts, no tensor read for the grouping):
  logits ``e_t · F[batch_idx[t]]`` of the matched pairs only, formed per image (one GEMM), used by the
  kernel and dropped; recomputed in backward. Nothing of size (B, Q, h, w) or (T, H, W) exists, and only a
  transient (T, h, w) per call.

targets: bool/uint8 (or float) masks; ``target_rows[t]`` is pair t's row of ``targets`` (default: row t), so
padded (B·T_max, H, W) targets need no gather. Logits fp32/fp16/bf16 (fp64 under the interpreter / on the
PyTorch path); accumulation and the returned losses in fp32 (fp64 for fp64 logits). The formulas are the
reference's for any target value. CPU tensors without ``TRITON_INTERPRET=1`` (or ``use_backend("torch")``)
run the reference formulas in PyTorch (full-resolution tensors, chunked over pairs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend

__all__ = ["mask_losses", "mask_losses_from_embeddings", "mask_loss_sums", "matched_logits"]

_PLAIN_CHUNK = 1 << 24  # pixels per chunk on the PyTorch path


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(batch_idx: torch.Tensor, B: int, device) -> list:
    """[(b, pairs of image b)] for the images that have pairs: a slice when batch_idx is sorted (DETR's
    ``_get_src_permutation_idx`` order: views, no gathers), else positions on ``device``."""
    bi = torch.as_tensor(batch_idx).detach().reshape(-1).cpu().long()
    if bi.numel() and (int(bi.min()) < 0 or int(bi.max()) >= B):
        raise ValueError(f"batch_idx must be in [0, {B}), got values in [{int(bi.min())}, {int(bi.max())}]")
    counts = torch.bincount(bi, minlength=B).tolist()
    if bool((bi[1:] >= bi[:-1]).all()):
        return _count_groups(counts, B, bi.numel())
    order = torch.argsort(bi, stable=True)
    out, start = [], 0
    for b, n in enumerate(counts):
        if n:
            out.append((b, order[start:start + n].to(device)))
        start += n
    return out


def _count_groups(pairs_per_image, B: int, T: int) -> list:
    """[(b, slice of image b's pairs)] from host ints (pairs sorted by image): no tensor is read."""
    counts = [int(n) for n in pairs_per_image]
    if len(counts) != B or any(n < 0 for n in counts) or sum(counts) != T:
        raise ValueError(f"pairs_per_image must be {B} counts >= 0 summing to the {T} pairs, got {counts}")
    out, start = [], 0
    for b, n in enumerate(counts):
        if n:
            out.append((b, slice(start, start + n)))
        start += n
    return out


def _logits(embeds, features, groups):
    """Matched logits in the inputs' dtype (autocast off: forward and backward recompute the same numbers)."""
    T = embeds.shape[0]
    _, C, h, w = features.shape
    out = features.new_empty(T, h, w)
    with torch.autocast(features.device.type, enabled=False):
        for b, sel in groups:
            if isinstance(sel, slice):  # straight into the output rows (no temporary, no copy)
                torch.mm(embeds[sel], features[b].reshape(C, h * w), out=out[sel].view(-1, h * w))
            else:
                out[sel] = (embeds[sel] @ features[b].reshape(C, h * w)).view(-1, h, w)
    return out


def _logits_in_order(embeds, features, groups):
    """Differentiable (T, h, w) logits of pairs grouped by contiguous slices in image order."""
    B, C, h, w = features.shape
    pieces = [(embeds[sel] @ features[b].reshape(C, h * w)).view(-1, h, w) for b, sel in groups]
    if not pieces:
        return features.new_zeros(0, h, w) + 0 * embeds.sum() + 0 * features.sum()
    return torch.cat(pieces)


def matched_logits(embeds: torch.Tensor, features: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
    """(T, h, w) logit maps ``embeds[t] · features[batch_idx[t]]``: one GEMM per image (differentiable)."""
    B, C, h, w = features.shape
    groups = _groups(batch_idx, B, features.device)
    if all(isinstance(sel, slice) for _, sel in groups):  # batch_idx sorted: the pieces are in pair order
        return _logits_in_order(embeds, features, groups)
    pieces = [(sel, (embeds[sel] @ features[b].reshape(C, h * w)).view(-1, h, w)) for b, sel in groups]
    if not pieces:
        return features.new_zeros(0, h, w) + 0 * embeds.sum() + 0 * features.sum()
    sel = torch.cat([s for s, _ in pieces])
    vals = torch.cat([v for _, v in pieces])
    return vals[torch.argsort(sel)]


class _Sums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, rows, alpha, gamma):
        from fastseg.kernels import mask_loss as K

        sums = K.mask_loss_fwd(logits, targets, rows, alpha, gamma)
        ctx.save_for_backward(logits, targets, rows)
        ctx.args = (alpha, gamma)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from fastseg.kernels import mask_loss as K

        logits, targets, rows = ctx.saved_tensors
        g = g[:, :3].to(_acc_dtype(logits.dtype)).contiguous()
        return K.mask_loss_bwd(logits, targets, rows, g, *ctx.args), None, None, None, None


# Eager calls use _Sums; under torch.compile the same kernels are reached through these custom ops (no graph
# break). The from-embeddings variant has none: it groups the pairs by image on the host (batch_idx is read),
# and it runs after the matcher's scipy assignment, itself a graph break.
@torch.library.custom_op("fastseg::mask_loss_sums_fwd", mutates_args=())
def _sums_fwd_op(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, alpha: float,
                 gamma: float) -> torch.Tensor:
    from fastseg.kernels import mask_loss as K

    return K.mask_loss_fwd(logits, targets, rows, alpha, gamma)


@_sums_fwd_op.register_fake
def _(logits, targets, rows, alpha, gamma):
    return logits.new_empty((logits.shape[0], 4), dtype=_acc_dtype(logits.dtype))


@torch.library.custom_op("fastseg::mask_loss_sums_bwd", mutates_args=())
def _sums_bwd_op(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, alpha: float,
                 gamma: float) -> torch.Tensor:
    from fastseg.kernels import mask_loss as K

    return K.mask_loss_bwd(logits, targets, rows, g[:, :3].to(_acc_dtype(logits.dtype)).contiguous(), alpha, gamma)


@_sums_bwd_op.register_fake
def _(logits, targets, rows, g, alpha, gamma):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sums_setup(ctx, inputs, output):
    logits, targets, rows, alpha, gamma = inputs
    ctx.save_for_backward(logits, targets, rows)
    ctx.args = (alpha, gamma)


def _sums_backward(ctx, g):
    logits, targets, rows = ctx.saved_tensors
    return _sums_bwd_op(logits, targets, rows, g, *ctx.args), None, None, None, None


_sums_fwd_op.register_autograd(_sums_backward, setup_context=_sums_setup)


class _SumsFromEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, features, groups, targets, rows, alpha, gamma):
        from fastseg.kernels import mask_loss as K

        logits = _logits(embeds, features, groups)
        sums = K.mask_loss_fwd(logits, targets, rows, alpha, gamma)
        del logits
        ctx.save_for_backward(embeds, features, targets, rows)
        ctx.groups = groups
        ctx.args = (alpha, gamma)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from fastseg.kernels import mask_loss as K

        embeds, features, targets, rows = ctx.saved_tensors
        with torch.no_grad():
            logits = _logits(embeds, features, ctx.groups)
            g = g[:, :3].to(_acc_dtype(logits.dtype)).contiguous()
            dlogits = K.mask_loss_bwd(logits, targets, rows, g, *ctx.args)
            del logits
            B, C, h, w = features.shape
            # the groups partition the pairs: every row of d_embeds is written once
            d_embeds = torch.empty_like(embeds, memory_format=torch.contiguous_format) \
                if ctx.needs_input_grad[0] else None
            d_feat = None
            if ctx.needs_input_grad[1]:  # each image's gradient written once by its GEMM (no zero fill, no copy)
                d_feat = torch.empty(features.shape, dtype=features.dtype, device=features.device)
                with_pairs = {b for b, _ in ctx.groups}
                for b in range(B):
                    if b not in with_pairs:
                        d_feat[b].zero_()
            for b, sel in ctx.groups:
                dl = dlogits[sel].reshape(-1, h * w)
                if d_embeds is not None and isinstance(sel, slice):
                    torch.mm(dl, features[b].reshape(C, h * w).transpose(0, 1), out=d_embeds[sel])
                elif d_embeds is not None:
                    d_embeds[sel] = dl @ features[b].reshape(C, h * w).transpose(0, 1)
                if d_feat is not None:
                    torch.mm(embeds[sel].transpose(0, 1), dl, out=d_feat[b].view(C, h * w))
        return d_embeds, d_feat, None, None, None, None, None


def _check_targets(op, targets, T, target_rows, device):
    if not isinstance(targets, torch.Tensor) or targets.dim() != 3:
        raise ValueError(f"{op}: targets must be (N, H, W), got {tuple(getattr(targets, 'shape', ()))}")
    if targets.is_complex():
        raise TypeError(f"{op}: targets must be bool, integer or float, got {targets.dtype}")
    if targets.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: no gradient flows to the targets; pass targets.detach()")
    if target_rows is None:
        if targets.shape[0] != T:
            raise ValueError(f"{op}: without target_rows, targets needs one mask per pair ({T}), got "
                             f"{targets.shape[0]}")
        rows = torch.arange(T, device=device, dtype=torch.int64)
    else:  # validated where it lives (pass CPU rows to avoid a device sync), then moved
        rows = torch.as_tensor(target_rows).long().reshape(-1)
        if rows.numel() != T:
            raise ValueError(f"{op}: target_rows must have one entry per pair ({T}), got {rows.numel()}")
        rows = rows.to(device)  # no host check of the range (it would wait for the GPU): the kernels make a
    return rows.contiguous()  # row outside [0, N) NaN, the plain path checks CPU rows (_check_rows_host)


def _check_rows_host(op, rows, N):
    """The plain path only, and only CPU rows (free there; on CUDA indexing asserts on the device)."""
    if rows.numel() and rows.device.type == "cpu" and not torch.compiler.is_compiling() \
            and (int(rows.min()) < 0 or int(rows.max()) >= N):
        raise ValueError(f"{op}: target_rows must be in [0, {N})")


def _plain_sums(logits, targets, rows, alpha, gamma):
    """The reference formulas in PyTorch (full-resolution tensors, a chunk of pairs at a time)."""
    acc = _acc_dtype(logits.dtype)
    H, W = targets.shape[1:]
    T = logits.shape[0]
    per = max(1, _PLAIN_CHUNK // max(1, H * W))
    out = []
    for s in range(0, T, per):
        x = F.interpolate(logits[s:s + per, None].to(acc), size=(H, W), mode="bilinear", align_corners=False)
        x = x[:, 0].flatten(1)
        y = targets[rows[s:s + per]].to(acc).flatten(1)
        prob = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = prob * y + (1 - prob) * (1 - y)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
        out.append(torch.stack([loss.sum(1), (prob * y).sum(1), prob.sum(1), y.sum(1)], 1))
    return torch.cat(out) if out else logits.new_zeros(0, 4, dtype=acc) + 0 * logits.sum()


def _reduce(sums, HW, num_masks):
    focal = (sums[:, 0] / HW).sum() / num_masks
    dice = (1 - (2 * sums[:, 1] + 1) / (sums[:, 2] + sums[:, 3] + 1)).sum() / num_masks
    return focal, dice


def _triton_ok(op, x):
    if x.dtype == torch.float64 and x.is_cuda:
        raise TypeError(f"{op}: float64 runs only under the Triton interpreter (or the PyTorch path on CPU); "
                        "use fp32/fp16/bf16 on CUDA")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: unsupported logits dtype {x.dtype}")


def mask_loss_sums(logits: torch.Tensor, targets: torch.Tensor, target_rows=None, alpha: float = 0.25,
                   gamma: float = 2.0) -> torch.Tensor:
    """Per-pair sums (T, 4) = (Σ focal, Σ σ(z)·y, Σ σ(z), Σ y) over the upsampled pixels (differentiable)."""
    op = "mask_loss_sums"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be floating (T, h, w), got {tuple(getattr(logits, 'shape', ()))}")
    device = _backend.check_same_device(op, logits=logits, targets=targets)
    rows = _check_targets(op, targets, logits.shape[0], target_rows, device)
    T, h, w = logits.shape
    H, W = targets.shape[1:]
    if gamma < 0:
        raise ValueError(f"{op}: gamma must be >= 0, got {gamma}")
    if T == 0 or H * W == 0 or h * w == 0 or _backend.select(op, device) == "torch":
        if h * w == 0 and T and H * W:
            raise ValueError(f"{op}: empty logit maps {tuple(logits.shape)} cannot be upsampled to {(H, W)}")
        _check_rows_host(op, rows, targets.shape[0])
        return _plain_sums(logits, targets, rows, alpha, gamma)
    _triton_ok(op, logits)
    if torch.compiler.is_compiling():
        return _sums_fwd_op(logits, targets, rows, float(alpha), float(gamma))
    return _Sums.apply(logits, targets, rows, float(alpha), float(gamma))


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, target_rows=None,
                alpha: float = 0.25, gamma: float = 2.0):
    """(loss_mask, loss_dice): MaskFormer's focal and dice losses of the matched logit maps (T, h, w)
    upsampled to the targets' (H, W) (see the module docstring); scalars in the accumulation dtype."""
    sums = mask_loss_sums(logits, targets, target_rows, alpha, gamma)
    return _reduce(sums, targets.shape[1] * targets.shape[2], num_masks)


def mask_losses_from_embeddings(embeds: torch.Tensor, features: torch.Tensor, batch_idx: torch.Tensor | None,
                                targets: torch.Tensor, num_masks: float, target_rows=None, alpha: float = 0.25,
                                gamma: float = 2.0, *, pairs_per_image=None):
    """Same as ``mask_losses(matched_logits(embeds, features, batch_idx), targets, ...)`` without keeping the
    (T, h, w) logits: embeds (T, C), features (B, C, h, w), batch_idx (T,) image of each pair. Under autocast both
    are cast to the autocast dtype first (as the reference's einsum).

    Grouping the pairs per image (one GEMM each) reads ``batch_idx`` on the host (a CPU tensor, as the Hungarian
    matcher's, is read in place; a CUDA one is copied back: a sync). ``pairs_per_image`` (B host ints, pairs
    sorted by image, as DETR's ``_get_src_permutation_idx`` orders them; with ``batch_idx=None``) groups them
    without reading any tensor: no host-device sync, CUDA-graph friendly. ``target_rows`` outside [0, N) give
    NaN on the Triton path (no host check)."""
    op = "mask_losses_from_embeddings"
    if embeds.dim() != 2 or features.dim() != 4 or embeds.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: embeds (T, C) and features (B, C, h, w) must share C, got "
                         f"{tuple(embeds.shape)} and {tuple(features.shape)}")
    if torch.is_autocast_enabled(features.device.type):  # as the reference's einsum under autocast
        dt = torch.get_autocast_dtype(features.device.type)
        embeds, features = embeds.to(dt), features.to(dt)
    elif embeds.dtype != features.dtype:
        raise TypeError(f"{op}: embeds and features must share a dtype, got {embeds.dtype} / {features.dtype}")
    if (batch_idx is None) == (pairs_per_image is None):
        raise ValueError(f"{op}: give batch_idx or pairs_per_image (with batch_idx=None), not both")
    if pairs_per_image is not None:
        groups = _count_groups(pairs_per_image, features.shape[0], embeds.shape[0])
    else:
        batch_idx = torch.as_tensor(batch_idx).reshape(-1)
        if batch_idx.numel() != embeds.shape[0]:
            raise ValueError(f"{op}: batch_idx must have one entry per pair ({embeds.shape[0]}), got "
                             f"{batch_idx.numel()}")
    device = _backend.check_same_device(op, embeds=embeds, features=features, targets=targets)
    T = embeds.shape[0]
    rows = _check_targets(op, targets, T, target_rows, device)
    HW = targets.shape[1] * targets.shape[2]
    if T == 0 or HW == 0 or _backend.select(op, device) == "torch":
        if pairs_per_image is not None:
            logits = _logits_in_order(embeds, features, groups)
        else:
            logits = matched_logits(embeds, features, batch_idx)
        sums = mask_loss_sums(logits, targets, rows, alpha, gamma)
        return _reduce(sums, HW, num_masks)
    _triton_ok(op, features)
    if gamma < 0:
        raise ValueError(f"{op}: gamma must be >= 0, got {gamma}")
    if pairs_per_image is None:
        groups = _groups(batch_idx, features.shape[0], device)
    sums = _SumsFromEmbeddings.apply(embeds, features, groups, targets, rows, float(alpha), float(gamma))
    return _reduce(sums, HW, num_masks)
