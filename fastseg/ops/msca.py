"""MSCA (SegNeXt's multi-scale convolutional attention) as a differentiable fused op.

``msca(x, dw_weights, dw_biases, w3, b3)``: x (N, C, H, W) fp32/fp16/bf16 (fp64 on CPU), NCHW or
channels_last; ``dw_weights`` the 7 depthwise kernels in the order conv0 (C,1,5,5), conv0_1 (C,1,1,7),
conv0_2 (C,1,7,1), conv1_1, conv1_2, conv2_1, conv2_2 and ``dw_biases`` their (C,) biases; w3 (C, C, 1, 1),
b3 (C,). Returns (N, C, H, W) in x's dtype and memory format. Dispatch by :func:`fastseg._backend.select`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend
from .weight_cache import WeightCache

__all__ = ["msca", "pack_dw_params", "DW_NAMES"]

DW_NAMES = ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2")
_SHAPES = ((5, 5), (1, 7), (7, 1), (1, 11), (11, 1), (1, 21), (21, 1))


def pack_dw_params(dw_weights: Sequence[torch.Tensor], dw_biases: Sequence[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
    """(C, 128) row per channel: the 103 depthwise taps then the 7 biases, zero padded."""
    from fastseg.kernels.msca import NPACK, WPACK

    C = dw_weights[0].shape[0]
    cols = [w.detach().reshape(C, -1) for w in dw_weights] + [b.detach().reshape(C, 1) for b in dw_biases]
    packed = torch.cat([c.to(dtype) for c in cols], dim=1)
    return F.pad(packed, (0, WPACK - NPACK)).contiguous()


_CACHE = WeightCache()


def _kernel_weights(dw_weights, dw_biases, w3, b3, x_dtype, acc):
    """(wpack (C, 128) acc dtype, w3 (C, C) x dtype, b3 (C,) acc dtype), cached per weight version."""
    C = w3.shape[0]
    tensors = (*dw_weights, *dw_biases, w3, b3)
    key = (tuple(id(t) for t in tensors), x_dtype, acc)

    def build():
        with torch.no_grad():
            return (pack_dw_params(dw_weights, dw_biases, acc),
                    w3.detach().reshape(C, C).to(x_dtype).contiguous(), b3.detach().to(acc).contiguous())

    return _CACHE.get(key, tensors, build)


def _torch_msca(x, dw_weights, dw_biases, w3, b3):
    """The plain-PyTorch path (the reference's math). In CPU inference (nothing to differentiate), fp32/bf16
    NCHW input runs channels_last inside (oneDNN's depthwise convolutions are ~2-3x faster in that layout on a
    CPU) and the result comes back NCHW. Not when autograd records: the channels_last copy of x would be saved
    for backward, one more x-sized tensor than eager keeps."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w3, b3, *dw_weights, *dw_biases)
                                                if t is not None)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4 and not recording \
            and not x.is_contiguous(memory_format=torch.channels_last):
        y = _torch_msca_layout(x.contiguous(memory_format=torch.channels_last), dw_weights, dw_biases, w3, b3)
        return y.contiguous()
    return _torch_msca_layout(x, dw_weights, dw_biases, w3, b3)


