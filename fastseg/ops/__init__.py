"""Differentiable fused ops (autograd over the Triton kernels, dispatched by :mod:`fastseg._backend`)."""
from .atm_attention import atm_attention
from .context_cluster import context_cluster, context_cluster_packed
from .masked_attention import PackedMask, mask_from_embeddings, masked_attention, pack_mask, unpack_mask
from .masked_attention import dropout_keep_mask, dropout_seed
from .mlp_dwconv import dwconv3x3_gelu
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_from_offsets
from .msca import msca
from .upsample_ce import upsampled_cross_entropy

__all__ = [
    "PackedMask", "mask_from_embeddings", "masked_attention", "pack_mask", "unpack_mask",
    "dropout_keep_mask", "dropout_seed",
    "context_cluster", "context_cluster_packed", "msca", "dwconv3x3_gelu",
    "upsampled_cross_entropy", "ms_deform_attn", "ms_deform_attn_from_offsets",
    "atm_attention",
]
