"""Drop-in replacement for SegNeXt's ``AttentionModule`` running the fused Triton kernels."""
from __future__ import annotations

import torch

from ..ops.msca import DW_NAMES, msca
from ..reference.msca import AttentionModule

__all__ = ["MSCA"]


class MSCA(AttentionModule):
    """``MSCA(channels)``: same parameters and state_dict keys as SegNeXt's ``AttentionModule(dim)``.

    Input (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; output of the same shape, dtype and format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"MSCA expects a 4-D (N, C, H, W) input, got shape {tuple(getattr(x, 'shape', ()))}")
        C = self.conv3.in_channels
        if x.shape[1] != C:
            raise ValueError(f"MSCA({C}) got an input with {x.shape[1]} channels (shape {tuple(x.shape)})")
        convs = [getattr(self, n) for n in DW_NAMES]
        return msca(x, [m.weight for m in convs], [m.bias for m in convs], self.conv3.weight, self.conv3.bias)
