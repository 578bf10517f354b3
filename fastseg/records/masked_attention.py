"""Record of the fused masked cross-attention (Mask2Former): ``fastseg.nn.MaskedCrossAttention``."""
from __future__ import annotations

import torch
from torch import nn

from .fused_op import FusedOp, Probe, randn

__all__ = ["RECORD"]

_CROSS_NAMES = ("multihead_attn", "cross_attn", "encoder_attn", "cross_attention")


def _is_cross_attention(parent: nn.Module, name: str, child: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` named like a decoder layer's cross-attention, next to a LayerNorm."""
    if not isinstance(child, nn.MultiheadAttention) or name not in _CROSS_NAMES:
        return False
    return any(isinstance(m, nn.LayerNorm) for m in parent.children())


def _mha_unsupported(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported by the fused kernel"
    if m.dropout >= 1.0:
        return f"attention dropout {m.dropout} (everything dropped) is not supported by the fused kernel"
    return None  # attention dropout < 1 is fused (keep mask from a Philox stream), eval mode applies none


def _build(cls, m: nn.MultiheadAttention) -> nn.Module:
    return cls.from_mha(m)


def _probe(m: nn.MultiheadAttention, device, dtype, g: torch.Generator) -> list[Probe]:
    """1 image, 5 queries, 12 keys, a random (B·heads, Q, L) mask (True = masked out), called by keyword as
    Mask2Former and Hugging Face do. Query 0 is fully masked in every head: there ``nn.MultiheadAttention``
    outputs NaN and the drop-in ``out_proj.bias``. Mask2Former (and Hugging Face) reset such rows to attend
    everywhere before the attention, so the drop-in's convention never shows in these models. Probe 1 keeps
    the empty rows and compares the forward on the other rows (the original's NaN rows poison every gradient,
    so no backward); probe 2 resets them as Mask2Former does and compares forward and gradients. With
    attention dropout both run in eval mode."""
    B, Q, L, H = 1, 5, 12, m.num_heads
    q_shape, k_shape, v_shape = ((B, Q, m.embed_dim), (B, L, m.kdim), (B, L, m.vdim)) if m.batch_first else \
        ((Q, B, m.embed_dim), (L, B, m.kdim), (L, B, m.vdim))
    inputs = tuple(randn(s, g, device, dtype) for s in (q_shape, k_shape, v_shape))
    masked = torch.rand((B * H, Q, L), generator=g) < 0.5
    masked[:, 0] = True  # a fully masked query row
    masked[:, 1] = False  # and one that sees every key
    empty = masked.all(-1)  # (B·H, Q)
    row_ok = ~empty.view(B, H, Q).any(1)  # (B, Q): no head of this output row is fully masked
    keep = (row_ok if m.batch_first else row_ok.t()).unsqueeze(-1).to(device)
    reset = masked.clone()
    reset[empty] = False  # Mask2Former: attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False

    def call(mask):
        mask = mask.to(device)
        return lambda mod, q, k, v: mod(query=q, key=k, value=v, attn_mask=mask)[0]

    train = False if m.dropout > 0 else None  # attention dropout: both draw different random numbers
    return [Probe("mask with fully masked rows (forward, other rows)", inputs, call(masked), keep, False, train),
            Probe("fully masked rows reset as Mask2Former does", inputs, call(reset), train=train)]


def _check(device, dtype):
    from fastseg.bench.check import compare
    from fastseg.bench.ops.masked_attention import blob_mask
    from fastseg.bench.registry import require
    from fastseg.reference import ReferenceMaskedCrossAttention

    cls = require("fastseg.nn", "MaskedCrossAttention", "the fused masked attention lands with issue 3")
    E, nh, B, Q, h, w = 32, 4, 2, 7, 5, 9
    torch.manual_seed(0)
    ref = ReferenceMaskedCrossAttention(E, nh, empty_rows="zero")
    fused = cls(E, nh)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    allowed = blob_mask(B, Q, h, w, 0.4, g, torch.device("cpu"))
    attn_mask = (~allowed).unsqueeze(1).repeat(1, nh, 1, 1).flatten(0, 1).to(device)
    inputs = [torch.randn(Q, B, E, generator=g), torch.randn(h * w, B, E, generator=g),
              torch.randn(h * w, B, E, generator=g)]
    return compare(fused, ref, inputs, lambda m, q, k, v: m(q, k, v, attn_mask=attn_mask)[0], dtype, device,
                   input_names=["query", "key", "value"])


RECORD = FusedOp(
    name="masked_attention",
    summary="masked cross-attention of transformer decoder layers (Mask2Former, Hugging Face, DETR/MaskFormer)",
    nn_class="MaskedCrossAttention",
    matches=_is_cross_attention,
    build=_build,
    probe=_probe,
    unsupported=_mha_unsupported,
    check=_check,
    bench=("masked-attention", "mask2former-decoder", "mask2former"),
)
