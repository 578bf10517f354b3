"""Faithful, readable PyTorch implementations that fastseg's kernels are tested against."""
from .atm_attention import ATMAttention, atm_attention
from .cac import (CACClassifier, cac_train_losses, cosine_logits, entropy_distill_loss, oracle_logits, refine_logits,
                  soft_class_prototypes)
from .ecenet import class_mask_fusion, diversity_loss, sau_attention
from .context_cluster import Cluster, cluster_core, pairwise_cos_sim
from .masked_attention import (
    ReferenceMaskedCrossAttention,
    masked_attention,
    merge_masks,
    multi_head_attention,
)
from .ms_deform_attn import ReferenceMSDeformAttn, ms_deform_attn_core_pytorch
from .msca import AttentionModule, msca_reference

__all__ = [
    "ATMAttention", "atm_attention",
    "CACClassifier", "cac_train_losses", "cosine_logits", "entropy_distill_loss", "oracle_logits", "refine_logits",
    "soft_class_prototypes",
    "class_mask_fusion", "diversity_loss", "sau_attention",
    "Cluster", "cluster_core", "pairwise_cos_sim",
    "ReferenceMaskedCrossAttention", "masked_attention", "merge_masks", "multi_head_attention",
    "AttentionModule", "msca_reference",
    "ReferenceMSDeformAttn", "ms_deform_attn_core_pytorch",
]
