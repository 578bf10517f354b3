"""SegViT's Attention-to-Mask heads, as the official ones (zbwxp/SegVit ``decode_heads/atm_head.py``,
``atm_single_head.py``, ``tpn_atm_head.py``), with the same module names (checkpoints' ``decode_head.*`` keys).

* :class:`TPNDecoderLayer`: ``nn.TransformerDecoderLayer`` (post-norm, ReLU, dropout 0.1) whose cross-attention
  ``multihead_attn`` is :class:`fastseg.reference.ATMAttention` (``qkv_bias=True``, ``attn_drop=0.1``); returns
  ``(tgt, attn)`` with attn (B, K, HW) the head-mean pre-softmax logits. That attribute is what the fused ATM
  attention's drop-in (same state_dict) replaces through ``fastseg.patch``.
* :class:`TPNDecoder`: ``nn.TransformerDecoder`` of those layers; the last layer's ``(output, attn)``, or every
  layer's (``return_intermediate=True``, the ``atm_single_head.py`` variant).
* :class:`ATMHead`: per used stage (deepest first) ``input_proj_i`` (Linear) + ``proj_norm_i`` (LayerNorm) +
  ``decoder_i``; the ``nn.Embedding(num_classes, dim)`` class queries run through the stages in turn; each stage's
  logits are a mask map, summed over stages (bilinear to the last stage's size), the sum resized to
  ``img_size``; ``class_embed`` (K + 1 logits); ``pred`` = softmax(class)[..., :-1] · sigmoid(mask)
  (``einsum bqc,bqhw->bchw``). Training: a dict with ``aux_outputs`` (earlier stages); eval: ``pred`` only.
* :class:`ATMSingleHead`: one decoder, every layer a prediction (not summed); laterals of several stages fused
  by addition (nearest 2x up-sampling when sizes differ).
* :class:`TPNATMHead`: the Shrunk structure's head — ``(img_size // shrink_ratio)^2`` learnable spatial queries
  decode the backbone stages with plain ``nn.TransformerDecoder`` s (stage order kept), are reshaped to a map
  and fed to an ``ATMSingleHead`` (``atm``, no projection).

Every head holds its ``loss_decode`` (:class:`fastseg.models.atm_loss.ATMLoss`) as mmseg's ``BaseDecodeHead``
does and has ``losses(seg_logit, seg_label)`` (loss dict + ``acc_seg``). Not implemented: ``crop_train`` and
``CE_loss`` (off in every official config).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.atm_attention import ATMAttention
from .atm_loss import ATMLoss

__all__ = ["TPNDecoderLayer", "TPNDecoder", "ATMHead", "ATMSingleHead", "TPNATMHead", "d3_to_d4", "d4_to_d3",
           "seg_accuracy"]


def d3_to_d4(t: torch.Tensor) -> torch.Tensor:
    """(n, hw, c) -> (n, c, h, h) as the official: an odd ``hw`` drops the first (cls) token, h = int(sqrt(hw)).
    One extension: an odd ``hw`` that is itself a square (an odd grid side, e.g. 3x3) keeps all its tokens —
    the official reshape fails there, so no working case changes."""
    n, hw, c = t.shape
    h = math.isqrt(hw)
    if hw % 2 != 0 and h * h != hw:
        t = t[:, 1:]
        h = int(math.sqrt(hw))
    if h * h != t.shape[1]:
        raise ValueError(f"ATM heads need a square token grid (official d3_to_d4), got {hw} tokens")
    return t.transpose(1, 2).reshape(n, c, h, h)


def d4_to_d3(t: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (n, h*w, c)."""
    return t.flatten(-2).transpose(-1, -2)


def _add_stage_projection(head: nn.Module, i: int, use_proj: bool, in_channels: int, dim: int) -> None:
    """Stage i's ``input_proj_{i+1}`` (Linear, trunc-normal(0.02) weight) and ``proj_norm_{i+1}`` (LayerNorm),
    or identities without ``use_proj``: registered on the head and appended to its plain lists, as both official
    ATM heads do."""
    if use_proj:
        proj = nn.Linear(in_channels, dim)
        nn.init.trunc_normal_(proj.weight, std=0.02)
        norm = nn.LayerNorm(dim)
    else:
        proj, norm = nn.Identity(), nn.Identity()
    head.add_module(f"input_proj_{i + 1}", proj)
    head.add_module(f"proj_norm_{i + 1}", norm)
    head.input_proj.append(proj)
    head.proj_norm.append(norm)


