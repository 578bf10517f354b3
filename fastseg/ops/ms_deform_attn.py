"""Multi-scale deformable attention as a differentiable fused op (Triton forward and backward).

``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``: the
official ``MSDeformAttnFunction`` signature without ``im2col_step``.

* value (N, S, M, D) fp32/fp16/bf16 (fp64 under the interpreter), S = Σ_l H_l·W_l;
* spatial_shapes (L, 2) integer tensor of (H_l, W_l) on value's device (or a list of (H, W): turned into a
  device tensor once per (shapes, device), then cached);
* level_start_index (L,) integer tensor, or None (computed on the device from spatial_shapes);
* sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P), any float
  dtype each (read in fp32); returns (N, Lq, M·D) in value's dtype. Gradients for value, sampling_locations and
  attention_weights, in their dtypes.

No host sync on CUDA: the shapes tensors are read by the kernels. So ``Σ H_l·W_l == S`` is checked for a list
of shapes (in Python, with ``level_start_index=None``) and for CPU tensors only; on CUDA inconsistent shapes cannot touch memory outside ``value`` (the kernels skip a level
with ``start + H·W > S``) but give meaningless numbers. grad_value is accumulated with fp32 atomics (fp64 for
fp64), so it can differ between runs at rounding level (on CUDA the backward raises, or warns, under
``torch.use_deterministic_algorithms(True)``, as ``grid_sample``'s does); the other outputs are deterministic.
Dispatch by :func:`fastseg._backend.select` (CUDA -> Triton; CPU -> Triton under the interpreter, else the
official core's math in plain PyTorch, ``_torch_core``: one layout of value for all levels, level views,
the weighted sum accumulated per level; equal to :func:`fastseg.reference.ms_deform_attn_core_pytorch`).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference.ms_deform_attn import sampling_locations_from

__all__ = ["ms_deform_attn", "ms_deform_attn_from_offsets", "shapes_tensor", "level_start_index_of"]

_SHAPES_CACHE: dict = {}


def shapes_tensor(spatial_shapes, device) -> torch.Tensor:
    """(L, 2) int64 tensor on ``device`` from a tensor or a list of (H, W); lists are copied to the device once
    per distinct (shapes, device) and cached (a fresh host-to-device copy per call would be a sync point)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes
    key = (tuple((int(h), int(w)) for h, w in spatial_shapes), str(device))
    t = _SHAPES_CACHE.get(key)
    if t is None:
        if len(_SHAPES_CACHE) > 256:
            _SHAPES_CACHE.clear()
        t = _SHAPES_CACHE[key] = torch.tensor(key[0], dtype=torch.long, device=device).reshape(-1, 2)
    return t


def level_start_index_of(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) start of each level in the flattened S axis, computed on the shapes' device."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def _alert_nondeterministic(value: torch.Tensor) -> None:
    """grad_value uses atomics on CUDA: honour ``torch.use_deterministic_algorithms`` as PyTorch's own
    ``grid_sample`` backward does (error, or a warning with ``warn_only=True``)."""
    if value.is_cuda and torch.are_deterministic_algorithms_enabled():
        msg = ("fastseg.ops.ms_deform_attn backward accumulates grad_value with atomic adds (no fixed order), "
               "which is not deterministic; torch.use_deterministic_algorithms(True) is set")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(msg)
        else:
            raise RuntimeError(msg)


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        from fastseg.kernels import ms_deform_attn as K

        value, sampling_locations, attention_weights = (t.contiguous() for t in
                                                        (value, sampling_locations, attention_weights))
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return K.ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)[0]

    @staticmethod
    @once_differentiable  # no double backward: create_graph=True raises instead of silently dropping terms
    def backward(ctx, grad_out):
        from fastseg.kernels import ms_deform_attn as K

        value, shapes, starts, locs, attn = ctx.saved_tensors
        _alert_nondeterministic(value)
        gv, gl, ga = K.ms_deform_attn_bwd(value, shapes, starts, locs, attn, grad_out.contiguous())
        return gv.to(value.dtype), None, None, gl, ga


class _MSDeformAttnFromOffsets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, logits):
        from fastseg.kernels import ms_deform_attn as K

        value, reference_points, sampling_offsets, logits = (t.contiguous() for t in
                                                             (value, reference_points, sampling_offsets, logits))
        out, stats = K.ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_offsets, logits,
                                          reference_points)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, logits,
                              stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from fastseg.kernels import ms_deform_attn as K

        value, shapes, starts, refs, offsets, logits, stats = ctx.saved_tensors
        _alert_nondeterministic(value)
        gv, goff, glogit = K.ms_deform_attn_bwd(value, shapes, starts, offsets, logits, grad_out.contiguous(),
                                                refs, stats)
        gref = None
        if ctx.needs_input_grad[3]:  # d loc / d ref = 1: sum over heads and points of d/d loc = goff · (W, H)
            wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(goff.dtype)
            gref = (goff * wh[:, None, :]).sum((2, 4)).to(refs.dtype)
        return gv.to(value.dtype), None, None, gref, goff, glogit.to(logits.dtype)


