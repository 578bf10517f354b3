"""Context Cluster (CoC) backbones of "Image as Set of Points" (ICLR'23), as in ``ma-xu/Context-Cluster``.

Same modules, parameter names and initialisation as the original ``models/context_cluster.py`` (timm-free):
a point reducer on the 5-channel input (RGB + 2 position channels), stages of ``ClusterBlock`` (GroupNorm with
one group, the ``Cluster`` token mixer, an MLP of ``nn.Linear``, layer scale) separated by point reducers.
``fused=True`` builds every token mixer as :class:`fastseg.nn.ContextCluster` instead of the reference
:class:`fastseg.reference.Cluster` (identical state_dicts, so weights load either way). ``normalizer`` ("sim",
default: the official code since 2023-05-31 and its retrained checkpoints; "mask": the code before it, for
checkpoints trained with it) is passed to every token mixer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..reference.context_cluster import Cluster, check_normalizer

__all__ = ["PointRecuder", "GroupNorm", "Mlp", "ClusterBlock", "ContextClusterNet", "DropPath",
           "coc_tiny", "coc_small", "coc_medium"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PointRecuder(nn.Module):
    """Point reducer = one strided conv (+ optional norm). [B, C, H, W] -> [B, E, H/stride, W/stride]."""

    def __init__(self, patch_size=16, stride=16, padding=0, in_chans=3, embed_dim=768, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=_pair(patch_size), stride=_pair(stride),
                              padding=_pair(padding))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


class GroupNorm(nn.GroupNorm):
    """GroupNorm with one group. Input [B, C, H, W]."""

    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)


class Mlp(nn.Module):
    """MLP of nn.Linear on channels-last. Input/output [B, C, H, W]."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.fc1(x.permute(0, 2, 3, 1))
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x).permute(0, 3, 1, 2)
        return self.drop(x)


def _mixer_cls(fused: bool):
    if fused:
        from ..nn.context_cluster import ContextCluster
        return ContextCluster
    return Cluster