def seg_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """mmseg's top-1 ``accuracy`` in percent: pred (B, K, H, W), target (B, H, W); ignored pixels left out."""
    label = pred.argmax(dim=1)
    valid = target != ignore_index
    eps = torch.finfo(torch.float32).eps
    correct = (label == target)[valid].float().sum() + eps
    return correct * (100.0 / (valid.sum().item() + eps))


def _to_fp32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class TPNDecoderLayer(nn.TransformerDecoderLayer):
    """Official ``TPN_DecoderLayer``: sequence-first tgt (K, B, C), memory (HW, B, C) ->
    ``(tgt (K, B, C), attn (B, K, HW))``. Masks / padding masks are accepted and ignored by the cross-attention,
    as the official forward."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.multihead_attn
        self.multihead_attn = ATMAttention(kwargs["d_model"], num_heads=kwargs["nhead"], qkv_bias=True,
                                           attn_drop=0.1)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, **_):
        tgt2 = self.self_attn(tgt, tgt, tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2, attn2 = self.multihead_attn(tgt.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1))
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        return tgt, attn2


class TPNDecoder(nn.TransformerDecoder):
    """Official ``TPN_Decoder``: ``(output, attn)`` of the last layer, or (``return_intermediate``) the lists
    of every layer's (the ``atm_single_head.py`` version; ``norm`` is then applied to the last output only
    and not to the list, as there)."""

    def __init__(self, decoder_layer, num_layers, norm=None, return_intermediate: bool = False):
        super().__init__(decoder_layer, num_layers, norm=norm)
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, **_):
        output = tgt
        outputs, attns = [], []
        for mod in self.layers:
            output, attn = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                               tgt_key_padding_mask=tgt_key_padding_mask,
                               memory_key_padding_mask=memory_key_padding_mask)
            outputs.append(output)
            attns.append(attn)
        if self.return_intermediate:
            return outputs, attns
        if self.norm is not None:
            output = self.norm(output)
        return output, attn


class _ATMBase(nn.Module):
    """Shared parts: the per-stage projection / norm / decoder modules (official names), queries, class head,
    output assembly, semantic inference and losses."""

    def __init__(self, img_size: int, in_channels: int, embed_dims: int, num_layers: int, num_heads: int,
                 use_stages: int, use_proj: bool, num_classes: int, ignore_index: int, loss_decode,
                 dec_layers: int, return_intermediate: bool):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = img_size, in_channels, num_classes
        self.use_stages, self.ignore_index = use_stages, ignore_index
        self.loss_decode = ATMLoss(num_classes, dec_layers) if loss_decode is None else loss_decode
        dim = embed_dims
        self.input_proj, self.proj_norm, self.decoder = [], [], []  # plain lists, as the official
        for i in range(use_stages):
            _add_stage_projection(self, i, use_proj, in_channels, dim)
            layer = TPNDecoderLayer(d_model=dim, nhead=num_heads, dim_feedforward=dim * 4)
            decoder = TPNDecoder(layer, num_layers, return_intermediate=return_intermediate)
            self.add_module(f"decoder_{i + 1}", decoder)
            self.decoder.append(decoder)
        self.q = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def init_weights(self) -> None:
        """Official: every Linear trunc-normal(0.02) with zero bias, every LayerNorm 1 / 0 (the class queries
        keep ``nn.Embedding``'s N(0, 1); ``in_proj_weight`` of the self-attentions keeps xavier)."""
        for _, m in self.named_modules():
            _trunc_normal_init(m)

    @staticmethod
    def semantic_inference(mask_cls, mask_pred):
        mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", mask_cls, mask_pred.sigmoid())

    def _assemble(self, qs, seg_masks):
        """qs: list of (B, K, C); seg_masks: list of (B, K, h, w) mask logits at the last map's size."""
        outputs_class = self.class_embed(torch.stack(qs, dim=0))
        out = {"pred_logits": outputs_class[-1]}
        out["pred_masks"] = F.interpolate(seg_masks[-1], size=(self.image_size, self.image_size),
                                          mode="bilinear", align_corners=False)
        out["pred"] = self.semantic_inference(out["pred_logits"], out["pred_masks"])
        if not self.training:
            return out["pred"]
        out["aux_outputs"] = [{"pred_logits": a, "pred_masks": b}
                              for a, b in zip(outputs_class[:-1], seg_masks[:-1])]
        return out

    def losses(self, seg_logit: dict, seg_label: torch.Tensor) -> dict:
        """seg_logit: the training dict; seg_label (B, 1, H, W) or (B, H, W). Weighted ATM losses + acc_seg."""
        if seg_label.dim() == 4:
            seg_label = seg_label.squeeze(1)
        seg_logit = _to_fp32(seg_logit)  # the official @force_fp32(apply_to=('seg_logit',))
        loss = self.loss_decode(seg_logit, seg_label, ignore_index=self.ignore_index)
        with torch.no_grad():
            loss["acc_seg"] = seg_accuracy(seg_logit["pred"], seg_label, self.ignore_index)
        return loss


class ATMHead(_ATMBase):
    """Official ``ATMHead``. ``forward(inputs)``: the backbone's stages, shallow to deep, each (B, C, h, w) or
    (B, h*w, C) (square grids); the first ``use_stages`` are used, deepest first. Returns (eval)
    ``pred`` (B, K, img_size, img_size) class scores, or (train) the dict ``pred_logits`` (B, K, K+1),
    ``pred_masks`` (B, K, img_size, img_size), ``pred``, ``aux_outputs`` (masks at the last stage's size).
    Config of SegViT ViT-B: ``in_channels=768, embed_dims=384, num_heads=12, num_layers=3, use_stages=3``."""

    def __init__(self, img_size: int, in_channels: int, embed_dims: int = 768, num_layers: int = 3,
                 num_heads: int = 8, use_stages: int = 3, use_proj: bool = True, *, num_classes: int,
                 ignore_index: int = 255, loss_decode: nn.Module | None = None):
        super().__init__(img_size, in_channels, embed_dims, num_layers, num_heads, use_stages, use_proj,
                         num_classes, ignore_index, loss_decode, dec_layers=use_stages, return_intermediate=False)

    def forward(self, inputs):
        x = [d4_to_d3(s) if s.dim() > 3 else s for s in inputs[: self.use_stages]]
        x.reverse()
        bs = x[0].shape[0]
        q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
        attns, qs = [], []
        for x_, proj_, norm_, decoder_ in zip(x, self.input_proj, self.proj_norm, self.decoder):
            lateral = norm_(proj_(x_))
            q, attn = decoder_(q, lateral.transpose(0, 1))
            attns.append(d3_to_d4(attn.transpose(-1, -2)))
            qs.append(q.transpose(0, 1))
        size = attns[-1].shape[-2:]
        seg_masks = []
        for i, attn in enumerate(attns):
            m = F.interpolate(attn, size=size, mode="bilinear", align_corners=False)
            seg_masks.append(m if i == 0 else seg_masks[i - 1] + m)
        return self._assemble(qs, seg_masks)


class ATMSingleHead(_ATMBase):
    """Official ``ATMSingleHead`` (used by :class:`TPNATMHead` with ``use_stages=1, use_proj=False``): the used
    stages' laterals are fused (deepest first, ``lateral_i + nearest_2x(lateral_{i-1})``), the last fused
    lateral is decoded by every decoder in turn, and every decoder layer gives one prediction."""

    def __init__(self, img_size: int, in_channels: int, embed_dims: int = 768, num_layers: int = 3,
                 num_heads: int = 8, use_stages: int = 3, use_proj: bool = True, *, num_classes: int,
                 ignore_index: int = 255, loss_decode: nn.Module | None = None):
        super().__init__(img_size, in_channels, embed_dims, num_layers, num_heads, use_stages, use_proj,
                         num_classes, ignore_index, loss_decode, dec_layers=num_layers * use_stages,
                         return_intermediate=True)

    def forward(self, inputs):
        x = [d4_to_d3(s) if s.dim() > 3 else s for s in inputs[: self.use_stages]]
        x.reverse()
        bs = x[0].shape[0]
        laterals = []
        for idx, (x_, proj_, norm_) in enumerate(zip(x, self.input_proj, self.proj_norm)):
            lateral = norm_(proj_(x_))
            if idx == 0:
                laterals.append(lateral)
            elif laterals[idx - 1].shape[1] == lateral.shape[1]:
                laterals.append(lateral + laterals[idx - 1])
            else:
                prev = F.interpolate(d3_to_d4(laterals[idx - 1]), scale_factor=2, mode="nearest")
                laterals.append(d4_to_d3(prev) + lateral)
        lateral = laterals[-1]
        q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
        attns, qs = [], []
        for decoder_ in self.decoder:
            q_, attn_ = decoder_(q, lateral.transpose(0, 1))
            for q, attn in zip(q_, attn_):
                attns.append(d3_to_d4(attn.transpose(-1, -2)))
                qs.append(q.transpose(0, 1))
        size = attns[-1].shape[-2:]
        seg_masks = [F.interpolate(a, size=size, mode="bilinear", align_corners=False) for a in attns]
        return self._assemble(qs, seg_masks)


class TPNATMHead(nn.Module):
    """Official ``TPNATMHead`` (Shrunk). ``forward(inputs)``: stages (B, N_i, C) or (B, C, h, w), used in the
    given order (not reversed); ``(img_size // shrink_ratio)^2`` spatial queries (``q``) pass ``decoder_i``
    (plain post-norm ``nn.TransformerDecoder``) over ``proj_norm_i(input_proj_i(stage_i))``; the result, as a
    square map, is the single input of ``atm`` (:class:`ATMSingleHead`, ``use_proj=False``), whose output
    this returns. Shrunk ViT-L config: ``in_channels=1024, embed_dims=512, num_heads=16, num_layers=3,
    use_stages=2`` on ViT stages 7 (1/16) and 23 (1/32)."""

    def __init__(self, img_size: int, in_channels: int, embed_dims: int = 768, num_layers: int = 3,
                 num_heads: int = 8, use_stages: int = 3, shrink_ratio: int = 16, use_proj: bool = True, *,
                 num_classes: int, ignore_index: int = 255, loss_decode: nn.Module | None = None):
        super().__init__()
        self.use_stages, self.image_size, self.num_classes = use_stages, img_size, num_classes
        self.ignore_index = ignore_index
        self.loss_decode = ATMLoss(num_classes, num_layers) if loss_decode is None else loss_decode
        dim = embed_dims
        self.input_proj, self.proj_norm, self.decoder = [], [], []
        for i in range(use_stages):
            _add_stage_projection(self, i, use_proj, in_channels, dim)
            layer = nn.TransformerDecoderLayer(d_model=dim, nhead=num_heads, dim_feedforward=dim * 4)
            decoder = nn.TransformerDecoder(layer, num_layers)
            self.add_module(f"decoder_{i + 1}", decoder)
            self.decoder.append(decoder)
        self.q = nn.Embedding((img_size // shrink_ratio) ** 2, dim)
        self.atm = ATMSingleHead(img_size, in_channels, embed_dims, num_layers, num_heads, use_stages=1,
                                 use_proj=False, num_classes=num_classes, ignore_index=ignore_index,
                                 loss_decode=ATMLoss(num_classes, num_layers))

    def init_weights(self) -> None:
        """Official: every Linear (the ``atm`` head's included) trunc-normal(0.02), zero bias; LayerNorms 1 / 0."""
        for _, m in self.named_modules():
            _trunc_normal_init(m)

    def forward(self, inputs):
        x = [d4_to_d3(s) if s.dim() > 3 else s for s in inputs[: self.use_stages]]
        bs = x[0].shape[0]
        q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
        for x_, proj_, norm_, decoder_ in zip(x, self.input_proj, self.proj_norm, self.decoder):
            q = decoder_(q, norm_(proj_(x_)).transpose(0, 1))
        return self.atm([d3_to_d4(q.transpose(0, 1))])

    losses = _ATMBase.losses
