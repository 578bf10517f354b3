"""ECENet (Liu et al., "Boosting Semantic Segmentation from the Perspective of Explicit Class Embeddings",
ICCV 2023, arXiv 2308.12894): its building blocks and losses in plain PyTorch.

No official PyTorch code was published. This follows the MindSpore / msadapter port (code-implementation1/Code1,
``ECENet/sdt_head_1236length_total.py`` and ``ECENet/utils_mmcv.py``), with the port's parameter names, so a
converted port checkpoint can load. The port has inference code only: its loss classes (``SDTLoss``,
``DivLoss``) are named in its config, with their weights, but not included, so the loss formulas here are
reconstructed (see each function). The whole head lives in :mod:`fastseg.models.ecenet`.

Blocks (port name → here):

* FR, Feature Reconstruction (``AdaptiveFeatureSelector_1_layers``) → :class:`FeatureReconstruction`;
  its diversity loss → :func:`diversity_maps`, :func:`diversity_loss`.
* ECE, Explicit Class Extraction: masks from two 1×1 convs (the head's ``learner``), class embeddings from
  the pyramid-pooled masks (``TokenEmbedding_noCoord_seg``) → :class:`ClassEmbedding`.
* SAU, Semantics Attention & Updater: pixels attend to class embeddings (``FeaTransLayer`` /
  ``MultiHeadAttention``) → :class:`SemanticsAttentionLayer`, :class:`SemanticsAttention`, core
  :func:`sau_attention` (returns the head-mean logits, the new masks); gated update of the class embeddings
  (``TokenUpdator``) → :class:`ClassEmbeddingUpdater`.
* Ghost upsampling (``GhostUpscale``) → :class:`GhostUpscale`; the final fusion (``semantic_inference``) →
  :func:`class_mask_fusion`.
* Losses: :func:`mask_focal_loss`, :func:`mask_dice_loss`, :func:`class_mask_targets`, :func:`diversity_loss`.

Where the port and the paper disagree the port is followed (docs/ecenet.md lists every case): the SAU
softmax takes ``max - logits`` (= softmax of the *negated* logits), the FR channel weights have no sigmoid,
the port's ``ConvModule`` turns ``act_cfg=None`` into ReLU (so the SAU query projection has two ReLUs), and
the class probabilities of the fusion are the diagonal of the (K, K) class softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv_module import ConvModule

__all__ = ["ConvModule", "FeatureReconstruction", "diversity_maps", "diversity_loss", "ClassEmbedding",
           "ClassEmbeddingUpdater", "sau_attention", "SemanticsAttention", "SemanticsAttentionLayer",
           "GhostUpscale", "class_mask_fusion", "class_mask_targets", "mask_focal_loss", "mask_dice_loss",
           "pyramid_length"]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 → float32 for the loss reductions (sums over up to H·W pixels); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------------- FR


class FeatureReconstruction(nn.Module):
    """FR (``AdaptiveFeatureSelector_1_layers``): GhostNet-style intrinsic + cheap "diversified" branch.

    x (B, C, H, W) → ``(diversified, out)``: intrinsic x1 = BN(1×1 conv C→C/2, no bias); cheap
    x2 = BN(depthwise 3×3 conv of x1, with bias); channel weights s = Linear(C/2→C/4) → ReLU → Linear(C/4→C/2)
    of the global average of x2 (both without bias); diversified = x2 · s; out = 1×1 conv(cat[diversified,
    x1]) → (B, ⌊slct_ratio·C⌋, H, W), no bias. ``diversified`` (B, C/2, H, W) feeds the diversity loss.

    Port vs paper: the paper calls the channel weighting squeeze-and-excitation; the port applies the raw
    second Linear's output (no sigmoid), which is followed here.
    """

    def __init__(self, single_channels: int, slct_ratio: float = 1.0):
        super().__init__()
        c, h = single_channels, single_channels // 2
        self.k = int(slct_ratio * c)
        self.primary = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h))
        self.cheap = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h), nn.BatchNorm2d(h))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.layer_channel_slct = nn.Sequential(nn.Linear(h, h // 2, bias=False), nn.ReLU(),
                                                nn.Linear(h // 2, h, bias=False))
        self.conv_out = nn.Conv2d(c, self.k, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        s = self.layer_channel_slct(self.avg_pool(x2).flatten(-3))  # B, C/2
        diversified = x2 * s[:, :, None, None]
        return diversified, self.conv_out(torch.cat([diversified, x1], 1))


def diversity_maps(diversified: torch.Tensor) -> torch.Tensor:
    """The port's div-loss input: per channel a softmax over the H·W pixels, then the max over channels.

    (B, C', H, W) → (B, H·W), each value in (0, 1]; the sum over pixels lies in [1, min(C', H·W)].
    fp16 / bf16 inputs are computed in float32.
    """
    return F.softmax(_acc(diversified).flatten(-2), -1).max(dim=1)[0]


def diversity_loss(maps: list[torch.Tensor], channels: list[int]) -> torch.Tensor:
    """Diversity loss (reconstructed; the port's ``DivLoss(in_channels=..., loss_weight=0.2)`` is not public).

    Mutual-channel-loss form (Chang et al. 2020, whose diversity term the port's preprocessing —
    :func:`diversity_maps` — reproduces): per stage i, 1 − mean_b(Σ_p m_i[b, p]) / C'_i with C'_i the number
    of diversified channels (``in_channels[i] // 2``), averaged over the stages. It is 0 when every channel's
    spatial softmax peaks on its own pixel and 1 − 1/C'_i when all channels coincide. The weight 0.2 is
    applied by the caller. ``maps``: list of (B, P_i); ``channels``: list of C'_i.
    """
    if len(maps) != len(channels) or not maps:
        raise ValueError(f"diversity_loss: {len(maps)} maps for {len(channels)} channel counts")
    terms = [1.0 - m.sum(-1).mean() / c for m, c in zip(maps, channels)]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------------- ECE


def pyramid_length(num_tokens: int, ratio: float) -> int:
    """The port's largest pooling size: ⌊√K · ratio⌋, made odd (K = 150: ratio 1 → 13, ratio √2 → 17)."""
    length = int(math.sqrt(num_tokens) * ratio)
    return length if length % 2 else length + 1


class ClassEmbedding(nn.Module):
    """ECE's class embeddings (``TokenEmbedding_noCoord_seg``) from mask logits.

    mask (B, K, H, W) → adaptive average pooling of each class's mask to 1², 2², 3², 6² and L² bins
    (L = :func:`pyramid_length`), concatenated (50 + L² values per class) → ``cls_learner`` Linear → (B, K, C).
    The embedding of class k depends on its mask's spatial layout only (the "spatial prior" of the paper).
    """

    def __init__(self, num_tokens: int, out_dim: int = 128, ratio: float = 4):
        super().__init__()
        length = pyramid_length(num_tokens, ratio)
        self.pooling_size = (1, 2, 3, 6, length)
        self.pooling = nn.ModuleList([nn.AdaptiveAvgPool2d(s) for s in self.pooling_size])
        self.cls_learner = nn.Linear(length * length + 50, out_dim)

    def pooled(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) → (B, K, 50 + L²), the pyramid of pooled masks."""
        return torch.cat([pool(mask).flatten(start_dim=-2) for pool in self.pooling], -1)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.cls_learner(self.pooled(mask))


class ClassEmbeddingUpdater(nn.Module):
    """SAU's gated update of the class embeddings (``TokenUpdator``, K-Net's kernel update).

    ``forward(update, previous)``, both (B, K, C) → (B, K, C_out):
    [p_in, p_out] = dynamic_layer(update); g = σ(norm_in(update_gate(input_layer(previous) · p_in)));
    f = g · norm_out(p_out) + previous; out = ReLU(fc_norm(fc_layer(f))). LayerNorms; defaults of the
    port (sigmoid gate, no gate norm/act, no output activation).
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 64, out_channels: int | None = None,
                 gate_sigmoid: bool = True, gate_norm_act: bool = False, activate_out: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.out_channels = out_channels or in_channels
        self.gate_sigmoid = gate_sigmoid
        self.gate_norm_act = gate_norm_act
        self.activate_out = activate_out
        self.dynamic_layer = nn.Linear(in_channels, in_channels * 2)
        self.input_layer = nn.Linear(in_channels, in_channels)
        self.update_gate = nn.Linear(in_channels, feat_channels)
        if gate_norm_act:
            self.gate_norm = nn.LayerNorm(feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        self.activation = nn.ReLU(inplace=True)
        self.fc_layer = nn.Linear(feat_channels, self.out_channels)
        self.fc_norm = nn.LayerNorm(self.out_channels)

    def gate(self, update: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, normed p_out): the gate and the candidate before ``f = g · candidate + previous``."""
        param_in, param_out = self.dynamic_layer(update).chunk(2, dim=-1)
        gate_feats = self.input_layer(previous) * param_in
        if self.gate_norm_act:
            gate_feats = self.activation(self.gate_norm(gate_feats))
        g = self.norm_in(self.update_gate(gate_feats))
        if self.gate_sigmoid:
            g = g.sigmoid()
        param_out = self.norm_out(param_out)
        if self.activate_out:
            param_out = self.activation(param_out)
        return g, param_out

    def forward(self, update: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        g, candidate = self.gate(update, previous)
        return self.activation(self.fc_norm(self.fc_layer(g * candidate + previous)))


# ---------------------------------------------------------------------------------------------------- SAU


def sau_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: torch.Tensor | None = None,
                  dropout_p: float = 0.0, negate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SAU's core: pixels (queries) attend to class embeddings (keys).

    q (B, h, N, d) pixels, k / v (B, h, K, d) classes. a = q kᵀ · scale. Returns ``(out, mask_logits)``:
    out (B, h, N, d) = dropout(softmax(max(a) − a)) v and mask_logits (B, N, K) = mean over heads of a
    (before the softmax; the new class masks). Each attention row (over the K classes) sums to 1.

    Port vs paper: the port's "stable training" line ``max(a) − a`` makes the softmax that of **−a**
    (softmax is shift-invariant), i.e. a pixel attends most to the *least* similar class embeddings, while
    the emitted masks keep +a. The paper writes softmax(a). ``negate=False`` gives the paper's softmax(a).
    Equal to :func:`fastseg.reference.atm_attention` called with ``-scale`` and its logits negated.
    ``keep``: optional dropout keep mask broadcastable to (B, h, N, K) (kept weights scaled by 1/(1 − p)).
    """
    a = (q @ k.transpose(-2, -1)) * scale
    mask_logits = a.sum(dim=1) / q.shape[1]
    p = F.softmax(a.amax(-1, keepdim=True) - a if negate else a, dim=-1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, mask_logits


class _DepthwiseSeparable(nn.Module):
    """The port's ``DepthwiseSeparableConvModule`` without norm: depthwise k×k then pointwise 1×1 (both with
    bias), each followed by ReLU when ``act`` (the port's ``act_cfg=None`` → ReLU, see :class:`SemanticsAttention`)."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int, padding: int, bias: bool, act: bool):
        super().__init__()
        self.depthwise_conv = ConvModule(channels, channels, kernel_size, 1, padding, groups=channels, norm=False,
                                         act=act, bias=bias)
        self.pointwise_conv = ConvModule(channels, out_channels, 1, norm=False, act=act, bias=bias)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SemanticsAttention(nn.Module):
    """SAU's multi-head cross-attention (the port's ``MultiHeadAttention``).

    ``forward(query, key_value)``: query (B, C, H, W) pixel features, key_value (B, K, C) class embeddings →
    ``{'out': (B, C, H, W), 'attn': (B, H·W, K)}`` ('attn' = :func:`sau_attention`'s head-mean logits).
    q = depthwise-separable 3×3 conv of the pixels (``q``), [k, v] = Linear(C → 2C, no bias) of the classes
    (``kv``), output 1×1 conv ``proj``.

    Port quirk: the port's ``ConvModule`` replaces ``act_cfg=None`` by ReLU, so its ``q`` — built with
    ``act_cfg=None``, which in mmcv means no activation — applies ReLU after the depthwise and after the
    pointwise conv. ``q_act=True`` (default) follows the port; ``q_act=False`` is the mmcv reading.
    """

    def __init__(self, embed_dims: int, num_heads: int, kv_tokens: int = 150, attn_drop_rate: float = 0.0,
                 drop_rate: float = 0.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_bias: bool = True, negate: bool = True, q_act: bool = True):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"SemanticsAttention: embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = qk_scale or self.head_dims ** -0.5
        self.negate = negate
        self.q = _DepthwiseSeparable(embed_dims, embed_dims, 3, 1, qkv_bias, q_act)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=False)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Conv2d(embed_dims, embed_dims, 1, bias=proj_bias)
        self.proj_drop = nn.Dropout(drop_rate)

    def split_heads(self, query: torch.Tensor, key_value: torch.Tensor):
        """q (B, h, H·W, d), k, v (B, h, K, d) as the port reshapes them."""
        b, c, hh, ww = query.shape
        n_h, d = self.num_heads, self.head_dims
        q = self.q(query).reshape(b, n_h, d, hh * ww).transpose(-2, -1)
        k, v = self.kv(key_value).chunk(2, dim=-1)  # B, K, C each
        k = k.reshape(b, -1, n_h, d).transpose(1, 2)
        v = v.reshape(b, -1, n_h, d).transpose(1, 2)
        return q, k, v

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> dict:
        b, c, hh, ww = query.shape
        q, k, v = self.split_heads(query, key_value)
        keep = None
        p = self.attn_drop.p
        if self.training and p > 0:
            keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= p
        out, mask_logits = sau_attention(q, k, v, self.scale, keep, p, negate=self.negate)
        out = out.transpose(-2, -1).reshape(b, c, hh, ww)
        return {"attn": mask_logits, "out": self.proj_drop(self.proj(out))}


class SemanticsAttentionLayer(nn.Module):
    """One SAU stage (the port's ``FeaTransLayer``): pre-norm cross-attention of the pixels of a lower stage to
    the class embeddings, residual, then a conv MLP (1×1 C→rC, depthwise 3×3, GELU, 1×1 rC→C), residual.

    ``forward(low, high)``: low (B, C, H, W), high (B, K, C) → ``{'out': (B, C, H, W), 'attn': (B, H·W, K)}``.
    LayerNorms ``norm_low`` / ``norm_high`` / ``norm_mlp`` over channels.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 4, kv_tokens: int = 150, attn_drop_rate: float = 0.0,
                 drop_rate: float = 0.0, qkv_bias: bool = True, mlp_ratio: int = 4, negate: bool = True,
                 q_act: bool = True):
        super().__init__()
        self.norm_low = nn.LayerNorm(embed_dims)
        self.norm_high = nn.LayerNorm(embed_dims)
        self.cross_attn = SemanticsAttention(embed_dims, num_heads, kv_tokens, attn_drop_rate, drop_rate,
                                             qkv_bias=qkv_bias, negate=negate, q_act=q_act)
        self.norm_mlp = nn.LayerNorm(embed_dims)
        ffn = embed_dims * mlp_ratio
        self.mlp = nn.Sequential(nn.Conv2d(embed_dims, ffn, 1), nn.Conv2d(ffn, ffn, 3, 1, 1, groups=ffn), nn.GELU(),
                                 nn.Dropout(drop_rate), nn.Conv2d(ffn, embed_dims, 1), nn.Dropout(drop_rate))

    @staticmethod
    def _ln2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> dict:
        outs = self.cross_attn(self._ln2d(self.norm_low, low), self.norm_high(high))
        out = outs["out"] + low
        out = self.mlp(self._ln2d(self.norm_mlp, out)) + out
        return {"attn": outs["attn"], "out": out}


# -------------------------------------------------------------------------------------------- upsampling


class GhostUpscale(nn.Module):
    """Ghost-feature + pixel-shuffle upsampling (the port's ``GhostUpscale``), ×2 per layer.

    Each of log2(factor) layers: x1 = ConvModule 1×1 (C → ⌈4C/r⌉, BN, ReLU) (``primary``), x2 = depthwise
    ConvModule 3×3 of x1 (``cheap``), the first 4C channels of cat[x1, x2] pixel-shuffled by 2 → (B, C, 2H, 2W).
    """

    def __init__(self, channels: int, upscale_factor: int, ghost_ratio: int = 2):
        super().__init__()
        steps = int(math.log2(upscale_factor))
        if 2 ** steps != upscale_factor:
            raise ValueError(f"GhostUpscale: upscale_factor must be a power of 2, got {upscale_factor}")
        self.oup = channels * 4
        init_dims = math.ceil(self.oup / ghost_ratio)
        new_dims = init_dims * (ghost_ratio - 1)
        self.layers = nn.ModuleList([
            nn.ModuleDict({"primary": ConvModule(channels, init_dims, 1),
                           "cheap": ConvModule(init_dims, new_dims, 3, 1, 1, groups=init_dims)})
            for _ in range(steps)])

    def forward(self, x):
        for layer in self.layers:
            x1 = layer["primary"](x)
            x = torch.cat([x1, layer["cheap"](x1)], dim=1)
            x = F.pixel_shuffle(x[:, :self.oup], upscale_factor=2)
        return x


# ---------------------------------------------------------------------------------------- fusion, losses


def class_mask_fusion(cls_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """The port's ``semantic_inference``: class probability × mask.

    cls_logits (B, K, K) (the final class embeddings through ``trans``), mask_logits (B, K, H, W) →
    (B, K, H, W) = softmax(cls_logits, -1)[b, k, k] · σ(mask_logits[b, k]), values in (0, 1).
    The port writes ``einsum("bkk,bkhw->bkhw")``: the repeated index takes the diagonal, so embedding k
    contributes its probability of being class k only.
    """
    b, k = mask_logits.shape[:2]
    if cls_logits.shape != (b, k, k):
        raise ValueError(f"class_mask_fusion: cls_logits {tuple(cls_logits.shape)} must be ({b}, {k}, {k})")
    prob = cls_logits.softmax(-1).diagonal(dim1=1, dim2=2)  # B, K
    return prob[:, :, None, None] * mask_logits.sigmoid()


def class_mask_targets(labels: torch.Tensor, ignore_index: int = 255):
    """Per-image binary targets of the classes present (ignored pixels are negatives in every mask).

    labels (B, H, W) int → list over images of (classes (n_b,) int64, masks (n_b, H, W) float).
    """
    out = []
    for lab in labels:
        classes = lab.unique()
        classes = classes[classes != ignore_index]
        out.append((classes, (lab[None] == classes[:, None, None]).to(torch.float32)))
    return out


def mask_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25,
                    gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet), MaskFormer's reduction: mean over pixels, sum over masks / num_masks.

    logits, targets (N, P) → scalar. Per element: α_t (1 − p_t)^γ BCE(logit, target). fp16 / bf16 → float32.
    """
    logits, targets = _acc(logits), targets.to(_acc(logits).dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def mask_dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss 1 − (2 Σ p t + 1) / (Σ p + Σ t + 1) per mask (p = σ(logits)), summed / num_masks.

    logits, targets (N, P) → scalar. fp16 / bf16 → float32.
    """
    logits, targets = _acc(logits), targets.to(_acc(logits).dtype)
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks
