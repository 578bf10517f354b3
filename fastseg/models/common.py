"""Building blocks shared by the Mask2Former / MaskFormer reference models (plain PyTorch).

Faithful to detectron2 / DETR: sine positional encoding, the 3-layer MLP head, detectron2's ``Conv2d``
(conv -> norm -> activation) with ``c2_xavier_fill``, and PointRend's ``point_sample`` and
uncertainty-based point selection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PositionEmbeddingSine", "MLP", "ConvNormAct", "c2_xavier_fill", "point_sample",
    "get_uncertain_point_coords_with_randomness", "calculate_uncertainty", "get_activation_fn",
]


def get_activation_fn(activation: str):
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise RuntimeError(f"activation should be relu/gelu/glu, not {activation}.")


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as detectron2 uses it: kaiming_uniform_(a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class ConvNormAct(nn.Conv2d):
    """detectron2's ``Conv2d``: convolution, then optional norm, then optional activation.

    ``norm``: "" / None (none) or "GN" (GroupNorm with ``min(32, C)`` groups, detectron2 uses 32).
    """

    def __init__(self, *args, norm: str | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = _make_norm(norm, self.out_channels)
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _make_norm(norm: str | None, channels: int) -> nn.Module | None:
    if not norm:
        return None
    if norm == "GN":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"unsupported norm {norm!r} (use '' or 'GN')")


class PositionEmbeddingSine(nn.Module):
    """DETR's sine positional encoding of a (B, C, H, W) map -> (B, 2·num_pos_feats, H, W) float32."""

    def __init__(self, num_pos_feats: int = 64, temperature: int = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (DETR's MLP)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """PointRend's point_sample: bilinear ``grid_sample`` at [0, 1]² coordinates.

    input: (N, C, H, W); point_coords: (N, P, 2) or (N, Hg, Wg, 2) as (x, y) in [0, 1].
    Returns (N, C, P) or (N, C, Hg, Wg).
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords.to(input.dtype) - 1.0, **kwargs)
    return output.squeeze(3) if add_dim else output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of (R, 1, ...) logits: −|logit| (most uncertain = highest)."""
    assert logits.shape[1] == 1
    return -(torch.abs(logits.clone()))


def get_uncertain_point_coords_with_randomness(coarse_logits, uncertainty_func, num_points: int,
                                               oversample_ratio: float, importance_sample_ratio: float,
                                               sample_logits=None):
    """PointRend's importance sampling: (R, num_points, 2) coordinates in [0, 1].

    Draws ``num_points·oversample_ratio`` uniform points, keeps the ``importance_sample_ratio·num_points``
    most uncertain, and fills up with uniform points. ``sample_logits(coords) -> (R, 1, P)`` replaces
    ``point_sample(coarse_logits, coords)`` (the fused path samples without forming the logits);
    ``coarse_logits`` then only gives R, device and dtype.
    """
    assert oversample_ratio >= 1
    assert 0 <= importance_sample_ratio <= 1
    num_boxes = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device)
    if sample_logits is None:
        point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    else:
        point_logits = sample_logits(point_coords)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=device)
    idx += shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random_points, 2, device=device)], dim=1)
    return point_coords
