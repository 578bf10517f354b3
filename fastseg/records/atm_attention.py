"""Record of SegViT's ATM cross-attention (official ``Attention`` of ``decode_heads/atm_head.py``):
``fastseg.nn.ATMAttention``."""
from __future__ import annotations

import torch
from torch import nn

from .fused_op import FusedOp, Probe, randn

__all__ = ["RECORD"]


def _is_atm_attention(parent: nn.Module, name: str, m: nn.Module) -> bool:
    """The official layout: square ``q`` / ``k`` / ``v`` / ``proj`` linears of one width, ``attn_drop`` and
    ``proj_drop`` dropouts, ``num_heads`` dividing the width and a float ``scale``, and no other child. Other
    attentions with these names (a timm ``Attention`` has a fused ``qkv``) do not match; one that matches but
    computes something else fails the probe and is left alone."""
    lin = [getattr(m, n, None) for n in ("q", "k", "v", "proj")]
    if not all(type(x) is nn.Linear for x in lin):
        return False
    drops = [getattr(m, n, None) for n in ("attn_drop", "proj_drop")]
    if not all(type(x) is nn.Dropout for x in drops):
        return False
    if {n for n, _ in m.named_children()} != {"q", "k", "v", "proj", "attn_drop", "proj_drop"}:
        return False
    dim = lin[0].in_features
    heads, scale = getattr(m, "num_heads", None), getattr(m, "scale", None)
    if not isinstance(heads, int) or heads <= 0 or dim % heads or not isinstance(scale, (int, float)):
        return False
    biases = {x.bias is not None for x in lin[:3]}
    return all(x.in_features == dim and x.out_features == dim for x in lin) and len(biases) == 1


def _unsupported(m: nn.Module) -> str | None:
    if m.attn_drop.p >= 1.0:
        return f"attention dropout {m.attn_drop.p} (everything dropped) is not supported by the fused kernel"
    return None


def _build(cls, m: nn.Module) -> nn.Module:
    return cls.from_module(m)


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    """One image, 5 class queries, 13 keys (an odd token count), called as the ATM head does
    ``layer(xq, xk, xv)``. Compared: the output x and the head-mean logits (both outputs, so gradients
    flow from both), concatenated. With dropout, both run in eval mode (different random streams)."""
    C = m.q.in_features
    inputs = (randn((1, 5, C), g, device, dtype), randn((1, 13, C), g, device, dtype),
              randn((1, 13, C), g, device, dtype))

    def call(mod, xq, xk, xv):
        x, logits = mod(xq, xk, xv)
        return torch.cat([x.flatten(), logits.flatten().to(x.dtype)])

    train = False if (m.attn_drop.p > 0 or m.proj_drop.p > 0) else None
    return [Probe("xq (1, 5, C), xk = xv (1, 13, C): output and logits", inputs, call, train=train)]


def _check(device, dtype):
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require
    from fastseg.reference import ATMAttention as Reference

    cls = require("fastseg.nn", "ATMAttention", "the fused ATM attention lands with issue 18")
    C, nh, B, Nq, Nk = 48, 3, 2, 7, 37
    torch.manual_seed(0)
    ref = Reference(C, nh, qkv_bias=True)
    fused = cls(C, nh, qkv_bias=True)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, Nq, C, generator=g), torch.randn(B, Nk, C, generator=g),
              torch.randn(B, Nk, C, generator=g)]

    def call(m, xq, xk, xv):
        x, logits = m(xq, xk, xv)
        return torch.cat([x.flatten(), logits.flatten().to(x.dtype)])

    return compare(fused, ref, inputs, call, dtype, device, input_names=["xq", "xk", "xv"])


RECORD = FusedOp(
    name="atm_attention",
    summary="SegViT Attention-to-Mask cross-attention (output + head-mean pre-softmax logits)",
    nn_class="ATMAttention",
    matches=_is_atm_attention,
    build=_build,
    probe=_probe,
    unsupported=_unsupported,
    check=_check,
    bench=("atm-attention",),
)
