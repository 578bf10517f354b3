"""Context Clusters' clustering step (center proposal, similarity, assignment, aggregation, dispatch) with autograd.

:func:`context_cluster` takes the outputs of the 1x1 convs ``f`` (x) and ``v`` (value), both
[B, heads*head_dim, W, H], and the scalars ``sim_alpha``/``sim_beta`` (shape [1]); it returns what the original
``Cluster`` feeds to its ``proj`` conv: [B, heads*head_dim, W, H], or [B, heads*head_dim, fold_w*proposal_w,
fold_h*proposal_h] with ``return_center``. Gradients flow to x (directly and through the center pooling), value
(directly and through the value-center pooling), sim_alpha and sim_beta; the argmax is piecewise constant.
``normalizer``: "sim" (default; the official code since 2023-05-31: the aggregate is divided by the sum of the
assigned points' similarities + 1, so gradients also flow through that sum) or "mask" (the code before it: the
cluster size + 1), see :mod:`fastseg.reference.context_cluster`.

On CPU tensors without the Triton interpreter the op runs :func:`_torch_core`: the official math with the two
(b, M, N, c) broadcast products of the original replaced by a batched GEMM (aggregate) and a gather (dispatch:
each point receives its one center), so nothing bigger than the (b, M, N) similarity is built, and the fold
regions laid out once in the (b, N, c) order the GEMMs and the normalisation read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import check_same_device, select
from ..reference.context_cluster import check_normalizer, pairwise_cos_sim

__all__ = ["context_cluster", "context_cluster_packed", "effective_folds"]

_OP = "context_cluster"


def effective_folds(fold_w: int, fold_h: int) -> tuple[int, int]:
    """The original folds into regions only when both fold_w > 1 and fold_h > 1."""
    return (fold_w, fold_h) if fold_w > 1 and fold_h > 1 else (1, 1)


def _check(x, value, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h):
    if x.dim() != 4 or value.shape != x.shape:
        raise ValueError(f"{_OP}: x and value must both be [B, heads*head_dim, W, H], got {tuple(x.shape)} "
                         f"and {tuple(value.shape)}")
    if x.dtype != value.dtype:
        raise ValueError(f"{_OP}: x and value must have one dtype, got {x.dtype} and {value.dtype}")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{_OP}: heads must be a positive int, got {heads!r}")
    if x.shape[1] % heads != 0:
        raise ValueError(f"{_OP}: {x.shape[1]} channels cannot be split into {heads} heads")
    if sim_alpha.numel() != 1 or sim_beta.numel() != 1:
        raise ValueError(f"{_OP}: sim_alpha and sim_beta must have one element each")
    if proposal_w < 1 or proposal_h < 1:
        raise ValueError(f"{_OP}: proposal sizes must be >= 1, got {proposal_w}x{proposal_h}")
    f2, f3 = effective_folds(fold_w, fold_h)
    if x.shape[2] % f2 != 0 or x.shape[3] % f3 != 0:
        raise ValueError(f"{_OP}: the feature map size ({x.shape[2]}*{x.shape[3]}) cannot be divided by the fold "
                         f"{fold_w}*{fold_h}; pad or resize the input so that it can")
    if x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"{_OP}: empty input {tuple(x.shape)}")
    return f2, f3


class _ContextClusterFn(torch.autograd.Function):
    """x, value separate, or (value=None) x = the packed [B, 2*E*C, W, H] output of one conv for f and v."""

    @staticmethod
    def forward(ctx, x, value, sim_alpha, sim_beta, heads, folds, proposals, return_center, normalizer):
        from fastseg.kernels import context_cluster as K

        ctx.packed = value is None
        if ctx.packed:
            x = x.contiguous()
            ec = x.shape[1] // 2
            xs, vs = x[:, :ec], x[:, ec:]
            to_save = (x,)
        else:
            xs, vs = x.contiguous(), value.contiguous()
            to_save = (xs, vs)
        alpha = sim_alpha.detach().contiguous()
        beta = sim_beta.detach().contiguous()
        out, saved = K.cluster_forward(xs, vs, alpha, beta, heads, folds, proposals, return_center, normalizer)
        ctx.save_for_backward(alpha, *saved, *to_save)
        ctx.cfg = (heads, folds, proposals, return_center, normalizer)
        ctx.param_dtypes = (sim_alpha.dtype, sim_beta.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        from fastseg.kernels import context_cluster as K

        alpha, *rest = ctx.saved_tensors
        saved = rest[:5]
        heads, folds, proposals, return_center, normalizer = ctx.cfg
        if ctx.packed:
            (xv,) = rest[5:]
            ec = xv.shape[1] // 2
            dxv = torch.empty_like(xv)
            _, _, dalpha, dbeta = K.cluster_backward(g.contiguous(), xv[:, :ec], xv[:, ec:], alpha, saved, heads,
                                                     folds, proposals, return_center, dx=dxv[:, :ec], dv=dxv[:, ec:],
                                                     normalizer=normalizer)
            dx, dv = dxv, None
        else:
            xs, vs = rest[5:]
            dx, dv, dalpha, dbeta = K.cluster_backward(g.contiguous(), xs, vs, alpha, saved, heads, folds,
                                                       proposals, return_center, normalizer=normalizer)
        return dx, dv, dalpha.to(ctx.param_dtypes[0]), dbeta.to(ctx.param_dtypes[1]), None, None, None, None, None


# Eager calls go through the autograd.Function above (torch.library's custom-op dispatch costs Python per call);
# under torch.compile the same kernels are reached through the custom ops below, which Dynamo traces without a
# graph break. value=None: x is the packed [B, 2*E*C, W, H] input and the backward op returns its gradient as
# one tensor (and an empty dv).


def _split(x, value):
    if value is None:
        x = x.contiguous()
        ec = x.shape[1] // 2
        return x[:, :ec], x[:, ec:]
    return x.contiguous(), value.contiguous()


@torch.library.custom_op("fastseg::context_cluster_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, value: torch.Tensor | None, sim_alpha: torch.Tensor, sim_beta: torch.Tensor, heads: int,
            f2: int, f3: int, p2: int, p3: int, return_center: bool, normalizer: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import context_cluster as K

    xs, vs = _split(x, value)
    out, saved = K.cluster_forward(xs, vs, sim_alpha.detach().contiguous(), sim_beta.detach().contiguous(), heads,
                                   (f2, f3), (p2, p3), return_center, normalizer)
    return (out, *saved)


@_fwd_op.register_fake
def _fwd_fake(x, value, sim_alpha, sim_beta, heads, f2, f3, p2, p3, return_center, normalizer):
    B, EC, D2, D3 = x.shape
    if value is None:
        EC //= 2
    C, n_inst, N, M = EC // heads, B * heads * f2 * f3, (D2 // f2) * (D3 // f3), p2 * p3
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_hw = (f2 * p2, f3 * p3) if return_center else (D2, D3)
    return (x.new_empty((B, EC, *out_hw)), x.new_empty((n_inst * N,), dtype=torch.int32),
            x.new_empty((n_inst * N,), dtype=acc), x.new_empty((n_inst * M * C,), dtype=acc),
            x.new_empty((n_inst * M * C,), dtype=acc), x.new_empty((n_inst * M,), dtype=acc))


@torch.library.custom_op("fastseg::context_cluster_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, x: torch.Tensor, value: torch.Tensor | None, sim_alpha: torch.Tensor,
            assign: torch.Tensor, sim: torch.Tensor, cen: torch.Tensor, agg: torch.Tensor, den: torch.Tensor,
            heads: int, f2: int, f3: int, p2: int, p3: int, return_center: bool, normalizer: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import context_cluster as K

    xs, vs = _split(x, value)
    saved = (assign, sim, cen, agg, den)
    args = (sim_alpha.detach().contiguous(), saved, heads, (f2, f3), (p2, p3), return_center)
    if value is None:
        dxv = torch.empty_like(x, memory_format=torch.contiguous_format)
        ec = x.shape[1] // 2
        _, _, dalpha, dbeta = K.cluster_backward(g.contiguous(), xs, vs, *args, dx=dxv[:, :ec], dv=dxv[:, ec:],
                                                 normalizer=normalizer)
        return dxv, x.new_empty((0,)), dalpha, dbeta
    dx, dv, dalpha, dbeta = K.cluster_backward(g.contiguous(), xs, vs, *args, normalizer=normalizer)
    return dx, dv, dalpha, dbeta


@_bwd_op.register_fake
def _bwd_fake(g, x, value, sim_alpha, assign, sim, cen, agg, den, heads, f2, f3, p2, p3, return_center, normalizer):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dv = x.new_empty((0,)) if value is None else torch.empty_like(value, memory_format=torch.contiguous_format)
    return dx, dv, sim.new_empty((1,)), sim.new_empty((1,))


def _setup_context(ctx, inputs, output):
    x, value, sim_alpha, sim_beta, *cfg = inputs
    ctx.save_for_backward(x, value, sim_alpha, *output[1:])
    ctx.cfg = cfg
    ctx.param_dtypes = (sim_alpha.dtype, sim_beta.dtype)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, g, *unused):
    x, value, sim_alpha, *saved = ctx.saved_tensors
    dx, dv, dalpha, dbeta = _bwd_op(g, x, value, sim_alpha, *saved, *ctx.cfg)
    return (dx, None if value is None else dv, dalpha.to(ctx.param_dtypes[0]), dbeta.to(ctx.param_dtypes[1]),
            None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _torch_core(x, value, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h, return_center,
                normalizer):
    """The plain-PyTorch path: :func:`fastseg.reference.cluster_core`'s math (same shapes and dtypes, same
    tie-breaking of the assignment), arranged for speed and memory: x and value are laid out once as
    (b, N, c) points of each fold region (one copy each; the original copies each fold and then normalises
    along a strided dim), the centers are pooled from that layout, aggregate ``sim @ value`` is a bmm and the
    dispatch ``sim_max · center[argmax]`` a gather (the original's two (b, M, N, c) products are never built)."""
    B, EC, W0, H0 = x.shape
    c = EC // heads
    fw, fh = (fold_w, fold_h) if fold_w > 1 and fold_h > 1 else (1, 1)
    if W0 % fw or H0 % fh:
        raise ValueError(f"Ensure the feature map size ({W0}*{H0}) can be divided by fold {fw}*{fh}")
    w, h = W0 // fw, H0 // fh
    b = B * heads * fw * fh

    def points(t):  # [B, heads*c, W0, H0] -> [b, N = w*h, c]  ("(b e) c (f1 w) (f2 h) -> (b e f1 f2) (w h) c")
        return t.reshape(B * heads, c, fw, w, fh, h).permute(0, 2, 4, 3, 5, 1).reshape(b, w * h, c)

    def pool(t):  # [b, N, c] -> [b, M, c], the original's AdaptiveAvgPool2d on the [b, c, w, h] region
        return F.adaptive_avg_pool2d(t.view(b, w, h, c).permute(0, 3, 1, 2), (proposal_w, proposal_h)) \
            .flatten(2).transpose(1, 2)

    xp, vp = points(x), points(value)
    sim = torch.sigmoid(sim_beta + sim_alpha * pairwise_cos_sim(pool(xp), xp))  # [b, M, N]
    sim_max, idx = sim.max(dim=1, keepdim=True)  # [b, 1, N]
    mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)
    sim = sim * mask
    dtype = torch.promote_types(sim.dtype, value.dtype)
    norm = sim if normalizer == "sim" else mask
    out = (torch.bmm(sim.to(dtype), vp.to(dtype)) + pool(vp)) / (norm.sum(dim=-1, keepdim=True) + 1.0)  # [b, M, c]
    if return_center:
        ww, hh = proposal_w, proposal_h
        out = out.reshape(B * heads, fw, fh, ww, hh, c)
    else:
        ww, hh = w, h
        out = torch.gather(out, 1, idx.transpose(1, 2).expand(-1, -1, c)) * sim_max.transpose(1, 2)  # [b, N, c]
        out = out.reshape(B * heads, fw, fh, w, h, c)
    # "(b e f1 f2) (w h) c -> b (e c) (f1 w) (f2 h)"
    return out.permute(0, 5, 1, 3, 2, 4).reshape(B, heads * c, fw * ww, fh * hh)


