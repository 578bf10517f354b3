"""``ContextAwareClassifier``: CAC's classifier part (Tian et al., AAAI 2023) on fastseg's fused Triton ops.

Drop-in for :class:`fastseg.reference.cac.CACClassifier` (the classifier part of the official CAC heads:
``conv_seg``, ``dropout``, ``proj``, ``apd_proj``, same constructor and state_dict, which is that of
``FCNHeadCAC(in_channels=C, channels=C, num_convs=0, concat_input=False)``):

* ``forward(feat (B, C, h, w))`` → context-aware logits (B, K, h, w): soft prototypes from the softmax of
  ``conv_seg(dropout(feat))`` (Triton, no (B, K, h·w) probabilities stored), ``proj``, the cosine classifier
  (a Triton GEMM with the normalisations and τ = 15 in its prologue / epilogue);
* ``forward_train(feat, gt (B, 1, H, W) or (B, H, W) int64)`` → the official loss dict (``loss_ce`` = main CE +
  base CE + oracle CE + entropy-aware distillation, all fused; see :func:`fastseg.reference.cac.cac_train_losses`).

fp32 / fp16 / bf16 on CUDA (K ≤ 256 classes), fp64 under the interpreter; CPU tensors without the interpreter
run the reference math. Whole heads: ``head.set_fused(True)`` on fastseg's reference heads, or ``fastseg.patch``.
"""
from __future__ import annotations

from torch import nn

from ..ops import cac as _cac_ops
from ..reference.cac import CACClassifier

__all__ = ["ContextAwareClassifier"]


class ContextAwareClassifier(CACClassifier):
    """CAC's context-aware classifier, fused (see the module docstring; arguments as
    :class:`fastseg.reference.cac.CACClassifier`)."""

    impl = _cac_ops

    @classmethod
    def from_module(cls, m: nn.Module) -> "ContextAwareClassifier":
        """The drop-in for a classifier-only CAC module ``m`` (``conv_seg``, ``proj``, ``apd_proj``, optional
        ``dropout``): its weights, settings, device, dtype, ``requires_grad`` and train/eval mode."""
        drop = getattr(m, "dropout", None)
        new = cls(m.conv_seg.in_channels, m.conv_seg.out_channels,
                  dropout_ratio=drop.p if isinstance(drop, nn.Dropout2d) else 0.0,
                  ignore_index=getattr(m, "ignore_index", 255), align_corners=getattr(m, "align_corners", False),
                  loss_weight=getattr(m, "loss_weight", 1.0), tau=getattr(m, "tau", 15.0),
                  smoothness=getattr(m, "smoothness", 0.5), norm_eps=getattr(m, "norm_eps", 1e-12))
        sd = {k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("conv_seg", "proj", "apd_proj")}
        ref = m.conv_seg.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(sd, strict=True)
        flags = dict(m.named_parameters())
        for n, p in new.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n].requires_grad)
        return new.train(m.training)
