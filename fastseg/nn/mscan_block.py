"""MSCAN ``Block`` with its BatchNorms (and layer scales) folded into the neighbouring 1x1 convs in eval mode.

SegNeXt's block is ``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``, where ``attn(n) =
proj_2(MSCA(GELU(proj_1(n)))) + n`` and ``mlp = fc2(GELU(dw3x3(fc1(.))))``. In eval (running statistics,
no drop path / dropout) each BatchNorm is the per-channel affine map ``s*x + t``, so

* ``proj_1(norm1(x)) = (W * s) x + (b + W t)`` and ``fc1(norm2(x))`` likewise: the normalised maps are never
  written;
* the layer scales go into ``proj_2`` and ``fc2``, and the attention shortcut ``ls1 * norm1(x)`` into one
  ``x * (1 + ls1 s) + ...`` pass.

Same math as the reference block (rounding differs at the last bits); in training mode, or when a BatchNorm
has no running statistics, it runs the reference block's forward unchanged. The weights are folded on every
call (a few C x C ops), so parameter updates and ``load_state_dict`` are always seen, and gradients flow to
every parameter as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mscan import Block, DropPath
from .mlp_dwconv import MSCANMlp

__all__ = ["MSCANBlock", "fold_bn"]


def _foldable(bn: nn.BatchNorm2d) -> bool:
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def fold_bn(bn: nn.BatchNorm2d):
    """(scale, shift) of an eval-mode BatchNorm2d: ``bn(x) == scale[:, None, None] * x + shift[:, None, None]``."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


class MSCANBlock(Block):
    """``MSCANBlock(dim, mlp_ratio=4., drop=0., drop_path=0.)``: SegNeXt's ``Block`` (same parameters and
    state_dict) whose eval forward folds norm1/norm2 into proj_1/fc1 and the layer scales into proj_2/fc2."""

    @classmethod
    def from_block(cls, block: Block) -> "MSCANBlock":
        """A copy of ``block`` (weights, device, dtype, train/eval, the attention and MLP modules kept)."""
        dim, hidden = block.norm1.num_features, block.mlp.fc1.out_channels
        p = block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
        new = cls(dim, mlp_ratio=(hidden + 0.5) / dim, drop=block.mlp.drop.p, drop_path=p)
        for name in ("norm1", "attn", "drop_path", "norm2", "mlp"):
            setattr(new, name, getattr(block, name))
        new.layer_scale_1, new.layer_scale_2 = block.layer_scale_1, block.layer_scale_2
        return new.train(block.training)

    def forward(self, x, H, W):
        if self.training or not (_foldable(self.norm1) and _foldable(self.norm2)):
            return super().forward(x, H, W)
        B, N, C = x.shape
        x = x.permute(0, 2, 1).view(B, C, H, W)
        x = self._attn_eval(x)
        x = self._mlp_eval(x)
        return x.view(B, C, N).permute(0, 2, 1)

    def _attn_eval(self, x):
        a = self.attn
        s, t = fold_bn(self.norm1)
        w1 = a.proj_1.weight
        z = F.conv2d(x, w1 * s[None, :, None, None], a.proj_1.bias + w1.flatten(1) @ t)
        z = a.spatial_gating_unit(a.activation(z))
        ls = self.layer_scale_1
        y = F.conv2d(z, a.proj_2.weight * ls[:, None, None, None], (a.proj_2.bias + t) * ls)
        # x + ls1 * (proj_2(z) + norm1(x)) = y + x * (1 + ls1 * s)
        return torch.addcmul(y, x, (1 + ls * s)[:, None, None])

    def _mlp_eval(self, x):
        m = self.mlp
        s, t = fold_bn(self.norm2)
        w1 = m.fc1.weight
        h = F.conv2d(x, w1 * s[None, :, None, None], m.fc1.bias + w1.flatten(1) @ t)
        if isinstance(m, MSCANMlp):
            from ..ops.mlp_dwconv import dwconv3x3_gelu

            h = dwconv3x3_gelu(h, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias)
        else:
            h = m.act(m.dwconv(h))
        ls = self.layer_scale_2
        return x + F.conv2d(h, m.fc2.weight * ls[:, None, None, None], m.fc2.bias * ls)
