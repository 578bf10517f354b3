"""Records of multi-scale deformable attention: the official Deformable DETR / Mask2Former ``MSDeformAttn``
-> ``fastseg.nn.MSDeformAttn`` (this file's ``RECORD``), and Hugging Face's
``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` -> ``fastseg.nn.MSDeformAttnHF``
(:mod:`.ms_deform_attn_hf`). Both: Linear ``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj`` with consistent sizes, told apart by the forward signature. This project's own pixel-decoder
module (list of shapes, no level start index) is not swapped: it has its own ``fused`` switch
(``MSDeformAttnPixelDecoder.set_fused``)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .fused_op import FusedOp, Probe, randn

__all__ = ["RECORD", "convention", "probe_inputs"]

_OFFICIAL = ["query", "reference_points", "input_flatten", "input_spatial_shapes", "input_level_start_index",
             "input_padding_mask"]
_HF = ("hidden_states", "encoder_hidden_states", "reference_points", "spatial_shapes_list", "level_start_index")


def convention(m: nn.Module) -> str | None:
    """"official" / "hf" for a module with MSDeformAttn's parameters and one of the two forward signatures."""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in
               ("sampling_offsets", "attention_weights", "value_proj", "output_proj")):
        return None
    if not all(isinstance(getattr(m, a, None), int) for a in ("d_model", "n_levels", "n_heads", "n_points")):
        return None
    C, L, M, P = m.d_model, m.n_levels, m.n_heads, m.n_points
    if M <= 0 or C % M or m.sampling_offsets.out_features != M * L * P * 2 \
            or m.attention_weights.out_features != M * L * P:
        return None
    if any(lin.in_features != C for lin in (m.sampling_offsets, m.attention_weights, m.value_proj, m.output_proj)) \
            or m.value_proj.out_features != C or m.output_proj.out_features != C:
        return None
    try:
        params = list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return None
    if params[1:7] == _OFFICIAL:
        return "official"
    if all(p in params for p in _HF):
        return "hf"
    return None


def probe_inputs(m: nn.Module, device, dtype, g: torch.Generator):
    """Batch 2, 5 queries, small odd level shapes (3 + l, 4 + 2l), random reference points (never exactly on a
    texel border): (query, reference_points, input_flatten, shapes list, shapes tensor, level start tensor)."""
    shapes_list = [(3 + lvl, 4 + 2 * lvl) for lvl in range(m.n_levels)]
    S = sum(h * w for h, w in shapes_list)
    query = randn((2, 5, m.d_model), g, device, dtype)
    flat = randn((2, S, m.d_model), g, device, dtype)
    refs = torch.rand((2, 5, m.n_levels, 2), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    shapes = torch.tensor(shapes_list, dtype=torch.long, device=device)
    starts = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    return query, refs, flat, shapes_list, shapes, starts


def _is_official(parent: nn.Module, name: str, m: nn.Module) -> bool:
    return convention(m) == "official"


def _build(cls, m: nn.Module) -> nn.Module:
    return cls.from_module(m)


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    query, refs, flat, _, shapes, starts = probe_inputs(m, device, dtype, g)
    return [Probe("query (2, 5, C), 2-coordinate reference points, levels (3+l, 4+2l)", (query, refs, flat),
                  lambda mod, q, r, x: mod(q, r, x, shapes, starts))]


def _check(device, dtype):
    """fastseg.nn.MSDeformAttn vs the official module (grid_sample core): 3 odd-sized levels, 2 heads of 8,
    3 points, random (non-init) offsets so that no point sits exactly on a texel border."""
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    what = "the fused multi-scale deformable attention lands with issue 14"
    cls = require("fastseg.nn", "MSDeformAttn", what)
    ref_cls = require("fastseg.reference", "ReferenceMSDeformAttn", what)
    shapes = [(5, 7), (3, 4), (2, 1)]
    torch.manual_seed(0)
    ref = ref_cls(16, 3, 2, 3)
    with torch.no_grad():
        ref.sampling_offsets.weight.normal_(0, 0.3)
        ref.attention_weights.weight.normal_(0, 0.3)
    fused = cls(16, 3, 2, 3)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in shapes)
    st = torch.tensor(shapes, device=device)
    starts = torch.tensor([0, 35, 47], device=device)
    inputs = [torch.randn(2, 9, 16, generator=g), torch.rand(2, 9, 3, 2, generator=g),
              torch.randn(2, S, 16, generator=g)]
    return compare(fused, ref, inputs, lambda m, q, r, x: m(q, r, x, st, starts), dtype, device,
                   input_names=["query", "reference_points", "input_flatten"])


RECORD = FusedOp(
    name="ms_deform_attn",
    summary="multi-scale deformable attention (official Deformable DETR / Mask2Former MSDeformAttn)",
    nn_class="MSDeformAttn",
    matches=_is_official,
    build=_build,
    probe=_probe,
    check=_check,
    bench=("ms-deform-attn", "ms-deform-attn-module"),
)
