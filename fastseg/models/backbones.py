"""Backbones for the Mask2Former / MaskFormer reference models.

* :class:`TinyResNet`: a small plain ResNet-style network (conv stem to stride 4, then one residual stage per
  stride 4, 8, 16, 32) for tests and CPU runs.
* :func:`backbone_from_name`: "tiny", or the project's MSCAN / Context-Cluster backbones
  (``fastseg.models.mscan_t`` …, ``fastseg.models.coc_tiny`` …), looked up lazily so this module works
  without them.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyResNet", "backbone_from_name"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TinyResNet(nn.Module):
    """Plain ResNet-style backbone: (B, 3, H, W) -> 4 maps at strides 4, 8, 16, 32 with ``channels``."""

    def __init__(self, channels=(16, 32, 64, 128), stem_channels: int = 16, blocks_per_stage: int = 1):
        super().__init__()
        self.out_channels = list(channels)
        self.strides = [4, 8, 16, 32]
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
            nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True))
        stages, cin = [], stem_channels
        for i, c in enumerate(channels):
            blocks = [_BasicBlock(cin, c, 1 if i == 0 else 2)]
            blocks += [_BasicBlock(c, c, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


# channels of the project's backbones (strides 4, 8, 16, 32), used when the module has no out_channels
KNOWN_CHANNELS = {
    "mscan_t": [32, 64, 160, 256], "mscan_s": [64, 128, 320, 512], "mscan_b": [64, 128, 320, 512],
    "mscan_l": [64, 128, 320, 512], "coc_tiny": [32, 64, 196, 320], "coc_small": [64, 128, 320, 512],
    "coc_medium": [64, 128, 320, 512],
}
# constructor arguments that make a classification backbone return its 4 stage features
DEFAULT_KWARGS = {"coc_tiny": {"fork_feat": True}, "coc_small": {"fork_feat": True}, "coc_medium": {"fork_feat": True}}


def backbone_from_name(name: str, **kwargs) -> tuple[nn.Module, list[int] | None]:
    """(backbone, channels or None). "tiny" -> :class:`TinyResNet`; other names are looked up in
    :mod:`fastseg.models` at call time (e.g. "mscan_t", "coc_tiny")."""
    if name == "tiny":
        m = TinyResNet(**kwargs)
        return m, m.out_channels
    models = importlib.import_module("fastseg.models")
    fn = getattr(models, name, None)
    if fn is None:
        raise ImportError(f"backbone {name!r} is not available: fastseg.models.{name} does not exist in this build")
    m = fn(**{**DEFAULT_KWARGS.get(name, {}), **kwargs})
    return m, getattr(m, "out_channels", None) or KNOWN_CHANNELS.get(name)
