"""Record of Hugging Face's ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` (and OneFormer's):
``fastseg.nn.MSDeformAttnHF`` (keyword call with ``spatial_shapes_list``, returns ``(output, weights)``).
Recogniser and probe inputs shared with :mod:`.ms_deform_attn`; checked by its ``fastseg check`` entry."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .fused_op import FusedOp, Probe
from .ms_deform_attn import convention, probe_inputs

__all__ = ["RECORD"]


def _is_hf(parent: nn.Module, name: str, m: nn.Module) -> bool:
    return convention(m) == "hf"


def _build(cls, m: nn.Module) -> nn.Module:
    return cls.from_module(m)


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    query, refs, flat, shapes_list, shapes, starts = probe_inputs(m, device, dtype, g)
    # OneFormer's module reads the shapes tensor too (its caller passes both); Mask2Former's has no such argument
    extra = {"spatial_shapes": shapes} if "spatial_shapes" in inspect.signature(m.forward).parameters else {}

    def call(mod, h, r, x):
        return mod(hidden_states=h, attention_mask=None, encoder_hidden_states=x, encoder_attention_mask=None,
                   position_embeddings=None, reference_points=r, spatial_shapes_list=shapes_list,
                   level_start_index=starts, **extra)[0]
    return [Probe("hidden_states (2, 5, C), 2-coordinate reference points, levels (3+l, 4+2l)", (query, refs, flat),
                  call)]


RECORD = FusedOp(
    name="ms_deform_attn_hf",
    summary="multi-scale deformable attention (Hugging Face Mask2Former pixel-decoder encoder)",
    nn_class="MSDeformAttnHF",
    matches=_is_hf,
    build=_build,
    probe=_probe,
    bench=("ms-deform-attn", "ms-deform-attn-module"),
)
