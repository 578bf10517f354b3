"""SegNeXt's light Hamburger decode head and the whole SegNeXt model.

Faithful copy of ``LightHamHead`` (open-mmlab/mmsegmentation ``mmseg/models/decode_heads/ham_head.py``,
from Visual-Attention-Network/SegNeXt) with mmcv's ConvModule inlined (conv without bias + GroupNorm(32)
+ ReLU) and BaseDecodeHead's ``multiple_select`` input transform, dropout and ``conv_seg``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mscan import MSCAN, mscan_b, mscan_l, mscan_s, mscan_t

__all__ = ["NMF2D", "Hamburger", "LightHamHead", "SegNeXt", "segnext_t", "segnext_s", "segnext_b", "segnext_l"]


class ConvModule(nn.Sequential):
    """mmcv ConvModule for a 1×1 conv: conv (bias only without norm) → optional GroupNorm → optional ReLU."""

    def __init__(self, cin, cout, norm_groups: int | None = 32, act: bool = True):
        layers = [nn.Conv2d(cin, cout, 1, bias=norm_groups is None)]
        if norm_groups is not None:
            layers.append(nn.GroupNorm(norm_groups, cout))
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _MatrixDecomposition2DBase(nn.Module):
    def __init__(self, MD_S=1, MD_R=64, train_steps=6, eval_steps=7, inv_t=100, rand_init=True):
        super().__init__()
        self.S = MD_S
        self.R = MD_R
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.inv_t = inv_t
        self.rand_init = rand_init

    def local_inference(self, x, bases):
        coef = torch.bmm(x.transpose(1, 2), bases)
        coef = F.softmax(self.inv_t * coef, dim=-1)
        steps = self.train_steps if self.training else self.eval_steps
        for _ in range(steps):
            bases, coef = self.local_step(x, bases, coef)
        return bases, coef

    def forward(self, x):
        B, C, H, W = x.shape
        D = C // self.S
        N = H * W
        x = x.view(B * self.S, D, N)
        if not self.rand_init and not hasattr(self, "bases"):
            self.register_buffer("bases", self._build_bases(1, self.S, D, self.R, device=x.device))
        if self.rand_init:
            bases = self._build_bases(B, self.S, D, self.R, device=x.device)
        else:
            bases = self.bases.repeat(B, 1, 1)
        bases, coef = self.local_inference(x, bases)
        coef = self.compute_coef(x, bases, coef)
        x = torch.bmm(bases, coef.transpose(1, 2))
        return x.view(B, C, H, W)


class NMF2D(_MatrixDecomposition2DBase):
    """Non-negative matrix factorisation by multiplicative updates (random bases each call)."""

    def __init__(self, args=dict()):
        super().__init__(**args)
        self.inv_t = 1

    def _build_bases(self, B, S, D, R, device=None):
        bases = torch.rand((B * S, D, R), device=device)
        return F.normalize(bases, dim=1)

    def local_step(self, x, bases, coef):
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        coef = coef * numerator / (denominator + 1e-6)
        numerator = torch.bmm(x, coef)
        denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))
        bases = bases * numerator / (denominator + 1e-6)
        return bases, coef

    def compute_coef(self, x, bases, coef):
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        return coef * numerator / (denominator + 1e-6)


class Hamburger(nn.Module):
    def __init__(self, ham_channels=512, ham_kwargs=dict(), norm_groups=32):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, norm_groups=None, act=False)
        self.ham = NMF2D(ham_kwargs)
        self.ham_out = ConvModule(ham_channels, ham_channels, norm_groups=norm_groups, act=False)

    def forward(self, x):
        enjoy = self.ham_in(x)
        enjoy = F.relu(enjoy, inplace=True)
        enjoy = self.ham(enjoy)
        enjoy = self.ham_out(enjoy)
        return F.relu(x + enjoy, inplace=True)


class LightHamHead(nn.Module):
    """Concat stages ``in_index`` (resized to the first), squeeze, Hamburger, align, dropout, classifier."""

    def __init__(self, in_channels=(64, 160, 256), in_index=(1, 2, 3), channels=256, ham_channels=256,
                 num_classes=150, dropout_ratio=0.1, align_corners=False,
                 ham_kwargs=dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7, inv_t=100, rand_init=True)):
        super().__init__()
        self.in_channels = list(in_channels)
        self.in_index = list(in_index)
        self.channels = channels
        self.ham_channels = ham_channels
        self.align_corners = align_corners
        self.squeeze = ConvModule(sum(self.in_channels), ham_channels)
        self.hamburger = Hamburger(ham_channels, ham_kwargs)
        self.align = ConvModule(ham_channels, channels)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, inputs):
        inputs = [inputs[i] for i in self.in_index]
        inputs = [F.interpolate(level, size=inputs[0].shape[2:], mode="bilinear", align_corners=self.align_corners)
                  for level in inputs]
        x = self.squeeze(torch.cat(inputs, dim=1))
        x = self.hamburger(x)
        out = self.align(x)
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv_seg(out)


class SegNeXt(nn.Module):
    """Encoder-decoder: ``backbone(x)`` → ``head(features)`` → logits resized to the input (N, K, H, W)."""

    def __init__(self, backbone: MSCAN, head: LightHamHead, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decode_head = head
        self.align_corners = align_corners

    def forward(self, x):
        out = self.decode_head(self.backbone(x))
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)


def _segnext(backbone, ham_channels, md_r, num_classes, **head_kw):
    dims = [getattr(backbone, f"norm{i}").normalized_shape[0] for i in (2, 3, 4)]
    head = LightHamHead(in_channels=dims, channels=ham_channels, ham_channels=ham_channels,
                        num_classes=num_classes,
                        ham_kwargs=dict(MD_S=1, MD_R=md_r, train_steps=6, eval_steps=7, inv_t=100, rand_init=True),
                        **head_kw)
    return SegNeXt(backbone, head)


def segnext_t(num_classes=150, fused=False, **kw):
    return _segnext(mscan_t(fused=fused, **kw), 256, 16, num_classes)


def segnext_s(num_classes=150, fused=False, **kw):
    return _segnext(mscan_s(fused=fused, **kw), 256, 16, num_classes)


def segnext_b(num_classes=150, fused=False, **kw):
    return _segnext(mscan_b(fused=fused, **kw), 512, 64, num_classes)


def segnext_l(num_classes=150, fused=False, **kw):
    return _segnext(mscan_l(fused=fused, **kw), 1024, 64, num_classes)
