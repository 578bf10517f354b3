"""Record of the fused mask builder ``fastseg.ops.mask_from_embeddings`` (query embeddings x mask features ->
bit-packed attention masks). No module of its own: ``patch`` applies it as the deeper patch of this project's
Mask2Former decoder (``fastseg.patch``)."""
from __future__ import annotations

import torch

from .fused_op import FusedOp

__all__ = ["RECORD"]


def _check(device, dtype):
    """The fused GEMM + sign-and-pack mask of a level vs the sign of the reference logits (fp64). Logits
    within rounding of 0 may differ in sign; every other bit must match."""
    from fastseg.bench.registry import require

    op = require("fastseg.ops", "mask_from_embeddings", "the fused mask builder lands with issue 3")
    unpack = require("fastseg.ops.masked_attention", "unpack_mask", "the fused mask builder lands with issue 3")
    g = torch.Generator().manual_seed(0)
    B, Q, C, h, w = 2, 7, 16, 5, 9
    emb, feat = torch.randn(B, Q, C, generator=g), torch.randn(B, C, h, w, generator=g)
    logits = torch.einsum("bqc,bcp->bqp", emb.double(), feat.flatten(2).double())
    allowed = unpack(op(emb.to(device, dtype), feat.to(device, dtype), reset_empty=False))[:, 0].cpu()
    eps = {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 0.5)  # half precision: inputs rounded
    decided = logits.abs() > eps
    wrong = int(((allowed != (logits >= 0)) & decided).sum())
    frac = wrong / max(1, int(decided.sum()))
    return [{"quantity": f"mask bits (of {int(decided.sum())} with |logit| > {eps:g})", "max_abs": float(wrong),
             "rel": frac, "tol": 0.0, "ok": wrong == 0}]


RECORD = FusedOp(
    name="mask_from_embeddings",
    summary="Mask2Former attention masks, bit-packed straight from query embeddings x mask features",
    check=_check,
    bench=("mask2former-decoder", "mask2former"),
)