def _apply(x, value, sim_alpha, sim_beta, heads, folds, proposals, return_center, normalizer):
    if torch.compiler.is_compiling():
        return _fwd_op(x, value, sim_alpha, sim_beta, heads, *folds, *proposals, return_center, normalizer)[0]
    return _ContextClusterFn.apply(x, value, sim_alpha, sim_beta, heads, folds, proposals, return_center, normalizer)


def _run(x, value, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h, return_center, normalizer,
         xs, vs):
    check_normalizer(normalizer)
    device = check_same_device(_OP, x=x, sim_alpha=sim_alpha, sim_beta=sim_beta)
    folds = _check(xs, vs, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h)
    if select(_OP, device) == "torch":
        out = _torch_core(xs, vs, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h,
                          return_center, normalizer)
        return out.to(x.dtype)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{_OP}: unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    return _apply(x, value, sim_alpha, sim_beta, heads, folds, (proposal_w, proposal_h), bool(return_center),
                  normalizer)


def context_cluster(
    x: torch.Tensor,
    value: torch.Tensor,
    sim_alpha: torch.Tensor,
    sim_beta: torch.Tensor,
    heads: int,
    fold_w: int = 2,
    fold_h: int = 2,
    proposal_w: int = 2,
    proposal_h: int = 2,
    return_center: bool = False,
    normalizer: str = "sim",
) -> torch.Tensor:
    """The fused clustering step of Context Clusters (see the module docstring for shapes).

    Output dtype is x's dtype. On CPU without the Triton interpreter it runs the plain PyTorch math of
    :func:`fastseg.reference.cluster_core`'s math (:func:`_torch_core`, cast to x's dtype).
    """
    check_same_device(_OP, x=x, value=value)
    return _run(x, value, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h, return_center,
                normalizer, x, value)


def context_cluster_packed(
    xv: torch.Tensor,
    sim_alpha: torch.Tensor,
    sim_beta: torch.Tensor,
    heads: int,
    fold_w: int = 2,
    fold_h: int = 2,
    proposal_w: int = 2,
    proposal_h: int = 2,
    return_center: bool = False,
    normalizer: str = "sim",
) -> torch.Tensor:
    """:func:`context_cluster` on xv = cat([x, value], dim=1) ([B, 2*heads*head_dim, W, H], e.g. one conv
    computing ``f`` and ``v`` together); its gradient comes back as one packed tensor."""
    if xv.dim() != 4 or xv.shape[1] % 2:
        raise ValueError(f"{_OP}: packed input must be [B, 2*heads*head_dim, W, H], got {tuple(xv.shape)}")
    ec = xv.shape[1] // 2
    return _run(xv, None, sim_alpha, sim_beta, heads, fold_w, fold_h, proposal_w, proposal_h, return_center,
                normalizer, xv[:, :ec], xv[:, ec:])