class ClusterBlock(nn.Module):
    """norm1 -> Cluster -> layer scale 1 -> residual; norm2 -> Mlp -> layer scale 2 -> residual."""

    def __init__(self, dim, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=GroupNorm, drop=0.0, drop_path=0.0,
                 use_layer_scale=True, layer_scale_init_value=1e-5,
                 proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24, return_center=False,
                 fused=False, normalizer="sim"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        # the original always builds its token mixer with return_center=False
        self.token_mixer = _mixer_cls(fused)(dim=dim, out_dim=dim, proposal_w=proposal_w, proposal_h=proposal_h,
                                             fold_w=fold_w, fold_h=fold_h, heads=heads, head_dim=head_dim,
                                             return_center=False, normalizer=normalizer)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
            self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(self.norm1(x)))
            x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.token_mixer(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def basic_blocks(dim, index, layers, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=GroupNorm, drop_rate=0.0,
                 drop_path_rate=0.0, use_layer_scale=True, layer_scale_init_value=1e-5,
                 proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24, return_center=False,
                 fused=False, normalizer="sim"):
    blocks = []
    for block_idx in range(layers[index]):
        block_dpr = drop_path_rate * (block_idx + sum(layers[:index])) / (sum(layers) - 1)
        blocks.append(ClusterBlock(
            dim, mlp_ratio=mlp_ratio, act_layer=act_layer, norm_layer=norm_layer, drop=drop_rate,
            drop_path=block_dpr, use_layer_scale=use_layer_scale, layer_scale_init_value=layer_scale_init_value,
            proposal_w=proposal_w, proposal_h=proposal_h, fold_w=fold_w, fold_h=fold_h, heads=heads,
            head_dim=head_dim, return_center=False, fused=fused, normalizer=normalizer))
    return nn.Sequential(*blocks)


class ContextClusterNet(nn.Module):
    """The original ``ContextCluster`` network (classification head, or 4 normed features with fork_feat).

    Input [B, 3, H, W]; two position channels in [-0.5, 0.5] are appended before the first point reducer.
    ``normalizer``: the aggregate step's normaliser of every token mixer ("sim" official, "mask" pre-2023-05-31).
    """

    def __init__(self, layers, embed_dims=None, mlp_ratios=None, downsamples=None, norm_layer=nn.BatchNorm2d,
                 act_layer=nn.GELU, num_classes=1000, in_patch_size=4, in_stride=4, in_pad=0,
                 down_patch_size=2, down_stride=2, down_pad=0, drop_rate=0.0, drop_path_rate=0.0,
                 use_layer_scale=True, layer_scale_init_value=1e-5, fork_feat=False,
                 proposal_w=(2, 2, 2, 2), proposal_h=(2, 2, 2, 2), fold_w=(8, 4, 2, 1), fold_h=(8, 4, 2, 1),
                 heads=(2, 4, 6, 8), head_dim=(16, 16, 32, 32), fused=False, normalizer="sim"):
        super().__init__()
        check_normalizer(normalizer)
        if not fork_feat:
            self.num_classes = num_classes
        self.fork_feat = fork_feat
        self.embed_dim = embed_dims[-1]
        self.patch_embed = PointRecuder(patch_size=in_patch_size, stride=in_stride, padding=in_pad,
                                        in_chans=5, embed_dim=embed_dims[0])
        network = []
        for i in range(len(layers)):
            network.append(basic_blocks(
                embed_dims[i], i, layers, mlp_ratio=mlp_ratios[i], act_layer=act_layer, norm_layer=norm_layer,
                drop_rate=drop_rate, drop_path_rate=drop_path_rate, use_layer_scale=use_layer_scale,
                layer_scale_init_value=layer_scale_init_value, proposal_w=proposal_w[i],
                proposal_h=proposal_h[i], fold_w=fold_w[i], fold_h=fold_h[i], heads=heads[i],
                head_dim=head_dim[i], return_center=False, fused=fused, normalizer=normalizer))
            if i >= len(layers) - 1:
                break
            if downsamples[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(PointRecuder(patch_size=down_patch_size, stride=down_stride, padding=down_pad,
                                            in_chans=embed_dims[i], embed_dim=embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        if self.fork_feat:
            self.out_indices = [0, 2, 4, 6]
            for i_emb, i_layer in enumerate(self.out_indices):
                self.add_module(f"norm{i_layer}", norm_layer(embed_dims[i_emb]))
        else:
            self.norm = norm_layer(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self.cls_init_weights)

    @staticmethod
    def cls_init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward_embeddings(self, x):
        _, c, img_w, img_h = x.shape
        range_w = torch.arange(0, img_w, step=1) / (img_w - 1.0)
        range_h = torch.arange(0, img_h, step=1) / (img_h - 1.0)
        fea_pos = torch.stack(torch.meshgrid(range_w, range_h, indexing="ij"), dim=-1).float()
        fea_pos = fea_pos.to(x.device) - 0.5
        pos = fea_pos.permute(2, 0, 1).unsqueeze(dim=0).expand(x.shape[0], -1, -1, -1)
        return self.patch_embed(torch.cat([x, pos], dim=1))

    def forward_tokens(self, x):
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if self.fork_feat and idx in self.out_indices:
                outs.append(getattr(self, f"norm{idx}")(x))
        return outs if self.fork_feat else x

    def forward(self, x):
        x = self.forward_embeddings(x)
        x = self.forward_tokens(x)
        if self.fork_feat:
            return x
        x = self.norm(x)
        return self.head(x.mean([-2, -1]))


# ``normalizer`` of the builders: "sim" (official, default) or "mask" (checkpoints from before 2023-05-31).
# (layers, embed_dims, heads, head_dim) per configuration; all use mlp ratios [8, 8, 4, 4], proposals 2x2,
# folds [8, 4, 2, 1], GroupNorm, 3x3 stride-2 padded downsamplers.
_CONFIGS = {
    "coc_tiny": ([3, 4, 5, 2], [32, 64, 196, 320], [4, 4, 8, 8], [24, 24, 24, 24]),
    "coc_small": ([2, 2, 6, 2], [64, 128, 320, 512], [4, 4, 8, 8], [32, 32, 32, 32]),
    "coc_medium": ([4, 4, 12, 4], [64, 128, 320, 512], [6, 6, 12, 12], [32, 32, 32, 32]),
}


def _build(name: str, fused: bool, num_classes: int, **kw) -> ContextClusterNet:
    layers, embed_dims, heads, head_dim = _CONFIGS[name]
    args = dict(
        layers=layers, embed_dims=embed_dims, norm_layer=GroupNorm, mlp_ratios=[8, 8, 4, 4], downsamples=[True] * 4,
        down_patch_size=3, down_pad=1, proposal_w=[2, 2, 2, 2], proposal_h=[2, 2, 2, 2],
        fold_w=[8, 4, 2, 1], fold_h=[8, 4, 2, 1], heads=heads, head_dim=head_dim, num_classes=num_classes,
    )
    args.update(kw)
    layers = args.pop("layers", layers)
    return ContextClusterNet(layers, fused=fused, **args)


def coc_tiny(fused: bool = False, num_classes: int = 1000, normalizer: str = "sim", **kw) -> ContextClusterNet:
    """CoC-Tiny: layers [3, 4, 5, 2], dims [32, 64, 196, 320], heads [4, 4, 8, 8], head_dim 24."""
    return _build("coc_tiny", fused, num_classes, normalizer=normalizer, **kw)


def coc_small(fused: bool = False, num_classes: int = 1000, normalizer: str = "sim", **kw) -> ContextClusterNet:
    """CoC-Small: layers [2, 2, 6, 2], dims [64, 128, 320, 512], heads [4, 4, 8, 8], head_dim 32."""
    return _build("coc_small", fused, num_classes, normalizer=normalizer, **kw)


def coc_medium(fused: bool = False, num_classes: int = 1000, normalizer: str = "sim", **kw) -> ContextClusterNet:
    """CoC-Medium: layers [4, 4, 12, 4], dims [64, 128, 320, 512], heads [6, 6, 12, 12], head_dim 32."""
    return _build("coc_medium", fused, num_classes, normalizer=normalizer, **kw)
