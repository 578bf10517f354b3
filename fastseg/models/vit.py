"""Plain ViT backbones of SegViT, with the parameter names of the ViT its official configs use.

SegViT (zbwxp/SegVit, ``configs/_base_/models/seg_vit-b16.py``) builds mmseg 0.x's ``VisionTransformer``
(mmsegmentation 0.24 / mmcv-full 1.4.4, ``mmseg/models/backbones/vit.py``) with ``with_cls_token=False``,
``final_norm=False``, LayerNorm ``eps=1e-6`` and ``out_indices`` [5, 7, 11] (ViT-B) / [7, 15, 23] (ViT-L).
The module names here are mmseg's, so its checkpoints (and SegViT's ``backbone.*`` keys) load strictly:

``patch_embed.projection.{weight,bias}``, ``cls_token``, ``pos_embed``, ``layers.<i>.ln1``,
``layers.<i>.attn.attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``, ``layers.<i>.ln2``,
``layers.<i>.ffn.layers.0.0`` (fc1), ``layers.<i>.ffn.layers.1`` (fc2), and ``ln1`` when ``final_norm``.

* :class:`VisionTransformer` — mmseg's forward: corner-padded patch embedding, cls token concatenated, the
  position embedding (bicubically resized when the token grid differs from ``img_size // patch_size``),
  the cls token dropped again when ``with_cls_token=False``; returns one (B, C, h, w) map per ``out_indices``.
* :class:`ViTShrink` — SegViT's ``vit_shrink`` (``backbone/vit_shrink.py``, the Shrunk structure): at layer
  ``shrink_idx`` the queries are the tokens of every second row and column (nearest 2x down-sampling) and keys /
  values all tokens (query-based down-sampling); later layers run on a quarter of the tokens. As the official
  one it returns token sequences (B, N, C), not maps.

SegViTv2's Shrunk++ encoder (EQD / QU) is in :mod:`fastseg.models.vit_shrunk_plus`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mscan import DropPath

__all__ = ["PatchEmbed", "MultiheadAttention", "FFN", "TransformerEncoderLayer", "VisionTransformer",
           "ViTShrink", "shrink_tokens"]


class PatchEmbed(nn.Module):
    """mmseg's ``PatchEmbed`` (``padding='corner'``, no norm): (B, 3, H, W) -> (B, h*w, C), (h, w).
    The input is zero-padded at the bottom / right to a multiple of the patch size, as mmcv's
    ``AdaptivePadding``."""

    def __init__(self, in_channels: int = 3, embed_dims: int = 768, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % p, (-W) % p
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), hw


class MultiheadAttention(nn.Module):
    """mmcv's ``MultiheadAttention`` wrapper (batch first): ``identity + drop_path(proj_drop(attn(q, k, v)))``.
    ``key`` defaults to ``query``, ``value`` to ``key``, ``identity`` to ``query``; tensors (B, N, C)."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, bias: bool = True):
        super().__init__()
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=bias, batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, key=None, value=None, identity=None):
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        out = self.attn(query, key, value, need_weights=False)[0]
        return identity + self.dropout_layer(self.proj_drop(out))


class FFN(nn.Module):
    """mmcv's ``FFN`` (2 fcs): ``layers = [[fc1, GELU, Dropout], fc2, Dropout]``; ``identity + drop_path(out)``."""

    def __init__(self, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.GELU(), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(ffn_drop))
        self.dropout_layer = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, identity=None):
        identity = x if identity is None else identity
        return identity + self.dropout_layer(self.layers(x))


class TransformerEncoderLayer(nn.Module):
    """mmseg ViT's pre-norm encoder layer (``ln1``, ``attn``, ``ln2``, ``ffn``).

    ``forward(x)``: x (B, N, C). ``forward((xq, x), shrink=True)``: SegViT's ``ShrinkLayer`` — the attention
    queries are ``ln1(xq)`` (B, Nq, C), keys / values ``ln1(x)``, the residual is ``xq``; returns (B, Nq, C).
    """

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = MultiheadAttention(embed_dims, num_heads, attn_drop=attn_drop_rate, proj_drop=drop_rate,
                                       drop_path=drop_path_rate, bias=qkv_bias)
        self.ln2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.ffn = FFN(embed_dims, feedforward_channels, ffn_drop=drop_rate, drop_path=drop_path_rate)

    def forward(self, x, shrink: bool = False):
        if shrink:
            xq, xkv = x
            kv = self.ln1(xkv)
            x = self.attn(self.ln1(xq), kv, kv, identity=xq)
        else:
            x = self.attn(self.ln1(x), identity=x)
        return self.ffn(self.ln2(x), identity=x)


