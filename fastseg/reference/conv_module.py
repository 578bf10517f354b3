"""mmcv's ``ConvModule`` (conv → BatchNorm → ReLU), as the official mmseg heads (CAC) and ECENet's port use it."""
from __future__ import annotations

from torch import nn

__all__ = ["ConvModule"]


class ConvModule(nn.Module):
    """mmcv's ``ConvModule``: submodules ``conv``, ``bn`` (BatchNorm2d, or None with ``norm=False``), ``activate``
    (ReLU, or None with ``act=False``); mmcv's argument order (in, out, kernel, stride, padding, dilation, groups).

    As mmcv: the conv has a bias only without norm (``bias=None``, mmcv's "auto"; True / False force it);
    kaiming-normal (fan_out, ReLU) conv init, zero bias, unit BN. (B, in, H, W) → (B, out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm: bool = True, act: bool = True, bias: bool | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=groups,
                              bias=(not norm) if bias is None else bias)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
