"""Reference models (plain PyTorch).

* :func:`build_mask2former` / :class:`Mask2Former` (``set_fused(True)`` for the memory-lean path),
  :class:`Mask2FormerDecoder` (the masked-attention decoder alone) and :func:`build_mask2former_criterion`.
* :func:`build_maskformer` / :class:`MaskFormer`.
* :func:`mask2former_from_hf`: the reference model from a Hugging Face Mask2Former (same weights).
* :func:`load_official`: official checkpoints (detectron2 Mask2Former, mmseg SegNeXt, Context Cluster) into
  these models, strict, with the keys that do not fit named (:mod:`fastseg.models.checkpoints`).
* SegNeXt: the MSCAN encoder (:func:`mscan_t` ...) and the light Hamburger head (:func:`segnext_t` ...);
  ``fused=True`` swaps in :class:`fastseg.nn.MSCA`, ``fused="all"`` also the fused MLP.
* Context Cluster networks (:func:`coc_tiny` ...; ``fused=True`` swaps in the Triton modules).
* CAC (context-aware classifier; `head.set_fused(True)` runs it on fastseg.ops.cac): :class:`FCNHeadCAC`, :class:`UPerHeadCAC`,
  :class:`DepthwiseSeparableASPPHeadCAC`, :class:`LightHamHeadCAC`, :class:`CACSegmentor`, :func:`segnext_t_cac` ....
* ECENet (reference only): :class:`ECENetHead`, :class:`ECENetSegmentor`, :func:`mscan_t_ecenet` ....
* SegViT (reference): :func:`segvit_vit_t` / ``_s`` / ``_b`` / ``_l`` / :func:`build_segvit` (``structure=
  "plain" | "shrunk" | "shrunk++"``), :class:`SegViT`, :class:`ATMHead`, :class:`TPNATMHead`, :class:`ATMLoss`,
  the mmseg-named :class:`VisionTransformer` / :class:`ViTShrink`, SegViTv2's :class:`ViTShrunkPlus`.
* :class:`TinyResNet`: small backbone for tests.
"""
from .backbones import TinyResNet, backbone_from_name
from .cac import (CACSegmentor, DepthwiseSeparableASPPHeadCAC, FCNHeadCAC, LightHamHeadCAC, UPerHeadCAC, segnext_b_cac,
                  segnext_l_cac, segnext_s_cac, segnext_t_cac)
from .context_cluster import ContextClusterNet, coc_medium, coc_small, coc_tiny
from .ecenet import ECENetHead, ECENetSegmentor, mscan_b_ecenet, mscan_l_ecenet, mscan_s_ecenet, mscan_t_ecenet
from .checkpoints import CheckpointMismatchError, load_official
from .convert import mask2former_from_hf
from .criterion import SetCriterion
from .ham_head import LightHamHead, SegNeXt, segnext_b, segnext_l, segnext_s, segnext_t
from .mask2former import (Mask2Former, Mask2FormerDecoder, MultiScaleMaskedTransformerDecoder,
                          build_mask2former, build_mask2former_criterion)
from .maskformer import MaskFormer, build_maskformer
from .matcher import HungarianMatcher
from .mscan import MSCAN, mscan_b, mscan_l, mscan_s, mscan_t, use_fused_msca
from .pixel_decoder import BasePixelDecoder, MSDeformAttnPixelDecoder
from .atm_head import ATMHead, ATMSingleHead, TPNATMHead, TPNDecoder, TPNDecoderLayer
from .atm_loss import ATMLoss
from .segvit import SegViT, build_segvit, segvit_vit_b, segvit_vit_l, segvit_vit_s, segvit_vit_t
from .vit import ViTShrink, VisionTransformer
from .vit_shrunk_plus import ViTShrunkPlus
from . import fused, inference

__all__ = [
    "TinyResNet", "backbone_from_name", "SetCriterion", "HungarianMatcher", "Mask2Former", "Mask2FormerDecoder",
    "MultiScaleMaskedTransformerDecoder", "build_mask2former", "build_mask2former_criterion", "BasePixelDecoder",
    "MSDeformAttnPixelDecoder", "fused", "inference", "MaskFormer", "build_maskformer", "mask2former_from_hf",
    "load_official", "CheckpointMismatchError",
    "ContextClusterNet", "coc_tiny", "coc_small", "coc_medium",
    "MSCAN", "mscan_t", "mscan_s", "mscan_b", "mscan_l", "use_fused_msca",
    "LightHamHead", "SegNeXt", "segnext_t", "segnext_s", "segnext_b", "segnext_l",
    "CACSegmentor", "FCNHeadCAC", "UPerHeadCAC", "DepthwiseSeparableASPPHeadCAC", "LightHamHeadCAC",
    "segnext_t_cac", "segnext_s_cac", "segnext_b_cac", "segnext_l_cac",
    "ECENetHead", "ECENetSegmentor", "mscan_t_ecenet", "mscan_s_ecenet", "mscan_b_ecenet", "mscan_l_ecenet",
    "ATMHead", "ATMSingleHead", "TPNATMHead", "TPNDecoder", "TPNDecoderLayer", "ATMLoss", "SegViT", "build_segvit",
    "segvit_vit_t", "segvit_vit_s", "segvit_vit_b", "segvit_vit_l", "VisionTransformer", "ViTShrink",
    "ViTShrunkPlus",
]
