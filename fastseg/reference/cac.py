"""CAC, the context-aware classifier (Tian et al., AAAI 2023): its building blocks in plain PyTorch.

Faithful to tianzhuotao/CAC ``mmseg/models/decode_heads/fcn_head_cac.py`` (``FCNHeadCAC``; the ASPP, OCR and
UPer heads carry the same code): ``post_refine_proto_v2`` (soft class prototypes → projector → cosine
classifier), ``get_pred`` (the cosine classifier, scaled by τ = 15), ``get_adaptive_perspective`` (the oracle
classifier whose prototypes come from the ground truth) and ``get_distill_loss`` (entropy-weighted, per-class
averaged distillation from the oracle). The whole heads live in :mod:`fastseg.models.cac_head`.

Shapes: ``feat`` (B, C, h, w) pixel features; ``logits`` (B, K, h, w); classifier weights (K, C); labels
(B, H, W) or (B, 1, H, W) int64 with values in [0, K) or ``ignore_index``, nearest-resized to (h, w) as the
original does. Any float dtype; fp16 / bf16 inputs have the pooled statistics of the oracle and the
distillation (class counts and sums over up to B·h·w pixels, entropies, the per-class reductions) computed in
float32 (in fp16 a class covering 65 505 pixels would count to inf).

:func:`cac_train_losses` composes the official training losses from these blocks (or from the same-named fused
ops of :mod:`fastseg.ops.cac`, its ``impl``); :class:`CACClassifier` is the classifier part of a CAC head as a
module (``conv_seg``, ``dropout``, ``proj``, ``apd_proj``: the official names) on decoder features, the reference
of the drop-in :class:`fastseg.nn.ContextAwareClassifier`.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TAU", "SMOOTHNESS", "cac_projector", "soft_class_prototypes", "cosine_logits", "refine_logits",
           "resize_labels", "oracle_class_prototypes", "oracle_logits", "entropy_distill_loss", "mmseg_accuracy",
           "cac_train_losses", "CACClassifier"]

#: the cosine classifier's scale (``get_pred`` / ``get_adaptive_perspective`` multiply by 15)
TAU = 15.0
#: the distillation's label smoothness (``get_distill_loss(smoothness=0.5)``)
SMOOTHNESS = 0.5
_EPS = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cac_projector(channels: int) -> nn.Sequential:
    """The official ``proj`` / ``apd_proj``: Linear(2C, C/2, no bias) → ReLU → Linear(C/2, C) (keys 0.weight,
    2.weight, 2.bias), PyTorch's default init as in the original."""
    return nn.Sequential(nn.Linear(channels * 2, channels // 2, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(channels // 2, channels))


def soft_class_prototypes(feat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image class prototypes: pixel features averaged with the per-pixel softmax over classes as weights.

    ``feat`` (B, C, h, w), ``logits`` (B, K, h, w) → (B, K, C):
    Σ_p softmax(logits)_kp f_p / (Σ_p softmax_kp + 1e-12).
    """
    b, c, h, w = feat.shape
    if logits.dim() != 4 or logits.shape[0] != b or logits.shape[2:] != feat.shape[2:]:
        raise ValueError(f"soft_class_prototypes: logits {tuple(logits.shape)} do not match feat {tuple(feat.shape)}")
    prob = logits.reshape(b, logits.shape[1], h * w).softmax(1)  # B, K, hw
    pooled = prob @ feat.reshape(b, c, h * w).transpose(1, 2)  # B, K, C
    return pooled / (prob.sum(-1, keepdim=True) + _EPS)


def cosine_logits(feat: torch.Tensor, proto: torch.Tensor, tau: float = TAU, norm_eps: float = _EPS) -> torch.Tensor:
    """``get_pred``: τ · cos(f_p, proto_k), each side divided by (its L2 norm + ``norm_eps``).

    ``feat`` (B, C, h, w), ``proto`` (K, C) shared or (B, K, C) per image → (B, K, h, w), values in [-τ, τ].
    ``norm_eps``: 1e-12 in the FCN and UPer heads, 0 in the ASPP and OCR heads (the bare norm).
    """
    b, c, h, w = feat.shape
    if proto.dim() not in (2, 3) or proto.shape[-1] != c:
        raise ValueError(f"cosine_logits: proto {tuple(proto.shape)} must be (K, {c}) or (B, K, {c})")
    x = feat / (torch.norm(feat, 2, 1, True) + norm_eps)
    p = proto / (torch.norm(proto, 2, -1, True) + norm_eps)
    if p.dim() == 2:
        p = p.unsqueeze(0)
    pred = p @ x.reshape(b, c, h * w)  # B, K, hw
    return pred.reshape(b, p.shape[-2], h, w) * tau


def refine_logits(feat: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, proj: nn.Module,
                  tau: float = TAU, norm_eps: float = _EPS) -> torch.Tensor:
    """``post_refine_proto_v2``: the context-aware classifier's logits (B, K, h, w).

    Soft prototypes of ``logits`` (the shared classifier's prediction), concatenated with the classifier
    ``weight`` (K, C), mapped by ``proj`` (2C → C) to per-image class weights, then :func:`cosine_logits`.
    """
    proto = soft_class_prototypes(feat, logits)
    proto = torch.cat([proto, weight.unsqueeze(0).expand(proto.shape[0], -1, -1)], -1)  # B, K, 2C
    return cosine_logits(feat, proj(proto), tau, norm_eps)


def resize_labels(labels: torch.Tensor, size, num_classes: int | None = None,
                  ignore_index: int = 255) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) labels → (B, h, w) int64 by ``F.interpolate(mode='nearest')`` (as the original).

    With ``num_classes``, a label outside [0, K) that is not ``ignore_index`` raises ValueError (the original
    fails with an index error on those).
    """
    if labels.dim() == 3:
        labels = labels.unsqueeze(1)
    if labels.dim() != 4 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, H, W) or (B, 1, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    out = F.interpolate(labels.float(), size=tuple(size), mode="nearest").squeeze(1).long()
    if num_classes is not None and not torch.compiler.is_compiling():  # a host read: skipped while compiling
        bad = (out != ignore_index) & ((out < 0) | (out >= num_classes))
        if bad.any():
            raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}; "
                             f"found {out[bad].unique().tolist()[:8]}")
    return out


def oracle_class_prototypes(feat: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                            ignore_index: int = 255) -> torch.Tensor:
    """The oracle's class table of ``get_adaptive_perspective``: (K, C).

    Row k is the mean feature of the pixels labelled k over the whole batch (labels nearest-resized to the
    feature size, ``ignore_index`` left out) where class k is present, else ``weight[k]`` (the original passes the
    classifier's weights detached; so does :func:`oracle_logits`).
    """
    b, c, h, w = feat.shape
    k = weight.shape[0]
    acc = _acc_dtype(feat.dtype)
    y = resize_labels(labels, (h, w), k, ignore_index).reshape(-1)  # B*h*w
    valid = y != ignore_index
    onehot = F.one_hot(torch.where(valid, y, 0), k).to(acc) * valid.unsqueeze(1).to(acc)  # N, K
    x = feat.permute(0, 2, 3, 1).reshape(-1, c).to(acc)  # N, C
    count = onehot.sum(0)  # K
    mean = (onehot.t() @ x) / (count.unsqueeze(1) + _EPS)  # K, C
    return torch.where((count > 0).unsqueeze(1), mean, weight.to(acc)).to(feat.dtype)


def oracle_logits(feat: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, apd_proj: nn.Module,
                  tau: float = TAU, ignore_index: int = 255) -> torch.Tensor:
    """``get_adaptive_perspective``: the oracle classifier's logits (B, K, h, w) (training only).

    Table = :func:`oracle_class_prototypes` with ``weight.detach()`` for absent classes, concatenated with
    ``weight`` (K, C; gradients flow), ``apd_proj`` (2C → C), then τ · cos with ``F.normalize`` on both sides
    (eps 1e-12 as a floor of the norm, unlike :func:`cosine_logits`, exactly as the original).
    """
    table = oracle_class_prototypes(feat, labels, weight.detach(), ignore_index)
    proto = apd_proj(torch.cat([table, weight], -1))  # K, C
    proto = F.normalize(proto, 2, 1)
    x = F.normalize(feat, 2, 1)
    return torch.einsum("kc,bchw->bkhw", proto, x) * tau


def entropy_distill_loss(pred: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                         smoothness: float = SMOOTHNESS, ignore_index: int = 255, eps: float = 0.0) -> torch.Tensor:
    """``get_distill_loss``: the context-aware prediction learns from the oracle's (scalar loss).

    ``pred``, ``teacher`` (B, K, h, w) logits (``teacher`` is detached), labels nearest-resized to (h, w).
    Per pixel: cross-entropy of ``pred`` against ``smoothness · softmax(teacher) + (1 − smoothness) · onehot``
    (``eps`` > 0: the original's optional extra label smoothing, off by default), weighted by the teacher's
    entropy −Σ p log(p + 1e-12). Per class present (ignored pixels excluded): Σ w·loss / (Σ w + 1e-12); the
    result is the mean over those classes (sum / (n + 1e-12)), 0 without any labelled pixel. Float32 for fp16 /
    bf16 inputs, else the input dtype.
    """
    if pred.shape != teacher.shape or pred.dim() != 4:
        raise ValueError(f"entropy_distill_loss: pred {tuple(pred.shape)} and teacher {tuple(teacher.shape)} "
                         "must be the same (B, K, h, w)")
    b, k, h, w = pred.shape
    acc = _acc_dtype(pred.dtype)
    y = resize_labels(labels, (h, w), k, ignore_index)  # B, h, w
    valid = y != ignore_index
    soft = teacher.detach().to(acc).softmax(1)
    onehot = F.one_hot(torch.where(valid, y, 0), k).permute(0, 3, 1, 2).to(acc)  # ignored -> class 0
    target = smoothness * soft + (1 - smoothness) * onehot
    if eps > 0:
        target = target * (1 - eps) + (1 - target) * eps / (k - 1)
    loss = -(F.log_softmax(pred.to(acc), dim=1) * target).sum(1)  # B, h, w
    entropy = -(soft * torch.log(soft + 1e-12)).sum(1) * valid.to(soft.dtype)  # B, h, w
    member = F.one_hot(torch.where(valid, y, 0), k).reshape(-1, k).to(soft.dtype)
    member = member * valid.reshape(-1, 1).to(soft.dtype)  # N, K
    num = (loss * entropy).reshape(1, -1) @ member  # 1, K
    den = entropy.reshape(1, -1) @ member
    present = member.sum(0) > 0
    if not present.any():
        return pred.new_zeros((), dtype=acc)
    per_class = (num / (den + 1e-12)).reshape(k)[present]
    return per_class.sum() / (present.sum().to(per_class.dtype) + 1e-12)  # float32 for fp16 / bf16 inputs


def mmseg_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmseg's top-1 ``accuracy`` (in %) as the original's mmseg 0.19 computes it: over all pixels, an ignored
    pixel counting as wrong. ``logits`` (B, K, H, W), ``labels`` (B, H, W)."""
    correct = logits.argmax(1).eq(labels).float().sum()
    return correct * (100.0 / labels.numel())


def cac_train_losses(base: torch.Tensor, feat: torch.Tensor, gt: torch.Tensor, weight: torch.Tensor,
                     proj: nn.Module, apd_proj: nn.Module, *, tau: float = TAU, norm_eps: float = _EPS,
                     smoothness: float = SMOOTHNESS, ignore_index: int = 255, align_corners: bool = False,
                     loss_weight: float = 1.0, impl=None) -> dict:
    """The official ``forward_train`` losses of a CAC head from its base logits and features.

    ``base`` (B, K, h, w) = ``conv_seg(dropout(feat))``, ``feat`` (B, C, h, w), ``gt`` (B, 1, H, W) or (B, H, W)
    int64 labels at the image size, ``weight`` (K, C) the classifier's weights. Returns ``loss_ce`` (the total
    ``CE(refined)·loss_weight + CE(base) + CE(oracle) + distillation``), ``acc_seg`` and the detached
    ``PreSelfLoss`` / ``PreLoss`` / ``KLLoss`` / ``MainLoss``.

    ``impl``: where ``refine_logits``, ``oracle_logits`` and ``entropy_distill_loss`` come from (None: this
    module; :mod:`fastseg.ops.cac` for the fused ones). When ``impl`` has ``upsampled_cross_entropy``, the three
    full-resolution cross-entropies use it (no (B, K, H, W) upsampled logits stored); else ``F.interpolate`` +
    ``F.cross_entropy`` as the original.
    """
    impl = sys.modules[__name__] if impl is None else impl
    y = gt.unsqueeze(1) if gt.dim() == 3 else gt
    refined = impl.refine_logits(feat, base, weight, proj, tau, norm_eps)
    oracle = impl.oracle_logits(feat, y, weight, apd_proj, tau, ignore_index)
    kl_loss = impl.entropy_distill_loss(refined, oracle.detach(), y, smoothness, ignore_index)
    labels = y.squeeze(1).long()  # (B, H, W); the reference's oracle_logits has checked the values (fused: NaN)
    ce = getattr(impl, "upsampled_cross_entropy", None)
    if ce is not None:
        n_valid = (labels != ignore_index).sum()  # 0 gives NaN, as nn.CrossEntropyLoss
        pre_self_loss = ce(base, labels, True, ignore_index).sum() / n_valid
        pre_loss = ce(oracle, labels, True, ignore_index).sum() / n_valid
        main = ce(refined, labels, align_corners, ignore_index).mean()
        with torch.no_grad():  # the logged accuracy, one image at a time
            correct = sum(F.interpolate(refined[i:i + 1], size=labels.shape[-2:], mode="bilinear",
                                        align_corners=align_corners).argmax(1).eq(labels[i:i + 1]).sum()
                          for i in range(labels.shape[0]))
            acc = correct.float() * (100.0 / labels.numel())
    else:
        # the original's extra cross-entropies: align_corners=True, mean over the labelled pixels
        base_up = F.interpolate(base, size=y.shape[-2:], mode="bilinear", align_corners=True)
        pre_self_loss = F.cross_entropy(base_up, labels, ignore_index=ignore_index)
        oracle_up = F.interpolate(oracle, size=y.shape[-2:], mode="bilinear", align_corners=True)
        pre_loss = F.cross_entropy(oracle_up, labels, ignore_index=ignore_index)
        # BaseDecodeHead.losses: the head's align_corners, mmseg's CrossEntropyLoss (mean over ALL pixels)
        refined_up = F.interpolate(refined, size=y.shape[-2:], mode="bilinear", align_corners=align_corners)
        main = F.cross_entropy(refined_up, labels, ignore_index=ignore_index, reduction="none").mean()
        acc = mmseg_accuracy(refined_up.detach(), labels)
    main = main * loss_weight
    return {
        "loss_ce": main + pre_self_loss + pre_loss + kl_loss,
        "acc_seg": acc,
        "PreSelfLoss": pre_self_loss.detach(),
        "PreLoss": pre_loss.detach(),
        "KLLoss": kl_loss.detach(),
        "MainLoss": main.detach(),
    }


class CACClassifier(nn.Module):
    """The classifier part of a CAC head on decoder features (reference, plain PyTorch).

    Parameters with the official names: ``conv_seg`` (1×1 conv C → K, normal(0, 0.01) weights, zero bias as
    mmseg), ``proj`` and ``apd_proj`` (:func:`cac_projector`); ``dropout`` (Dropout2d) before ``conv_seg``.
    Its state_dict is that of ``FCNHeadCAC(in_channels=C, channels=C, num_convs=0, concat_input=False)``.

    * ``forward(feat (B, C, h, w))`` → the context-aware logits (B, K, h, w) (``forward_test``);
    * ``forward_train(feat, gt)`` → the official loss dict (:func:`cac_train_losses`);
    * ``base_forward(feat)`` → (base logits, feat).

    ``norm_eps``: ``get_pred``'s eps, 1e-12 (FCN, UPer heads) or 0 (ASPP, OCR heads).
    """

    #: where the classifier math comes from (:mod:`fastseg.ops.cac` in the fused drop-in); None = this module
    impl = None

    def __init__(self, channels: int = 512, num_classes: int = 150, dropout_ratio: float = 0.1,
                 ignore_index: int = 255, align_corners: bool = False, loss_weight: float = 1.0, tau: float = TAU,
                 smoothness: float = SMOOTHNESS, norm_eps: float = _EPS):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.proj = cac_projector(channels)
        self.apd_proj = cac_projector(channels)
        self.channels, self.num_classes = channels, num_classes
        self.ignore_index, self.align_corners, self.loss_weight = ignore_index, align_corners, loss_weight
        self.tau, self.smoothness, self.norm_eps = tau, smoothness, norm_eps

    def _impl(self):
        return sys.modules[__name__] if self.impl is None else self.impl

    @property
    def classifier_weight(self) -> torch.Tensor:
        """``conv_seg.weight`` as (K, C)."""
        return self.conv_seg.weight.flatten(1)

    def base_forward(self, feat: torch.Tensor):
        return self.conv_seg(self.dropout(feat)), feat

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        base, feat = self.base_forward(feat)
        return self._impl().refine_logits(feat, base, self.classifier_weight, self.proj, self.tau, self.norm_eps)

    def forward_train(self, feat: torch.Tensor, gt_semantic_seg: torch.Tensor) -> dict:
        base, feat = self.base_forward(feat)
        return cac_train_losses(base, feat, gt_semantic_seg, self.classifier_weight, self.proj, self.apd_proj,
                                tau=self.tau, norm_eps=self.norm_eps, smoothness=self.smoothness,
                                ignore_index=self.ignore_index, align_corners=self.align_corners,
                                loss_weight=self.loss_weight, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_classes={self.num_classes}, tau={self.tau}, "
                f"norm_eps={self.norm_eps}")