def _torch_msca_layout(x, dw_weights, dw_biases, w3, b3):
    C = x.shape[1]
    a0 = F.conv2d(x, dw_weights[0], dw_biases[0], padding=2, groups=C)
    out = a0
    for i in range(3):
        k = _SHAPES[2 * i + 1][1]
        t = F.conv2d(a0, dw_weights[2 * i + 1], dw_biases[2 * i + 1], padding=(0, k // 2), groups=C)
        out = out + F.conv2d(t, dw_weights[2 * i + 2], dw_biases[2 * i + 2], padding=(k // 2, 0), groups=C)
    return F.conv2d(out, w3, b3) * x


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as it is when NCHW- or channels_last-contiguous, else NCHW-contiguous."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _like(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g in x's dtype with x's exact strides (x is dense: the backward kernels index g and x with one offset
    tensor; a size-1 dim makes NCHW and channels_last strides differ although both formats hold)."""
    if g.stride() == x.stride() and g.dtype == x.dtype:
        return g
    return torch.empty_like(x).copy_(g)


def _forward(K, x, wp, w3m, b3a):
    """(y, s): one kernel for C <= K.FUSED_FWD_MAX_C when its spatial tiles fill the GPU (:func:`use_fused_fwd`;
    s is then not re-read from DRAM by a second kernel), else the depthwise kernel then the pointwise GEMM."""
    if K.use_fused_fwd(x):
        return K.msca_fused_fwd(x, wp, w3m, b3a)
    s = K.msca_dw_fwd(x, wp)
    return K.msca_pw_fwd(s, x, w3m, b3a), s


def _pw_backward(K, g, x, s, w3m, b3a, w3_dtype):
    """(ds, dx_direct, (C + 1, C) dW3 / db3): one fused pass over g, x, s for C <= K.PW_FUSED_MAX_C, else
    the GEMM kernel and the split dW3 kernel (each reading g, x, s)."""
    if x.shape[1] <= K.PW_FUSED_MAX_C:
        return K.msca_pw_w3_bwd(g, x, s, w3m, b3a, w3_dtype)
    ds, dxd = K.msca_pw_bwd(g, x, s, w3m, b3a)
    return ds, dxd, K.msca_w3_bwd(g, x, s, w3_dtype)


def _backward_kernels(K, g, x, s, wp, w3m, b3a, w3_dtype, dw_dtype):
    """(dx, (C + 1, C) dW3 rows then db3 in w3_dtype, flat depthwise gradients in dw_dtype), for g sharing x's
    strides: the one-kernel backward where :func:`use_fused_bwd` says so (opt-in), else the two-pass backward
    (:func:`use_twopass_bwd`: C <= 64), else the pointwise then the depthwise backward kernels."""
    if g.stride() == x.stride() == s.stride():
        if K.use_fused_bwd(x):
            return K.msca_fused_bwd(g, x, s, wp, w3m, b3a, w3_dtype, dw_dtype)
        if K.use_twopass_bwd(x):
            return K.msca_twopass_bwd(g, x, s, wp, w3m, b3a, w3_dtype, dw_dtype)
    ds, dxd, g3 = _pw_backward(K, g, x, s, w3m, b3a, w3_dtype)
    dx, gflat = K.msca_dw_bwd(x, ds, dxd, wp, dw_dtype)  # flat, parameter after parameter (PACK order)
    return dx, g3, gflat


class _MSCAFunction(torch.autograd.Function):
    """Inputs: x, w3 (C, C, 1, 1) or (C, C), b3, then the 7 depthwise weights and the 7 biases (their grads are
    slices of one flat buffer, written by a single reduction launch in the parameters' dtype)."""

    @staticmethod
    def forward(ctx, x, w3, b3, *dw):
        from fastseg.kernels import msca as K

        x = _dense(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        wp, w3m, b3a = _kernel_weights(dw[:7], dw[7:], w3, b3, x.dtype, acc)
        y, s = _forward(K, x, wp, w3m, b3a)
        ctx.save_for_backward(x, s, wp, w3m, b3a)
        ctx.meta = (w3.shape, w3.dtype, b3.dtype, [(t.shape, t.dtype) for t in dw])
        return y

    @staticmethod
    @once_differentiable  # no double backward: create_graph=True raises instead of silently dropping terms
    def backward(ctx, g):
        from fastseg.kernels import msca as K

        x, s, wp, w3m, b3a = ctx.saved_tensors
        w3_shape, w3_dtype, b3_dtype, dw_meta = ctx.meta
        C = x.shape[1]
        g = _like(g, x)
        dw_dtype = dw_meta[0][1]
        dx, g3, gflat = _backward_kernels(K, g, x, s, wp, w3m, b3a, w3_dtype, dw_dtype)
        grads, off = [], 0
        for shape, dt in dw_meta:
            n = shape.numel()
            gi = gflat[off:off + n].view(shape)
            grads.append(gi if dt == dw_dtype else gi.to(dt))
            off += n
        db3 = g3[C]
        return dx, g3[:C].view(w3_shape), db3 if b3_dtype == w3_dtype else db3.to(b3_dtype), *grads


# Eager calls go through the autograd.Function above (torch.library's custom-op dispatch costs Python per call);
# under torch.compile the same kernels are reached through the custom ops below, which Dynamo traces without a
# graph break. The packed weights are rebuilt from the parameters inside the ops (through the cache on real
# tensors; fake tensors are never cached).


def _msca_grads(g, x, s, w3, b3, dw):
    """(dx, dW3, db3, *d(dw)) of the fused op, each in its parameter's dtype and shape."""
    from fastseg.kernels import msca as K

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wp, w3m, b3a = _kernel_weights(dw[:7], dw[7:], w3, b3, x.dtype, acc)
    C = x.shape[1]
    g = _like(g, x)
    dx, g3, gflat = _backward_kernels(K, g, x, s, wp, w3m, b3a, w3.dtype, dw[0].dtype)
    grads, off = [], 0
    for t in dw:
        n = t.numel()
        gi = gflat[off:off + n].view(t.shape)
        grads.append(gi if t.dtype == dw[0].dtype else gi.to(t.dtype))
        off += n
    db3 = g3[C]
    return [dx, g3[:C].view(w3.shape).clone(), (db3 if b3.dtype == w3.dtype else db3.to(b3.dtype)).clone(),
            *(gi.clone() for gi in grads)]


@torch.library.custom_op("fastseg::msca_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, dw: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastseg.kernels import msca as K

    x = _dense(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wp, w3m, b3a = _kernel_weights(dw[:7], dw[7:], w3, b3, x.dtype, acc)
    return _forward(K, x, wp, w3m, b3a)


@_fwd_op.register_fake
def _fwd_fake(x, w3, b3, dw):
    x = _dense(x)
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("fastseg::msca_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
            dw: list[torch.Tensor]) -> list[torch.Tensor]:
    return _msca_grads(g, _dense(x), s, w3, b3, dw)


@_bwd_op.register_fake
def _bwd_fake(g, x, s, w3, b3, dw):
    return [torch.empty_like(_dense(x)), torch.empty_like(w3), torch.empty_like(b3), *(torch.empty_like(t) for t in dw)]


def _setup_context(ctx, inputs, output):
    x, w3, b3, dw = inputs
    ctx.save_for_backward(x, output[1], w3, b3, *dw)


def _backward(ctx, g, _ds):
    x, s, w3, b3, *dw = ctx.saved_tensors
    dx, dw3, db3, *ddw = _bwd_op(g, x, s, w3, b3, dw)
    return dx, dw3, db3, ddw


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, dw_weights, dw_biases, w3, b3):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"msca: x must be a 4-D (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if len(dw_weights) != 7 or len(dw_biases) != 7:
        raise ValueError("msca: expected 7 depthwise weights and 7 biases")
    C = x.shape[1]
    for name, w, b, (kh, kw) in zip(DW_NAMES, dw_weights, dw_biases, _SHAPES):
        if tuple(w.shape) != (C, 1, kh, kw) or tuple(b.shape) != (C,):
            raise ValueError(f"msca: channel mismatch: x has C={C} channels but {name} has weight "
                             f"{tuple(w.shape)} and bias {tuple(b.shape)} (expected ({C}, 1, {kh}, {kw}) and ({C},))")
    if tuple(w3.shape) not in ((C, C, 1, 1), (C, C)) or tuple(b3.shape) != (C,):
        raise ValueError(f"msca: channel mismatch: x has C={C} channels but conv3 has weight {tuple(w3.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"msca: x must be floating point, got {x.dtype}")


def msca(x: torch.Tensor, dw_weights: Sequence[torch.Tensor], dw_biases: Sequence[torch.Tensor],
         w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """Fused MSCA forward (and backward through autograd); see the module docstring for shapes."""
    _check(x, dw_weights, dw_biases, w3, b3)
    device = _backend.check_same_device("msca", x=x, w3=w3, b3=b3, **{n: w for n, w in zip(DW_NAMES, dw_weights)})
    if x.numel() == 0 or _backend.select("msca", device) == "torch":  # empty batch: nothing to launch
        return _torch_msca(x, dw_weights, dw_biases, w3.reshape(x.shape[1], x.shape[1], 1, 1), b3)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"msca: unsupported dtype {x.dtype}")
    if x.dtype == torch.float64 and x.is_cuda:
        raise TypeError("msca: float64 runs only under the Triton interpreter (CPU); use fp32/fp16/bf16 on CUDA")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # the interpreter's tl.dot on bf16 operands returns garbage (numpy has no bf16): refuse, never a wrong answer
        raise TypeError("msca: bfloat16 needs a GPU (the Triton interpreter's bf16 GEMM is wrong); use fp32/fp64 on "
                        "CPU or the torch backend (fastseg.use_backend('torch'))")
    if torch.compiler.is_compiling():
        return _fwd_op(x, w3, b3, [*dw_weights, *dw_biases])[0]
    return _MSCAFunction.apply(x, w3, b3, *dw_weights, *dw_biases)