# Eager calls go through the autograd.Functions above (torch.library's custom-op dispatch costs Python per call);
# under torch.compile the same kernels are reached through the custom ops below, which Dynamo traces without a
# graph break. reference_points=None: plain op (locations and weights); else the fused one (offsets and logits),
# whose softmax statistics are the second output (an empty tensor for the plain op).


@torch.library.custom_op("fastseg::ms_deform_attn_fwd", mutates_args=())
def _fwd_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor, reference_points: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastseg.kernels import ms_deform_attn as K

    refs = None if reference_points is None else reference_points.contiguous()
    out, stats = K.ms_deform_attn_fwd(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                                      sampling_locations.contiguous(), attention_weights.contiguous(), refs)
    return out, value.new_empty((0,), dtype=torch.float32) if stats is None else stats


@_fwd_op.register_fake
def _fwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, reference_points):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    stats = (value.new_empty((0,), dtype=torch.float32) if reference_points is None
             else value.new_empty((N, Lq, M, 2), dtype=acc))
    return value.new_empty((N, Lq, M * D)), stats


@torch.library.custom_op("fastseg::ms_deform_attn_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
            level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
            reference_points: torch.Tensor | None, stats: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import ms_deform_attn as K

    _alert_nondeterministic(value)
    fused = reference_points is not None
    gv, gl, ga = K.ms_deform_attn_bwd(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                                      sampling_locations.contiguous(), attention_weights.contiguous(),
                                      grad_out.contiguous(), reference_points.contiguous() if fused else None,
                                      stats if fused else None)
    return gv.to(value.dtype), gl, ga.to(attention_weights.dtype)


@_bwd_op.register_fake
def _bwd_fake(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
              reference_points, stats):
    return (torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _dstats):
    value, shapes, starts, locs, attn, refs, stats = ctx.saved_tensors
    gv, gl, ga = _bwd_op(grad_out, value, shapes, starts, locs, attn, refs, stats)
    gref = None
    if refs is not None and ctx.needs_input_grad[5]:  # as _MSDeformAttnFromOffsets.backward
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(gl.dtype)
        gref = (gl * wh[:, None, :]).sum((2, 4)).to(refs.dtype)
    return gv, None, None, gl, ga, gref


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_from_offsets(value: torch.Tensor, spatial_shapes, level_start_index,
                                reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
                                attention_logits: torch.Tensor) -> torch.Tensor:
    """The official module's core with its softmax and location arithmetic fused into the kernels:
    ``ms_deform_attn(value, shapes, starts, ref + offsets / (W, H), softmax_{L·P}(logits))`` without writing the
    locations or the weights. reference_points (N, Lq, L, 2) in [0, 1]; sampling_offsets (N, Lq, M, L, P, 2) in
    pixels of each level (the ``sampling_offsets`` Linear's output); attention_logits (N, Lq, M, L, P) (the
    ``attention_weights`` Linear's output, before the softmax). Returns (N, Lq, M·D); gradients for value,
    reference_points, sampling_offsets and attention_logits."""
    if not isinstance(value, torch.Tensor):
        raise ValueError("ms_deform_attn_from_offsets: value must be a tensor")
    host = _host_shapes(spatial_shapes, level_start_index)
    spatial_shapes = shapes_tensor(spatial_shapes, value.device)
    if level_start_index is None:
        level_start_index = level_start_index_of(spatial_shapes)
    _check(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits, host)
    N, Lq, L = sampling_offsets.shape[0], sampling_offsets.shape[1], sampling_offsets.shape[3]
    if not isinstance(reference_points, torch.Tensor) or tuple(reference_points.shape) != (N, Lq, L, 2) \
            or not reference_points.is_floating_point():
        raise ValueError(f"ms_deform_attn_from_offsets: reference_points must be a float ({N}, {Lq}, {L}, 2) tensor, "
                         f"got {tuple(getattr(reference_points, 'shape', ()))}")
    device = _backend.check_same_device("ms_deform_attn", value=value, spatial_shapes=spatial_shapes,
                                        level_start_index=level_start_index, reference_points=reference_points,
                                        sampling_offsets=sampling_offsets, attention_logits=attention_logits)
    empty = value.numel() == 0 or sampling_offsets.numel() == 0
    if empty or _backend.select("ms_deform_attn", device) == "torch":
        P = sampling_offsets.shape[4]
        weights = attention_logits.flatten(3).softmax(-1).view(attention_logits.shape)
        locs = sampling_locations_from(reference_points, sampling_offsets, spatial_shapes, P)
        return _torch_core(value, spatial_shapes, locs, weights)
    _check_dtypes(value=value, reference_points=reference_points, sampling_offsets=sampling_offsets,
                  attention_logits=attention_logits)
    if torch.compiler.is_compiling():
        return _fwd_op(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                       reference_points)[0]
    return _MSDeformAttnFromOffsets.apply(value, spatial_shapes.contiguous(), level_start_index.contiguous(),
                                          reference_points, sampling_offsets, attention_logits)


def _torch_core(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                attention_weights: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch path: the official core's math (bilinear ``grid_sample`` per level, zeros padding,
    ``align_corners=False``), arranged for memory and for ``torch.compile``.

    value (N, S, M, D) is laid out once as (N·M, D, S), so each level is a view (the official core copies each
    level and ``cat``s their gradients — a pattern whose backward fails under ``torch.compile``'s aot_autograd,
    "view size is not compatible"); the weighted sum is accumulated level by level instead of stacking the
    (N·M, D, Lq, L·P) samples. Returns (N, Lq, M·D) in value's dtype.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    v = value.permute(0, 2, 3, 1).reshape(N * M, D, S)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (N·M, Lq, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (N·M, Lq, L, P)
    out = None
    start = 0
    for lid, (h, w) in enumerate(shapes):
        v_l = v[:, :, start:start + h * w].view(N * M, D, h, w)
        start += h * w
        sampled = F.grid_sample(v_l, grids[:, :, lid], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights[:, None, :, lid]).sum(-1)  # (N·M, D, Lq)
        out = term if out is None else out + term
    if out is None:
        return value.new_zeros(N, Lq, M * D)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def _check_dtypes(**tensors):
    for name, t in tensors.items():
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"ms_deform_attn: unsupported {name} dtype {t.dtype}")
        if t.dtype == torch.float64 and t.is_cuda:
            raise TypeError("ms_deform_attn: float64 runs only under the Triton interpreter (CPU); use "
                            "fp32/fp16/bf16 on CUDA")


