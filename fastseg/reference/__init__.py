"""Faithful, readable PyTorch implementations that fastseg's kernels are tested against."""
from .masked_attention import (
    ReferenceMaskedCrossAttention,
    masked_attention,
    merge_masks,
    multi_head_attention,
)

__all__ = ["ReferenceMaskedCrossAttention", "masked_attention", "merge_masks", "multi_head_attention"]
from .msca import AttentionModule, msca_reference

__all__ += ["AttentionModule", "msca_reference"]
