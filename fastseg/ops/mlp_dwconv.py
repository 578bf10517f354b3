"""Fused depthwise 3x3 conv + bias + GELU (the middle of MSCAN's MLP) with autograd.

``dwconv3x3_gelu(x, weight, bias)``: x (N, C, H, W) fp32/fp16/bf16 (fp64 on CPU), NCHW or channels_last;
weight (C, 1, 3, 3), bias (C,). Returns GELU(conv(x)) (exact erf GELU) in x's dtype and memory format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend
from .weight_cache import WeightCache

__all__ = ["dwconv3x3_gelu"]


_CACHE = WeightCache()


def _kernel_weights(weight, bias, acc):
    """(weight (C, 9), bias (C,)) in the accumulation dtype, cached per weight version."""
    def build():
        with torch.no_grad():
            return weight.detach().reshape(-1, 9).to(acc).contiguous(), bias.detach().to(acc).contiguous()

    return _CACHE.get((id(weight), id(bias), acc), (weight, bias), build)


class _DWConvGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        from fastseg.kernels import mlp_dwconv as K

        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w, b = _kernel_weights(weight, bias, acc)
        ctx.save_for_backward(x, w, b)
        ctx.dtypes = (weight.dtype, bias.dtype, weight.shape)
        return K.dwconv3x3_gelu_fwd(x, w, b)

    @staticmethod
    @once_differentiable  # no double backward: create_graph=True raises instead of silently dropping terms
    def backward(ctx, gy):
        from fastseg.kernels import mlp_dwconv as K

        x, w, b = ctx.saved_tensors
        wdt, bdt, wshape = ctx.dtypes
        C = x.shape[1]
        dx, flat = K.dwconv3x3_gelu_bwd(x, gy.to(x.dtype), w, b, wdt)  # dW (C, 9) then db, in weight's dtype
        db = flat[9 * C:]
        return dx, flat[:9 * C].view(wshape), db if bdt == wdt else db.to(bdt)


# Eager calls go through the autograd.Function above (torch.library's custom-op dispatch costs Python per call);
# under torch.compile the same kernels are reached through the custom ops below, which Dynamo traces without a
# graph break (the kernel-ready weights are rebuilt inside them, through the cache on real tensors).


def _dense(x):
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


@torch.library.custom_op("fastseg::dwconv3x3_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from fastseg.kernels import mlp_dwconv as K

    x = _dense(x)
    w, b = _kernel_weights(weight, bias, torch.float64 if x.dtype == torch.float64 else torch.float32)
    return K.dwconv3x3_gelu_fwd(x, w, b)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias):
    return torch.empty_like(_dense(x))


@torch.library.custom_op("fastseg::dwconv3x3_gelu_bwd", mutates_args=())
def _bwd_op(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import mlp_dwconv as K

    x = _dense(x)
    w, b = _kernel_weights(weight, bias, torch.float64 if x.dtype == torch.float64 else torch.float32)
    C = x.shape[1]
    dx, flat = K.dwconv3x3_gelu_bwd(x, gy.to(x.dtype), w, b, weight.dtype)
    return dx, flat[:9 * C].view(weight.shape).clone(), flat[9 * C:].to(bias.dtype, copy=True)


@_bwd_op.register_fake
def _bwd_fake(gy, x, weight, bias):
    return torch.empty_like(_dense(x)), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    x, weight, bias = ctx.saved_tensors
    return _bwd_op(gy, x, weight, bias)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dwconv3x3_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(depthwise 3x3 conv(x, weight, bias, padding=1)); see the module docstring."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"dwconv3x3_gelu: x must be 4-D (N, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3) or tuple(bias.shape) != (C,):
        raise ValueError(f"dwconv3x3_gelu: channel mismatch: x has C={C} but weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)} (expected ({C}, 1, 3, 3) and ({C},))")
    if not x.is_floating_point():
        raise TypeError(f"dwconv3x3_gelu: x must be floating point, got {x.dtype}")
    device = _backend.check_same_device("dwconv3x3_gelu", x=x, weight=weight, bias=bias)
    if x.numel() == 0 or _backend.select("dwconv3x3_gelu", device) == "torch":  # empty: nothing to launch
        return F.gelu(F.conv2d(x, weight, bias, padding=1, groups=C))
    if x.dtype == torch.float64 and x.is_cuda:
        raise TypeError("dwconv3x3_gelu: float64 runs only under the Triton interpreter; use fp32/fp16/bf16 on CUDA")
    if torch.compiler.is_compiling():
        return _fwd_op(x, weight, bias)
    return _DWConvGELU.apply(x, weight, bias)
