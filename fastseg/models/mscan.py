"""SegNeXt's MSCAN encoder (faithful PyTorch copy of Visual-Attention-Network/SegNeXt
``mmseg/models/backbones/mscan.py``; SyncBN → BatchNorm2d, mmcv helpers inlined).

``mscan_t/s/b/l(fused=False)`` build the paper's sizes; ``fused=True`` uses :class:`fastseg.nn.MSCA` (the Triton
kernels) for every attention module, ``fused="all"`` also :class:`fastseg.nn.MSCANMlp` for every MLP (fused
depthwise 3x3 + bias + GELU) and :class:`fastseg.nn.MSCANBlock` for every block (in eval, BatchNorms and layer
scales folded into the 1x1 convs); the state_dict is identical either way. ``model(x)`` with ``x`` of shape
``(N, 3, H, W)`` returns the 4 stage features ``(N, C_i, H/2^(i+2), W/2^(i+2))`` (ceil-rounded).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..reference.msca import AttentionModule

__all__ = ["MSCAN", "mscan_t", "mscan_s", "mscan_b", "mscan_l", "MSCAN_SIZES"]


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth per sample (as timm's ``DropPath``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        return _drop_path(x, self.drop_prob, self.training)


class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x):
        return self.dwconv(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class StemConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.size()
        x = x.flatten(2).transpose(1, 2)
        return x, H, W


class SpatialAttention(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.d_model = d_model
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = AttentionModule(d_model)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x):
        shorcut = x.clone()
        x = self.proj_1(x)
        x = self.activation(x)
        x = self.spatial_gating_unit(x)
        x = self.proj_2(x)
        x = x + shorcut
        return x


class Block(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0, drop=0.0, drop_path=0.0, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop)
        layer_scale_init_value = 1e-2
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.permute(0, 2, 1).view(B, C, H, W)
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        x = x.view(B, C, N).permute(0, 2, 1)
        return x


class OverlapPatchEmbed(nn.Module):
    """Image to patch embedding (strided conv + BatchNorm)."""

    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=(patch_size[0] // 2, patch_size[1] // 2))
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        x = self.norm(x)
        x = x.flatten(2).transpose(1, 2)
        return x, H, W


class MSCAN(nn.Module):
    """Multi-scale convolutional attention network; ``forward`` returns the list of 4 stage features."""

    def __init__(self, in_chans=3, embed_dims=(64, 128, 256, 512), mlp_ratios=(4, 4, 4, 4), drop_rate=0.0,
                 drop_path_rate=0.0, depths=(3, 4, 6, 3), num_stages=4, fused: bool | str = False):
        if fused not in (False, True, "all"):
            raise ValueError(f"MSCAN: fused must be False, True (fused attention) or 'all', got {fused!r}")
        super().__init__()
        self.depths = depths
        self.num_stages = num_stages
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(num_stages):
            if i == 0:
                patch_embed = StemConv(3, embed_dims[0])
            else:
                patch_embed = OverlapPatchEmbed(patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2,
                                                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                                                embed_dim=embed_dims[i])
            block = nn.ModuleList([Block(dim=embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate,
                                         drop_path=dpr[cur + j]) for j in range(depths[i])])
            norm = nn.LayerNorm(embed_dims[i])
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", norm)
        self.init_weights()
        if fused:
            use_fused_msca(self, mlp=fused == "all")

    def init_weights(self):
        """SegNeXt's init without a checkpoint (normal(0, sqrt(2/fan_out)) convs, unit LayerNorms)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        B = x.shape[0]
        outs = []
        for i in range(self.num_stages):
            patch_embed = getattr(self, f"patch_embed{i + 1}")
            block = getattr(self, f"block{i + 1}")
            norm = getattr(self, f"norm{i + 1}")
            x, H, W = patch_embed(x)
            for blk in block:
                x = blk(x, H, W)
            x = norm(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def use_fused_msca(model: nn.Module, mlp: bool = False) -> nn.Module:
    """Swap every :class:`AttentionModule` in ``model`` for :class:`fastseg.nn.MSCA` (and with ``mlp=True``
    every :class:`Mlp` for :class:`fastseg.nn.MSCANMlp` and every :class:`Block` for
    :class:`fastseg.nn.MSCANBlock`, which folds the BatchNorms and layer scales into the 1x1 convs in eval),
    keeping the weights."""
    from ..nn.mlp_dwconv import MSCANMlp
    from ..nn.msca import MSCA
    from ..nn.mscan_block import MSCANBlock

    if mlp:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Block) and not isinstance(child, MSCANBlock):
                    setattr(module, name, MSCANBlock.from_block(child))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            ref = child.conv3.weight if isinstance(child, AttentionModule) else None
            if isinstance(child, AttentionModule) and not isinstance(child, MSCA):
                new = MSCA(child.conv3.in_channels)
            elif mlp and isinstance(child, Mlp) and not isinstance(child, MSCANMlp):
                ref = child.fc1.weight
                new = MSCANMlp(child.fc1.in_channels, child.fc1.out_channels, child.fc2.out_channels,
                               drop=child.drop.p)
            else:
                continue
            new = new.to(device=ref.device, dtype=ref.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
    return model


#: (embed_dims, depths, drop_path_rate of the SegNeXt configs); MLP ratios are [8, 8, 4, 4] for all.
MSCAN_SIZES = {
    "t": ([32, 64, 160, 256], [3, 3, 5, 2], 0.1),
    "s": ([64, 128, 320, 512], [2, 2, 4, 2], 0.1),
    "b": ([64, 128, 320, 512], [3, 3, 12, 3], 0.1),
    "l": ([64, 128, 320, 512], [3, 5, 27, 3], 0.3),
}


def _mscan(size: str, fused: bool, **kw) -> MSCAN:
    dims, depths, dpr = MSCAN_SIZES[size]
    kw.setdefault("drop_path_rate", dpr)
    return MSCAN(embed_dims=dims, depths=depths, mlp_ratios=[8, 8, 4, 4], fused=fused, **kw)


def mscan_t(fused: bool = False, **kw) -> MSCAN:
    return _mscan("t", fused, **kw)


def mscan_s(fused: bool = False, **kw) -> MSCAN:
    return _mscan("s", fused, **kw)


def mscan_b(fused: bool = False, **kw) -> MSCAN:
    return _mscan("b", fused, **kw)


def mscan_l(fused: bool = False, **kw) -> MSCAN:
    return _mscan("l", fused, **kw)
