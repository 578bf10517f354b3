"""CAC decode heads (reference, plain PyTorch): FCN, UPerNet and DeepLabV3+ heads with CAC, and SegNeXt's Ham head.

Faithful to tianzhuotao/CAC ``mmseg/models/decode_heads/fcn_head_cac.py`` (``FCNHeadCAC`` on mmsegmentation's
``BaseDecodeHead``), ``uper_head_cac.py`` (``UPerHeadCAC``) and ``sep_aspp_head_cac.py``
(``DepthwiseSeparableASPPHeadCAC``), without mmcv/mmseg: the same parameter names (``convs.0.conv.weight``,
``convs.0.bn.*``, ``conv_cat.*``, ``psp_modules.0.1.conv.weight``, ``lateral_convs.*``,
``aspp_modules.1.depthwise_conv.*``, ``proj.*``, ``apd_proj.*``, ``conv_seg.*`` ...), so the official state_dicts
load strictly.
The math is in :mod:`fastseg.reference.cac` (the losses: :func:`~fastseg.reference.cac.cac_train_losses`).
``head.set_fused(True)`` runs the classifier as fastseg's fused Triton ops (:mod:`fastseg.ops.cac`: soft
prototypes, cosine classifiers, oracle, distillation, and the three full-resolution cross-entropies as
:func:`fastseg.ops.upsampled_cross_entropy`); ``fastseg.patch`` does that for a model (records/cac.py).

* ``head(inputs)`` → the context-aware logits (B, K, h, w) at the feature size (the official ``forward_test``);
* ``head.forward_train(inputs, gt)`` → the official loss dict: ``loss_ce`` is the total
  ``CE(refined) · loss_weight + CE(base, "PreSelfLoss") + CE(oracle, "PreLoss") + distill ("KLLoss")``, with
  ``MainLoss`` / ``PreSelfLoss`` / ``PreLoss`` / ``KLLoss`` (detached, for logging) and ``acc_seg``.
* ``head.base_forward(inputs)`` → (base logits, features): what the official ``forward`` returns.

``inputs``: a list of backbone features (the head picks ``in_index``) or one (B, C_in, h, w) tensor;
``gt``: (B, 1, H, W) or (B, H, W) int64 labels at the image size, ``ignore_index`` (255) ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.cac import (SMOOTHNESS, TAU, cac_projector, cac_train_losses, cosine_logits, mmseg_accuracy,
                             oracle_logits, refine_logits)
from ..reference.conv_module import ConvModule
from .ham_head import LightHamHead

__all__ = ["ConvModule", "DepthwiseSeparableConvModule", "CACHeadMixin", "FCNHeadCAC", "UPerHeadCAC",
           "DepthwiseSeparableASPPHeadCAC", "LightHamHeadCAC", "mmseg_accuracy"]


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's ``DepthwiseSeparableConvModule``: ``depthwise_conv`` (k×k, groups = C_in) and ``pointwise_conv``
    (1×1), each a :class:`ConvModule` with BN and ReLU (mmcv's defaults)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                                          groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class CACHeadMixin:
    """The context-aware classifier on top of any head that defines ``base_forward(inputs) -> (logits, feat)``
    and ``conv_seg`` (1x1 conv, K × C). Adds ``proj`` and ``apd_proj`` (official names) via :meth:`_init_cac`."""

    def _init_cac(self, channels: int, num_classes: int, ignore_index: int = 255, align_corners: bool = False,
                  loss_weight: float = 1.0, tau: float = TAU, smoothness: float = SMOOTHNESS,
                  norm_eps: float = 1e-12):
        self.proj = cac_projector(channels)
        self.apd_proj = cac_projector(channels)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.loss_weight = loss_weight
        self.tau = tau
        self.smoothness = smoothness
        self.norm_eps = norm_eps  # get_pred's eps: 1e-12 (FCN, UPer heads) or 0 (ASPP, OCR heads)
        self.fused = False

    def set_fused(self, fused: bool = True):
        """``True``: the classifier runs as fastseg's fused ops (:mod:`fastseg.ops.cac`: Triton soft prototypes,
        cosine classifiers, oracle prototypes, distillation, and the three full-resolution cross-entropies as
        :func:`fastseg.ops.upsampled_cross_entropy`), in inference and training. Same results and gradients."""
        self.fused = bool(fused)
        return self

    def _impl(self):
        if not self.fused:
            return None
        from ..ops import cac

        return cac

    @property
    def classifier_weight(self) -> torch.Tensor:
        """``conv_seg.weight`` as (K, C) (the original's ``conv_seg.weight.squeeze()``)."""
        return self.conv_seg.weight.flatten(1)

    def forward(self, inputs) -> torch.Tensor:
        """The context-aware logits (B, K, h, w) at the feature size (official ``forward_test``)."""
        base, feat = self.base_forward(inputs)
        impl = self._impl()
        fn = refine_logits if impl is None else impl.refine_logits
        return fn(feat, base, self.classifier_weight, self.proj, self.tau, self.norm_eps)

    forward_test = forward

    def forward_train(self, inputs, gt_semantic_seg: torch.Tensor) -> dict:
        """The official ``forward_train`` losses (see the module docstring); ``loss_ce`` is the total."""
        base, feat = self.base_forward(inputs)
        return cac_train_losses(base, feat, gt_semantic_seg, self.classifier_weight, self.proj, self.apd_proj,
                                tau=self.tau, norm_eps=self.norm_eps, smoothness=self.smoothness,
                                ignore_index=self.ignore_index, align_corners=self.align_corners,
                                loss_weight=self.loss_weight, impl=self._impl())

    # the official method names, for readers comparing with the original
    def get_pred(self, x, proto):
        return cosine_logits(x, proto, self.tau, self.norm_eps)

    def post_refine_proto_v2(self, x, pred, proto):
        return refine_logits(x, pred, proto, self.proj, self.tau, self.norm_eps)

    def get_adaptive_perspective(self, x, y, proto):
        return oracle_logits(x, y, proto, self.apd_proj, self.tau, self.ignore_index)


def _select(inputs, in_index: int):
    if isinstance(inputs, torch.Tensor):
        return inputs
    return inputs[in_index]


class FCNHeadCAC(CACHeadMixin, nn.Module):
    """FCN head (``num_convs`` ConvModules, optional concat with the input) with the context-aware classifier.

    Defaults are the official ADE20K config (``fcn_m-v2-d8_512x512_160k_ade20k_cac``: in_channels 320,
    channels 512, 2 convs, concat_input, dropout 0.1, 150 classes, BN, align_corners False, CE weight 1).
    """

    def __init__(self, in_channels: int = 320, channels: int = 512, num_classes: int = 150, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dilation: int = 1, dropout_ratio: float = 0.1,
                 in_index: int = -1, ignore_index: int = 255, align_corners: bool = False, loss_weight: float = 1.0,
                 tau: float = TAU, smoothness: float = SMOOTHNESS):
        if num_convs < 0 or dilation <= 0:
            raise ValueError(f"FCNHeadCAC: num_convs >= 0 and dilation > 0 required, got {num_convs}, {dilation}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError("FCNHeadCAC: num_convs=0 needs in_channels == channels")
        super().__init__()
        self.in_channels, self.channels, self.in_index = in_channels, channels, in_index
        self.num_convs, self.concat_input, self.kernel_size = num_convs, concat_input, kernel_size
        # BaseDecodeHead registers conv_seg first (normal(0, 0.01) weights, zero bias)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout_ratio)
        pad = (kernel_size // 2) * dilation
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(*[
                ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=pad, dilation=dilation)
                for i in range(num_convs)])
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=kernel_size // 2)
        self._init_cac(channels, num_classes, ignore_index, align_corners, loss_weight, tau, smoothness)

    def base_forward(self, inputs):
        """(base logits (B, K, h, w) from ``conv_seg(dropout(feat))``, features (B, C, h, w))."""
        x = _select(inputs, self.in_index)
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out)), out


