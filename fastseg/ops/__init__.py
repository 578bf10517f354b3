"""Differentiable fused ops (autograd over the Triton kernels, dispatched by :mod:`fastseg._backend`)."""
from . import cac
from .atm_attention import atm_attention
from .context_cluster import context_cluster, context_cluster_packed
from .mask_cost import matcher_mask_costs, matcher_mask_costs_batch, matcher_mask_costs_from_embeddings
from .masked_attention import PackedMask, mask_from_embeddings, masked_attention, pack_mask, unpack_mask
from .masked_attention import dropout_keep_mask, dropout_seed
from .mask_loss import mask_losses, mask_losses_from_embeddings
from .mlp_dwconv import dwconv3x3_gelu
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_from_offsets
from .msca import msca
from .upsample_ce import upsampled_cross_entropy

__all__ = [
    "PackedMask", "mask_from_embeddings", "masked_attention", "pack_mask", "unpack_mask",
    "dropout_keep_mask", "dropout_seed",
    "context_cluster", "context_cluster_packed", "msca", "dwconv3x3_gelu",
    "upsampled_cross_entropy", "cac", "ms_deform_attn", "ms_deform_attn_from_offsets",
    "mask_losses", "mask_losses_from_embeddings",
    "matcher_mask_costs", "matcher_mask_costs_from_embeddings", "matcher_mask_costs_batch",
    "atm_attention",
]
