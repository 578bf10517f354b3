"""Bilinear upsampling fused with per-pixel cross-entropy, with autograd (the (B, K, H, W) map is never stored).

``upsampled_cross_entropy(logits, target, align_corners=False, ignore_index=255)``: logits (B, K, h, w)
fp32/fp16/bf16 (fp64 on CPU), target (B, H, W) or (B, 1, H, W) int64 with values in [0, K) or ``ignore_index``.
On the Triton path labels outside [0, K) give NaN at those pixels (loss and gradient); there is no host check,
which would make every call wait for the GPU. The plain-PyTorch path on CPU raises ValueError for them (free
there); on CUDA it is ``F.cross_entropy``'s own device-side assert.
Returns the per-pixel loss (B, H, W) in float32 (float64 for float64 logits), 0 at ignored pixels — the same as
``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear", align_corners=...), target,
ignore_index=..., reduction="none")``. Reduce it yourself (mmseg's mean over all pixels: ``.mean()``;
``nn.CrossEntropyLoss``'s mean over labelled pixels: ``.sum() / (target != ignore_index).sum()``).
Saved for backward: logits, target and the per-pixel logsumexp (B, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend

__all__ = ["upsampled_cross_entropy"]


class _UpsampledCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, align_corners, ignore_index):
        from fastseg.kernels import upsample_ce as K

        loss, lse = K.upsample_ce_fwd(logits, target, align_corners, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (align_corners, ignore_index)
        return loss

    @staticmethod
    @once_differentiable  # no double backward: create_graph=True raises instead of silently dropping terms
    def backward(ctx, grad):
        from fastseg.kernels import upsample_ce as K

        logits, target, lse = ctx.saved_tensors
        dx = K.upsample_ce_bwd(logits, target, lse, grad.to(lse.dtype).contiguous(), *ctx.args)
        return dx.to(logits.dtype), None, None, None


# Eager calls use the autograd Function above; under torch.compile the same kernels are reached through these
# custom ops (no graph break).
@torch.library.custom_op("fastseg::upsample_ce_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, target: torch.Tensor, align_corners: bool, ignore_index: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastseg.kernels import upsample_ce as K

    return K.upsample_ce_fwd(logits, target, align_corners, ignore_index)


@_fwd_op.register_fake
def _(logits, target, align_corners, ignore_index):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = target.new_empty(target.shape, dtype=acc)
    return out, torch.empty_like(out)


@torch.library.custom_op("fastseg::upsample_ce_bwd", mutates_args=())
def _bwd_op(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, align_corners: bool,
            ignore_index: int) -> torch.Tensor:
    from fastseg.kernels import upsample_ce as K

    return K.upsample_ce_bwd(logits, target, lse, grad.to(lse.dtype).contiguous(), align_corners,
                             ignore_index).to(logits.dtype)


@_bwd_op.register_fake
def _(logits, target, lse, grad, align_corners, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, target, align_corners, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (align_corners, ignore_index)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _):
    logits, target, lse = ctx.saved_tensors
    return _bwd_op(logits, target, lse, grad, *ctx.args), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _check(logits, target, ignore_index):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = tuple(getattr(logits, "shape", ()))
        raise ValueError(f"upsampled_cross_entropy: logits must be (B, K, h, w), got {shape}")
    if not logits.is_floating_point():
        raise TypeError(f"upsampled_cross_entropy: logits must be floating point, got {logits.dtype}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"upsampled_cross_entropy: target must be (B, H, W) with B={logits.shape[0]}, "
                         f"got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"upsampled_cross_entropy: target must be an integer tensor, got {target.dtype}")
    return target.long().contiguous()


def _check_labels_host(target, K, ignore_index):
    """The plain path on CPU only (a host read, free there; on CUDA it would wait for the GPU)."""
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= K))
    if bad.any():
        raise ValueError(f"upsampled_cross_entropy: target values must be in [0, {K}) or ignore_index="
                         f"{ignore_index}; found {target[bad].unique().tolist()[:8]}")


def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, align_corners: bool = False,
                            ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel CE of bilinearly upsampled logits (B, H, W); see the module docstring."""
    target = _check(logits, target, ignore_index)
    device = _backend.check_same_device("upsampled_cross_entropy", logits=logits, target=target)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if target.numel() == 0 or logits.shape[1] == 0 or _backend.select("upsampled_cross_entropy", device) == "torch":
        _check_labels_host(target, logits.shape[1], ignore_index)
        up = F.interpolate(logits.to(acc), size=target.shape[1:], mode="bilinear", align_corners=align_corners)
        return F.cross_entropy(up, target, ignore_index=ignore_index, reduction="none")
    if logits.dtype == torch.float64 and logits.is_cuda:
        raise TypeError("upsampled_cross_entropy: float64 runs only under the Triton interpreter; "
                        "use fp32/fp16/bf16 on CUDA")
    if torch.compiler.is_compiling():
        return _fwd_op(logits, target, bool(align_corners), int(ignore_index))[0]
    return _UpsampledCE.apply(logits, target, bool(align_corners), int(ignore_index))
