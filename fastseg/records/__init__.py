"""One record per fused op (:class:`FusedOp`), read by ``fastseg check``, ``fastseg.patch`` and the CLI.

A new op adds its record file here (recogniser, converter, probe inputs, check; see docs/adding_an_op.md)
and one line to ``_MODULES``. ``RECORDS`` keeps this order: the order ``patch`` tries recognisers in and
``fastseg check`` runs checks in.
"""
from __future__ import annotations

import importlib

from .fused_op import FusedOp, Probe, finish, randn, tolerance, where

__all__ = ["FusedOp", "Probe", "RECORDS", "get", "tolerance", "where", "randn", "finish"]

_MODULES = ("masked_attention", "mask_from_embeddings", "msca", "mlp_dwconv", "context_cluster", "upsample_ce",
            "ms_deform_attn", "ms_deform_attn_hf", "mask_loss", "cac", "atm_attention")

RECORDS: tuple[FusedOp, ...] = tuple(importlib.import_module(f"{__name__}.{m}").RECORD for m in _MODULES)


def get(name: str) -> FusedOp:
    """The record named ``name`` (``patch`` name with ``_`` or ``fastseg check`` name with ``-``)."""
    for r in RECORDS:
        if name in (r.name, r.check_name):
            return r
    raise KeyError(f"no fused op {name!r}; records: {', '.join(r.name for r in RECORDS)}")
