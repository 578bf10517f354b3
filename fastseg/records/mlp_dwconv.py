"""Record of MSCAN's MLP 3x3 depthwise conv + bias + GELU: ``fastseg.nn.MSCANMlp`` (check and bench only:
``patch`` does not swap MLPs; ``fastseg.models.mscan_*(fused=True)`` builds them)."""
from __future__ import annotations

import torch

from .fused_op import FusedOp

__all__ = ["RECORD"]


def _check(device, dtype):
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    cls = require("fastseg.nn", "MSCANMlp", "the fused MLP depthwise conv lands with issue 4")
    ref_cls = require("fastseg.models.mscan", "Mlp", "the MSCAN reference lands with issue 4")
    torch.manual_seed(0)
    ref = ref_cls(8, 16)
    fused = cls(8, 16)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 9, 13, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


RECORD = FusedOp(
    name="mlp_dwconv",
    summary="MSCAN MLP: 3x3 depthwise conv + bias + exact GELU fused",
    nn_class="MSCANMlp",
    check=_check,
    bench=("mlp-dwconv", "mscan"),
)