class VisionTransformer(nn.Module):
    """mmseg 0.x ``VisionTransformer`` (same constructor arguments, except ``norm_eps`` for ``norm_cfg`` and
    no ``pretrained`` / ``init_cfg``). ``forward(img)``: img (B, in_channels, H, W) -> tuple of
    (B, embed_dims, ceil(H/p), ceil(W/p)) maps, one per ``out_indices`` (``[x, cls]`` pairs with
    ``output_cls_token``). ``norm_eps`` defaults to 1e-6 as the SegViT configs (mmseg's own default is 1e-5).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_channels: int = 3, embed_dims: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_ratio: int = 4, out_indices=-1,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, with_cls_token: bool = True, output_cls_token: bool = False,
                 norm_eps: float = 1e-6, final_norm: bool = False, interpolate_mode: str = "bicubic"):
        super().__init__()
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        img_size = tuple(img_size)
        if len(img_size) == 1:
            img_size = (img_size[0], img_size[0])
        if len(img_size) != 2:
            raise ValueError(f"img_size must have 1 or 2 entries, got {img_size}")
        if output_cls_token and not with_cls_token:
            raise ValueError("output_cls_token=True needs with_cls_token=True")
        self.img_size, self.patch_size, self.interpolate_mode = img_size, patch_size, interpolate_mode
        self.embed_dims = embed_dims
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size)
        num_patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.with_cls_token, self.output_cls_token = with_cls_token, output_cls_token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dims))
        self.drop_after_pos = nn.Dropout(drop_rate)
        if isinstance(out_indices, int):
            self.out_indices = [num_layers - 1 if out_indices == -1 else out_indices]
        elif isinstance(out_indices, (list, tuple)):
            self.out_indices = list(out_indices)
        else:
            raise TypeError("out_indices must be an int, list or tuple")
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, num_layers)]
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(embed_dims, num_heads, mlp_ratio * embed_dims, drop_rate=drop_rate,
                                    attn_drop_rate=attn_drop_rate, drop_path_rate=dpr[i], qkv_bias=qkv_bias,
                                    norm_eps=norm_eps)
            for i in range(num_layers))
        self.final_norm = final_norm
        if final_norm:
            self.ln1 = nn.LayerNorm(embed_dims, eps=norm_eps)

    def init_weights(self) -> None:
        """mmseg's random ("jax_impl") init: pos_embed / cls_token trunc-normal 0.02, Linear weights trunc-normal
        0.02 with zero biases (N(0, 1e-6) for the FFN's), the patch conv Kaiming (fan_in), LayerNorms 1 / 0.
        (mmseg 0.x passes the tensors to mmcv's module-taking ``*_init`` helpers there, which leaves them
        untouched; this applies the init that code spells out.) ``in_proj_weight`` keeps PyTorch's xavier."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for n, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    if "ffn" in n:
                        nn.init.normal_(m.bias, std=1e-6)
                    else:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def resize_pos_embed(pos_embed, input_shape, pos_shape, mode):
        """(1, 1 + ph*pw, C) -> (1, 1 + h*w, C): the grid part resized (``align_corners=False``), cls kept."""
        pos_h, pos_w = pos_shape
        cls_w = pos_embed[:, :1]
        grid = pos_embed[:, -pos_h * pos_w:].reshape(1, pos_h, pos_w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=input_shape, mode=mode, align_corners=False)
        return torch.cat((cls_w, grid.flatten(2).transpose(1, 2)), dim=1)

    def _pos_embeding(self, x, hw_shape, pos_embed):
        x_len, pos_len = x.shape[1], pos_embed.shape[1]
        if x_len != pos_len:
            pos_h, pos_w = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
            if pos_len != pos_h * pos_w + 1:
                raise ValueError(f"unexpected pos_embed shape {tuple(pos_embed.shape)}")
            pos_embed = self.resize_pos_embed(pos_embed, hw_shape, (pos_h, pos_w), self.interpolate_mode)
        return self.drop_after_pos(x + pos_embed)

    def embed(self, img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding + cls token + position embedding (cls dropped when ``with_cls_token=False``)."""
        x, hw_shape = self.patch_embed(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._pos_embeding(x, hw_shape, self.pos_embed)
        if not self.with_cls_token:
            x = x[:, 1:]
        return x, hw_shape

    def _output(self, x, hw_shape=None):
        out = x[:, 1:] if self.with_cls_token else x
        if hw_shape is not None:
            B, _, C = out.shape
            out = out.reshape(B, hw_shape[0], hw_shape[1], C).permute(0, 3, 1, 2).contiguous()
        return [out, x[:, 0]] if self.output_cls_token else out

    def forward(self, img: torch.Tensor):
        x, hw_shape = self.embed(img)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._output(x, hw_shape))
        return tuple(outs)


def shrink_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official Shrunk down-sampling: x (B, N, C) with N = h*h (or h*h + 1: the leading cls token is then
    dropped, as ``hw % 2 != 0``) -> (tokens of every second row and column (B, N // 4, C), x without cls).
    Square grids with an even side only (the official reshape needs ``(h // 2)^2 == N // 4``)."""
    n, hw, c = x.shape
    if hw % 2 != 0:
        x = x[:, 1:]
    h = int(math.sqrt(hw))
    if h * h != x.shape[1] or h % 2:
        raise ValueError(f"the Shrunk down-sampling needs a square token grid with an even side, got {hw} tokens")
    down = x.transpose(1, 2).reshape(n, c, h, h)[:, :, ::2, ::2]
    return down.reshape(n, c, hw // 4).transpose(2, 1), x


class ViTShrink(VisionTransformer):
    """SegViT's ``vit_shrink`` (Shrunk): layer ``shrink_idx`` is a query-based down-sampling layer
    (:func:`shrink_tokens` queries, all tokens as keys / values). Square inputs, even token grid.
    ``forward(img)`` -> tuple of token sequences (B, N_i, C) (N_i = h*w before ``shrink_idx``, h*w/4 after;
    cls token removed when ``with_cls_token``, as the official code — which is only consistent with
    ``with_cls_token=False``, the configs' setting)."""

    def __init__(self, shrink_idx: int = 8, img_size=224, **kwargs):
        super().__init__(img_size=img_size, **kwargs)
        self.shrink_idx = shrink_idx

    def forward(self, img: torch.Tensor):
        x, _ = self.embed(img)
        outs = []
        for i, layer in enumerate(self.layers):
            if i == self.shrink_idx:
                x = layer(shrink_tokens(x), shrink=True)
            else:
                x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._output(x))
        return tuple(outs)