def _host_shapes(spatial_shapes, level_start_index):
    """The (H, W) list when the shapes come from the host (a list) and the starts are derived from them (None):
    then they are validated in Python, on any device, without reading a tensor."""
    if isinstance(spatial_shapes, torch.Tensor) or level_start_index is not None:
        return None
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, host_shapes=None):
    for name, t, dim in (("value", value, 4), ("sampling_locations", sampling_locations, 6),
                         ("attention_weights", attention_weights, 5)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"ms_deform_attn: {name} must be a {dim}-D tensor, got shape "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if not t.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be floating point, got {t.dtype}")
    N, S, M, D = value.shape
    _, Lq, _, L, P, two = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M or two != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} must be (N={N}, Lq, "
                         f"M={M}, L, P, 2) for value {tuple(value.shape)}")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(f"ms_deform_attn: attention_weights {tuple(attention_weights.shape)} must be "
                         f"{tuple(sampling_locations.shape[:-1])} (sampling_locations without the last dim)")
    if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be ({L}, 2) for {L} levels, got "
                         f"{tuple(spatial_shapes.shape)}")
    if spatial_shapes.is_floating_point() or spatial_shapes.dtype == torch.bool:
        raise TypeError(f"ms_deform_attn: spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
    if level_start_index.shape != (L,) or level_start_index.is_floating_point():
        raise ValueError(f"ms_deform_attn: level_start_index must be an integer ({L},) tensor, got "
                         f"{level_start_index.dtype} {tuple(level_start_index.shape)}")
    if host_shapes is not None:  # a list: checked in Python (no tensor read on any device)
        total = sum(h * w for h, w in host_shapes)
        if total != S:
            raise ValueError(f"ms_deform_attn: spatial_shapes {host_shapes} give Σ H·W = {total}, but value has "
                             f"S = {S}")
        return
    # tensors: free on CPU; on CUDA it would be a host sync (see module doc); skipped while torch.compile traces
    # (it reads tensor values; the kernels still skip a level that would read past S)
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if total != S:
            raise ValueError(f"ms_deform_attn: spatial_shapes {spatial_shapes.tolist()} give Σ H·W = {total}, "
                             f"but value has S = {S}")
        if L and not torch.equal(level_start_index.cpu().long(), level_start_index_of(spatial_shapes).long()):
            raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match "
                             f"spatial_shapes {spatial_shapes.tolist()}")


def ms_deform_attn(value: torch.Tensor, spatial_shapes, level_start_index, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Fused multi-scale deformable attention; see the module docstring for shapes and dtypes."""
    if not isinstance(value, torch.Tensor):
        raise ValueError("ms_deform_attn: value must be a tensor")
    host = _host_shapes(spatial_shapes, level_start_index)
    spatial_shapes = shapes_tensor(spatial_shapes, value.device)
    if level_start_index is None:
        level_start_index = level_start_index_of(spatial_shapes)
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, host)
    device = _backend.check_same_device("ms_deform_attn", value=value, spatial_shapes=spatial_shapes,
                                        level_start_index=level_start_index, sampling_locations=sampling_locations,
                                        attention_weights=attention_weights)
    empty = value.numel() == 0 or sampling_locations.numel() == 0
    if empty or _backend.select("ms_deform_attn", device) == "torch":  # empty: nothing to launch
        return _torch_core(value, spatial_shapes, sampling_locations, attention_weights)
    _check_dtypes(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    if torch.compiler.is_compiling():
        return _fwd_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, None)[0]
    return _MSDeformAttnFunction.apply(value, spatial_shapes.contiguous(), level_start_index.contiguous(),
                                       sampling_locations, attention_weights)