class UPerHeadCAC(CACHeadMixin, nn.Module):
    """UPerNet head (PPM on the last level, FPN, fused 3x3 bottleneck) with the context-aware classifier.

    Defaults are the official Swin-T ADE20K config (``upernet_swin_tiny_..._cac``: in_channels
    [96, 192, 384, 768], in_index [0, 1, 2, 3], channels 512, pool scales (1, 2, 3, 6), dropout 0.1, BN,
    align_corners False). ``inputs``: the list of backbone features (``in_index`` picks them).
    """

    def __init__(self, in_channels=(96, 192, 384, 768), channels: int = 512, num_classes: int = 150,
                 pool_scales=(1, 2, 3, 6), in_index=(0, 1, 2, 3), dropout_ratio: float = 0.1, ignore_index: int = 255,
                 align_corners: bool = False, loss_weight: float = 1.0, tau: float = TAU,
                 smoothness: float = SMOOTHNESS):
        if len(in_channels) != len(in_index):
            raise ValueError(f"UPerHeadCAC: in_channels {in_channels} and in_index {in_index} differ in length")
        super().__init__()
        self.in_channels, self.in_index, self.channels = list(in_channels), list(in_index), channels
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.pool_scales = tuple(pool_scales)
        # mmseg's PPM: a ModuleList of (AdaptiveAvgPool2d, ConvModule 1x1)
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in self.pool_scales])
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self._init_cac(channels, num_classes, ignore_index, align_corners, loss_weight, tau, smoothness)

    def _resize(self, x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def psp_forward(self, x):
        outs = [x] + [self._resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def base_forward(self, inputs):
        inputs = [inputs[i] for i in self.in_index]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        n = len(laterals)
        for i in range(n - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n - 1)] + [laterals[-1]]
        outs = [outs[0]] + [self._resize(o, outs[0].shape[2:]) for o in outs[1:]]
        feat = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.conv_seg(self.dropout(feat)), feat


class DepthwiseSeparableASPPHeadCAC(CACHeadMixin, nn.Module):
    """DeepLabV3+ head (image pool + ASPP with depthwise-separable atrous branches, stride-4 skip from
    ``inputs[0]``, two separable 3x3 convs) with the context-aware classifier (``sep_aspp_head_cac.py``).

    Defaults are the official ADE20K config (``deeplabv3plus_r50-d8_512x512_160k_ade20k_cac``: in_channels 2048,
    in_index 3, channels 512, dilations (1, 12, 24, 36), c1 256 → 48, dropout 0.1, BN, align_corners False).
    As the original, its cosine classifier divides by the bare norms (``norm_eps=0``).
    """

    def __init__(self, in_channels: int = 2048, channels: int = 512, num_classes: int = 150,
                 dilations=(1, 12, 24, 36), c1_in_channels: int = 256, c1_channels: int = 48, in_index: int = 3,
                 dropout_ratio: float = 0.1, ignore_index: int = 255, align_corners: bool = False,
                 loss_weight: float = 1.0, tau: float = TAU, smoothness: float = SMOOTHNESS):
        if c1_in_channels < 0:
            raise ValueError(f"DepthwiseSeparableASPPHeadCAC: c1_in_channels must be >= 0, got {c1_in_channels}")
        super().__init__()
        self.in_channels, self.channels, self.in_index = in_channels, channels, in_index
        self.dilations = tuple(dilations)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList([
            ConvModule(in_channels, channels, 1) if d == 1 else DepthwiseSeparableConvModule(
                in_channels, channels, 3, padding=d, dilation=d) for d in self.dilations])
        self.bottleneck = ConvModule((len(self.dilations) + 1) * channels, channels, 3, padding=1)
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1) if c1_in_channels > 0 else None
        c1 = c1_channels if c1_in_channels > 0 else 0
        self.sep_bottleneck = nn.Sequential(DepthwiseSeparableConvModule(channels + c1, channels, 3, padding=1),
                                            DepthwiseSeparableConvModule(channels, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(dropout_ratio)
        self._init_cac(channels, num_classes, ignore_index, align_corners, loss_weight, tau, smoothness, norm_eps=0.0)

    def _resize(self, x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def base_forward(self, inputs):
        x = _select(inputs, self.in_index)
        outs = [self._resize(self.image_pool(x), x.shape[2:])] + [m(x) for m in self.aspp_modules]
        out = self.bottleneck(torch.cat(outs, dim=1))
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(inputs[0])
            out = torch.cat([self._resize(out, c1.shape[2:]), c1], dim=1)
        feat = self.sep_bottleneck(out)
        return self.conv_seg(self.dropout(feat)), feat


class LightHamHeadCAC(CACHeadMixin, LightHamHead):
    """SegNeXt's :class:`~fastseg.models.LightHamHead` with the context-aware classifier on its ``align`` output.

    Not an official combination (CAC's repository has FCN / ASPP / OCR / UPer heads): the Ham head's layers and
    names are unchanged, CAC's ``proj`` / ``apd_proj`` are added, and the losses are CAC's (``forward_train``).
    """

    def __init__(self, *args, ignore_index: int = 255, loss_weight: float = 1.0, tau: float = TAU,
                 smoothness: float = SMOOTHNESS, **kw):
        super().__init__(*args, **kw)
        if self.dropout is None:
            self.dropout = nn.Dropout2d(0.0)
        self._init_cac(self.channels, self.conv_seg.out_channels, ignore_index, self.align_corners, loss_weight,
                       tau, smoothness)

    def base_forward(self, inputs):
        inputs = [inputs[i] for i in self.in_index]
        inputs = [F.interpolate(level, size=inputs[0].shape[2:], mode="bilinear", align_corners=self.align_corners)
                  for level in inputs]
        x = self.hamburger(self.squeeze(torch.cat(inputs, dim=1)))
        feat = self.align(x)
        return self.conv_seg(self.dropout(feat)), feat
