"""Build this project's reference :class:`~fastseg.models.Mask2Former` from a Hugging Face
``Mask2FormerForUniversalSegmentation`` (same weights, same function): lets the fused path and the
benchmarks run on real checkpoints, and checks the reference against an independent port.
"""
from __future__ import annotations

import torch
from torch import nn

from .mask2former import Mask2Former

__all__ = ["mask2former_from_hf", "HFBackbone"]


class HFBackbone(nn.Module):
    """Wraps a Hugging Face backbone (``model.model.pixel_level_module.encoder``): images -> list of 4 maps."""

    def __init__(self, encoder: nn.Module, out_channels: list[int]):
        super().__init__()
        self.encoder = encoder
        self.out_channels = list(out_channels)

    def forward(self, x):
        return list(self.encoder(x).feature_maps)


def _hf_state_to_fastseg(sd: dict, dec_layers: int, enc_layers: int) -> dict:
    out = {}
    pd, tm = "model.pixel_level_module.decoder.", "model.transformer_module."

    def take(dst, src):
        out[dst] = sd[src]

    for k, v in sd.items():  # backbone: kept as is under the wrapper
        if k.startswith("model.pixel_level_module.encoder."):
            out["backbone.encoder." + k[len("model.pixel_level_module.encoder."):]] = v
    for i in range(3):
        for j in (0, 1):
            for p in ("weight", "bias"):
                take(f"pixel_decoder.input_proj.{i}.{j}.{p}", f"{pd}input_projections.{i}.{j}.{p}")
    take("pixel_decoder.transformer.level_embed", f"{pd}level_embed")
    names = {"self_attn.sampling_offsets": "self_attn.sampling_offsets",
             "self_attn.attention_weights": "self_attn.attention_weights", "self_attn.value_proj": "self_attn.value_proj",
             "self_attn.output_proj": "self_attn.output_proj", "norm1": "self_attn_layer_norm", "linear1": "fc1",
             "linear2": "fc2", "norm2": "final_layer_norm"}
    for layer in range(enc_layers):
        for mine, theirs in names.items():
            for p in ("weight", "bias"):
                take(f"pixel_decoder.transformer.encoder.layers.{layer}.{mine}.{p}", f"{pd}encoder.layers.{layer}.{theirs}.{p}")
    for p in ("weight", "bias"):
        take(f"pixel_decoder.mask_features.{p}", f"{pd}mask_projection.{p}")
    idx = 1
    while f"{pd}adapter_{idx}.0.weight" in sd:
        for kind in ("adapter", "layer"):
            take(f"pixel_decoder.{kind}_{idx}.weight", f"{pd}{kind}_{idx}.0.weight")
            if f"{pd}{kind}_{idx}.0.bias" in sd:
                take(f"pixel_decoder.{kind}_{idx}.bias", f"{pd}{kind}_{idx}.0.bias")
            for p in ("weight", "bias"):
                take(f"pixel_decoder.{kind}_{idx}.norm.{p}", f"{pd}{kind}_{idx}.1.{p}")
        idx += 1
    take("predictor.query_feat.weight", f"{tm}queries_features.weight")
    take("predictor.query_embed.weight", f"{tm}queries_embedder.weight")
    take("predictor.level_embed.weight", f"{tm}level_embed.weight")
    for i in range(3):
        for p in ("weight", "bias"):
            if f"{tm}input_projections.{i}.{p}" in sd:
                take(f"predictor.input_proj.{i}.{p}", f"{tm}input_projections.{i}.{p}")
    for i in range(dec_layers):
        src = f"{tm}decoder.layers.{i}."
        ca, sa, ffn = (f"predictor.transformer_{n}_layers.{i}." for n in ("cross_attention", "self_attention", "ffn"))
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            take(ca + "multihead_attn." + p, src + "cross_attn." + p)
        for p in ("weight", "bias"):
            take(ca + "norm." + p, src + "cross_attn_layer_norm." + p)
            out[sa + "self_attn.in_proj_" + p] = torch.cat([sd[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            take(sa + "self_attn.out_proj." + p, src + "self_attn.out_proj." + p)
            take(sa + "norm." + p, src + "self_attn_layer_norm." + p)
            take(ffn + "linear1." + p, src + "fc1." + p)
            take(ffn + "linear2." + p, src + "fc2." + p)
            take(ffn + "norm." + p, src + "final_layer_norm." + p)
    for p in ("weight", "bias"):
        take(f"predictor.decoder_norm.{p}", f"{tm}decoder.layernorm.{p}")
        take(f"predictor.class_embed.{p}", f"class_predictor.{p}")
        for j in range(3):
            take(f"predictor.mask_embed.layers.{j}.{p}", f"{tm}decoder.mask_predictor.mask_embedder.{j}.0.{p}")
    return out


def mask2former_from_hf(hf_model: nn.Module, **kwargs) -> Mask2Former:
    """A :class:`Mask2Former` computing the same function as ``hf_model`` (a
    ``transformers.Mask2FormerForUniversalSegmentation``), with a copy of its weights; the HF backbone is
    reused through :class:`HFBackbone`. kwargs override :class:`Mask2Former` arguments (e.g. ``fused``)."""
    import copy

    cfg = hf_model.config
    encoder = copy.deepcopy(hf_model.model.pixel_level_module.encoder)
    channels = list(encoder.channels) if hasattr(encoder, "channels") else None
    if channels is None:
        raise ValueError("cannot read the backbone's channels (expected a transformers backbone with .channels)")
    args = dict(
        hidden_dim=cfg.hidden_dim, num_queries=cfg.num_queries, nheads=cfg.num_attention_heads,
        dim_feedforward=cfg.dim_feedforward, dec_layers=cfg.decoder_layers - 1, pre_norm=cfg.pre_norm,
        mask_dim=cfg.mask_feature_size, conv_dim=cfg.feature_size,
        enforce_input_project=cfg.enforce_input_projection, enc_layers=cfg.encoder_layers,
        enc_nheads=cfg.num_attention_heads, enc_dim_feedforward=cfg.encoder_feedforward_dim,
        enc_dropout=cfg.dropout, class_weight=cfg.class_weight, mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight, no_object_weight=cfg.no_object_weight, train_num_points=cfg.train_num_points,
        oversample_ratio=cfg.oversample_ratio, importance_sample_ratio=cfg.importance_sample_ratio,
        deep_supervision=cfg.use_auxiliary_loss)
    args.update(kwargs)
    ref = next(hf_model.parameters())
    model = Mask2Former(HFBackbone(encoder, channels), cfg.num_labels, in_channels=channels, **args)
    model = model.to(device=ref.device, dtype=ref.dtype)
    state = _hf_state_to_fastseg(hf_model.state_dict(), args["dec_layers"], args["enc_layers"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("criterion.")]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.train(hf_model.training)
