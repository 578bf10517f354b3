"""Record of SegNeXt's multi-scale conv attention: ``fastseg.nn.MSCA``."""
from __future__ import annotations

import torch
from torch import nn

from .fused_op import FusedOp, Probe, finish, randn

__all__ = ["RECORD"]

_MSCA_CONVS = {  # name -> (kernel size, depthwise)
    "conv0": ((5, 5), True), "conv0_1": ((1, 7), True), "conv0_2": ((7, 1), True),
    "conv1_1": ((1, 11), True), "conv1_2": ((11, 1), True), "conv2_1": ((1, 21), True),
    "conv2_2": ((21, 1), True), "conv3": ((1, 1), False),
}


def _is_msca(parent: nn.Module, name: str, m: nn.Module) -> bool:
    """Official ``AttentionModule`` and mmsegmentation ``MSCAAttention`` layouts (convs ``conv0`` … ``conv3``)."""
    convs = {n: getattr(m, n, None) for n in _MSCA_CONVS}
    if not all(isinstance(c, nn.Conv2d) for c in convs.values()):
        return False
    dim = convs["conv0"].in_channels
    for n, (k, dw) in _MSCA_CONVS.items():
        c = convs[n]
        if c.in_channels != dim or c.out_channels != dim or tuple(c.kernel_size) != k or (dw and c.groups != dim):
            return False
    return True


def _build(cls, m: nn.Module) -> nn.Module:
    if hasattr(cls, "from_module"):
        return cls.from_module(m)
    return finish(cls(m.conv0.in_channels), m)


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    """One image, the module's channels, 7 x 9 pixels (zero padding: any size is valid; smaller than the
    21-tap strips, so every tap meets the border)."""
    x = randn((1, m.conv0.in_channels, 7, 9), g, device, dtype)
    return [Probe("x (1, C, 7, 9)", (x,), lambda mod, x: mod(x))]


def _check(device, dtype):
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    cls = require("fastseg.nn", "MSCA", "the fused MSCA lands with issue 4")
    ref_cls = require("fastseg.reference", "AttentionModule", "the MSCA reference lands with issue 4")
    torch.manual_seed(0)
    ref = ref_cls(8)
    fused = cls(8)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 13, 11, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


RECORD = FusedOp(
    name="msca",
    summary="SegNeXt multi-scale strip-conv attention (official AttentionModule, mmseg MSCAAttention)",
    nn_class="MSCA",
    matches=_is_msca,
    build=_build,
    probe=_probe,
    check=_check,
    bench=("msca", "mscan"),
)
