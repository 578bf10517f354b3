"""Drop-in for MSCAN's ``Mlp`` (fc1 → 3x3 depthwise → GELU → fc2) with the depthwise conv + bias + GELU fused."""
from __future__ import annotations

from torch import nn

from ..models.mscan import Mlp
from ..ops.mlp_dwconv import dwconv3x3_gelu

__all__ = ["MSCANMlp"]


class MSCANMlp(Mlp):
    """``MSCANMlp(in_features, hidden_features, out_features, act_layer=nn.GELU, drop=0.)``: same parameters and
    state_dict as SegNeXt's ``Mlp``; input/output (N, C, H, W), NCHW or channels_last."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (isinstance(self.act, nn.GELU) and self.act.approximate == "none"):
            raise ValueError("MSCANMlp fuses the exact (erf) GELU only")

    def forward(self, x):
        x = self.fc1(x)
        x = dwconv3x3_gelu(x, self.dwconv.dwconv.weight, self.dwconv.dwconv.bias)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x
