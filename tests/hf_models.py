"""A tiny Hugging Face Mask2Former (random init from a small config, no download) for the tests."""
import pytest
import torch


def tiny_hf_mask2former(**overrides):
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.Mask2FormerConfig(
        backbone_config=swin, use_pretrained_backbone=False, hidden_dim=32, mask_feature_size=32, feature_size=32,
        num_queries=6, encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=64,
        encoder_feedforward_dim=64, num_labels=5, train_num_points=64, **overrides)
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(cfg)


def targets(dtype, size=64):
    g = torch.Generator().manual_seed(3)
    return [{"labels": torch.tensor([1, 3]), "masks": (torch.rand(2, size, size, generator=g) > 0.5).to(dtype)},
            {"labels": torch.tensor([0]), "masks": (torch.rand(1, size, size, generator=g) > 0.5).to(dtype)}]


def tiny_hf_oneformer(**overrides):
    """A tiny Hugging Face OneFormer (random init, no download); its query transformer has attention dropout 0.1
    (``dropout=0.0`` in ``overrides`` for exact train-mode comparisons)."""
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.OneFormerConfig(
        backbone_config=swin, use_pretrained_backbone=False, hidden_dim=32, conv_dim=32, mask_dim=32, num_queries=6,
        encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=64, encoder_feedforward_dim=64,
        num_labels=5, task_seq_len=8, text_encoder_width=32, text_encoder_context_length=8, text_encoder_num_layers=1,
        text_encoder_vocab_size=50, text_encoder_n_ctx=2, query_dec_layers=1, train_num_points=64, **overrides)
    torch.manual_seed(0)
    return transformers.OneFormerForUniversalSegmentation(cfg)


def tiny_hf_maskformer(**overrides):
    """A tiny Hugging Face MaskFormer (Swin backbone, DETR decoder; random init, no download)."""
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    detr = dict(model_type="detr", d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, num_queries=6)
    cfg = transformers.MaskFormerConfig(backbone_config=swin, use_pretrained_backbone=False, mask_feature_size=32,
                                        fpn_feature_size=32, num_labels=5, decoder_config=detr, **overrides)
    torch.manual_seed(0)
    return transformers.MaskFormerForInstanceSegmentation(cfg)
