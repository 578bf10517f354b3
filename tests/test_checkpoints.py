"""fastseg.models.load_official: official checkpoints load as they are, strict, with clear errors.

The official module structures are rebuilt here, a few lines each, transcribed from the originals
(facebookresearch/Mask2Former msdeformattn.py + mask2former_transformer_decoder.py + maskformer_model.py,
open-mmlab/mmsegmentation backbones/mscan.py + decode_heads/ham_head.py with mmcv ConvModule's ``conv`` /
``gn`` names, ma-xu/Context-Cluster models/context_cluster.py): their state_dicts, with random values, are
the "official checkpoints".
"""
import pickle

import pytest
import torch
from torch import nn

import fastseg
from fastseg.models import (MSCAN, CheckpointMismatchError, LightHamHead, SegNeXt, build_mask2former, coc_tiny,
                            load_official)


class _Buf:
    def __init__(self, t):
        self.t = t


def M(**children):
    """An nn.Module holding the given submodules / parameters (tensors) / buffers (_Buf)."""
    m = nn.Module()
    for k, v in children.items():
        if isinstance(v, _Buf):
            m.register_buffer(k, v.t)
        elif isinstance(v, torch.Tensor):
            m.register_parameter(k, nn.Parameter(v))
        else:
            m.add_module(k, v)
    return m


def _randomize(module: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    out = {}
    for k, v in sd.items():
        out[k] = (torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.2).to(v.dtype) if v.is_floating_point() \
            else v.clone()
        if k.endswith("running_var"):
            out[k] = out[k].abs() + 0.5
    return out


# ------------------------------------------------------------------------------ Mask2Former (detectron2)
# the tiny configuration: conv_dim = hidden = mask_dim = 32, 4 heads, 1 deformable encoder layer, 3 decoder layers
C, NH, FF, Q, K, DEC = 32, 4, 64, 6, 5, 3
TINY = dict(hidden_dim=C, num_queries=Q, nheads=NH, dim_feedforward=FF, dec_layers=DEC, mask_dim=C, conv_dim=C,
            enc_layers=1, enc_nheads=NH, enc_dim_feedforward=FF, train_num_points=64)
BACKBONE_CH = (16, 32, 64, 128)


def d2_conv(cin, cout, k, norm=True):
    """detectron2 ``Conv2d(..., bias=use_bias, norm=get_norm("GN", cout))``: conv params + ``norm.*``."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
    if norm:
        conv.norm = nn.GroupNorm(32, cout)
    return conv


def official_pixel_decoder(n_levels=3, n_points=4, enc_layers=1):
    def enc_layer():
        attn = M(sampling_offsets=nn.Linear(C, NH * n_levels * n_points * 2),
                 attention_weights=nn.Linear(C, NH * n_levels * n_points),
                 value_proj=nn.Linear(C, C), output_proj=nn.Linear(C, C))
        return M(self_attn=attn, norm1=nn.LayerNorm(C), linear1=nn.Linear(C, FF), linear2=nn.Linear(FF, C),
                 norm2=nn.LayerNorm(C))

    return M(input_proj=nn.ModuleList(nn.Sequential(nn.Conv2d(c, C, 1), nn.GroupNorm(32, C))
                                      for c in BACKBONE_CH[1:][::-1]),
             transformer=M(encoder=M(layers=nn.ModuleList(enc_layer() for _ in range(enc_layers))),
                           level_embed=torch.zeros(n_levels, C)),
             mask_features=d2_conv(C, C, 1, norm=False),
             adapter_1=d2_conv(BACKBONE_CH[0], C, 1), layer_1=d2_conv(C, C, 3))


def official_predictor():
    return M(transformer_self_attention_layers=nn.ModuleList(
                 M(self_attn=nn.MultiheadAttention(C, NH), norm=nn.LayerNorm(C)) for _ in range(DEC)),
             transformer_cross_attention_layers=nn.ModuleList(
                 M(multihead_attn=nn.MultiheadAttention(C, NH), norm=nn.LayerNorm(C)) for _ in range(DEC)),
             transformer_ffn_layers=nn.ModuleList(
                 M(linear1=nn.Linear(C, FF), linear2=nn.Linear(FF, C), norm=nn.LayerNorm(C)) for _ in range(DEC)),
             decoder_norm=nn.LayerNorm(C), query_feat=nn.Embedding(Q, C), query_embed=nn.Embedding(Q, C),
             level_embed=nn.Embedding(3, C), input_proj=nn.ModuleList(nn.Sequential() for _ in range(3)),
             class_embed=nn.Linear(C, K + 1),
             mask_embed=M(layers=nn.ModuleList([nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)])))


def official_mask2former(backbone: nn.Module):
    """detectron2 ``MaskFormer`` meta-architecture: backbone, sem_seg_head (pixel_decoder, predictor),
    criterion (``empty_weight`` buffer); pixel_mean / pixel_std are non-persistent."""
    return M(backbone=backbone, sem_seg_head=M(pixel_decoder=official_pixel_decoder(), predictor=official_predictor()),
             criterion=M(empty_weight=_Buf(torch.ones(K + 1))))


def _m2f(seed=0):
    torch.manual_seed(seed)
    return build_mask2former("tiny", K, **TINY).eval()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_pixel_decoder_has_the_official_names():
    """Every key of fastseg's pixel decoder is the official one, with its shape (no renaming needed)."""
    ours = _m2f().pixel_decoder.state_dict()
    assert _shapes(ours) == _shapes(official_pixel_decoder().state_dict())
    assert _shapes(_m2f().predictor.state_dict()) == _shapes(official_predictor().state_dict())
    assert sum(k.startswith("transformer.encoder.layers.0.") for k in ours) == 16


def test_mask2former_official_checkpoint_loads_strict_and_computes_the_same(tmp_path):
    from fastseg.models import TinyResNet

    official = _randomize(official_mask2former(TinyResNet(BACKBONE_CH)), seed=1)
    reference = _m2f(seed=2)  # the same weights, mapped by hand: drop "sem_seg_head."
    reference.load_state_dict({k.removeprefix("sem_seg_head."): v for k, v in official.items()}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    # a detectron2 .pkl: {"model": {name: numpy array}, "__author__": ...}
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "test"}, f)
    for checkpoint in (official, {"model": official}, str(path)):
        model = _m2f(seed=3)
        with torch.no_grad():
            before = model(x)["pred_logits"]
        report = load_official(model, checkpoint)  # source detected from the keys
        assert report.source == "detectron2-mask2former" and len(report.loaded) == len(model.state_dict())
        with torch.no_grad():
            out = model(x)
        assert not torch.allclose(before, out["pred_logits"])
        torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["pred_masks"], expected["pred_masks"], rtol=1e-5, atol=1e-5)


def test_mask2former_parts_and_legacy_static_query():
    official = _randomize(official_mask2former(nn.Module()), seed=4)
    model = _m2f()
    report = load_official(model.pixel_decoder, official)  # bare pixel decoder: its part only
    assert "sem_seg_head.predictor.class_embed.weight" in report.ignored
    for k, v in model.pixel_decoder.state_dict().items():
        torch.testing.assert_close(v, official["sem_seg_head.pixel_decoder." + k])
    legacy = {k.replace("query_feat", "static_query"): v for k, v in official.items()}
    load_official(model.predictor, legacy, source="detectron2-mask2former")
    torch.testing.assert_close(model.predictor.query_feat.weight, official["sem_seg_head.predictor.query_feat.weight"])


def test_mask2former_detectron2_resnet_backbone_is_named_and_can_be_left_out():
    official = _randomize(official_mask2former(nn.Module()), seed=5)
    # detectron2's ResNet names (fastseg has no ResNet-50 of its own)
    official.update({"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                     "backbone.stem.conv1.norm.weight": torch.ones(64),
                     "backbone.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    model = _m2f()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.predictor.class_embed.weight.clone()
    with pytest.raises(CheckpointMismatchError) as e:
        load_official(model, official)
    msg = str(e.value)
    assert "backbone.res2.0.conv1.weight" in msg and "backbone.stem.conv1.weight" in msg
    assert "backbone.stem.0.weight" in msg  # the fastseg backbone key left without a value
    assert "ignore=('backbone.',)" in msg
    torch.testing.assert_close(model.predictor.class_embed.weight, head_before)  # nothing loaded
    report = load_official(model, official, ignore=("backbone.",))
    assert "backbone.res2.0.conv1.weight" in report.ignored
    torch.testing.assert_close(model.predictor.class_embed.weight,
                               official["sem_seg_head.predictor.class_embed.weight"])
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone_before[k])


def test_wrong_key_and_wrong_shape_are_named():
    from fastseg.models import TinyResNet

    official = _randomize(official_mask2former(TinyResNet(BACKBONE_CH)), seed=6)
    bad = dict(official)
    bad["sem_seg_head.pixel_decoder.transformer.layers.0.norm1.weight"] = bad.pop(
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm1.weight")
    bad["sem_seg_head.predictor.class_embed.bias"] = torch.zeros(K + 2)
    model = _m2f()
    with pytest.raises(CheckpointMismatchError) as e:
        load_official(model, bad)
    err = e.value
    assert err.unexpected == ["sem_seg_head.pixel_decoder.transformer.layers.0.norm1.weight"]
    assert err.missing == ["pixel_decoder.transformer.encoder.layers.0.norm1.weight "
                           "(official sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm1.weight)"]
    assert err.mismatched == [("sem_seg_head.predictor.class_embed.bias", (K + 2,), (K + 1,))]
    for s in ("transformer.layers.0.norm1.weight", "class_embed.bias checkpoint [7] vs model [6]"):
        assert s in str(err)
    report = load_official(model, bad, strict=False)
    assert report.unexpected == err.unexpected and report.mismatched == err.mismatched
    torch.testing.assert_close(model.predictor.query_feat.weight, official["sem_seg_head.predictor.query_feat.weight"])


def test_wrong_source_or_model_is_refused():
    official = _randomize(official_mask2former(nn.Module()), seed=7)
    with pytest.raises(ValueError, match="does not load into a SegNeXt"):
        load_official(_segnext(), official, source="detectron2-mask2former")
    with pytest.raises(ValueError, match="looks like 'detectron2-mask2former'"):
        load_official(_segnext(), {k: v for k, v in official.items()})
    with pytest.raises(TypeError, match="no official format for a Linear"):
        load_official(nn.Linear(2, 2), official)
    with pytest.raises(TypeError, match="not a tensor"):
        load_official(_m2f(), {"a": 1.0})


# ------------------------------------------------------------------------------------- SegNeXt (mmseg)
DIMS, RATIOS, HAM, NCLS = [8, 16, 32, 32], [2, 2, 2, 2], 32, 3


def mmseg_mscan(dims=DIMS, ratios=RATIOS, depths=(1, 1, 1, 1)):
    def block(d, r):
        gate = M(conv0=nn.Conv2d(d, d, 5, padding=2, groups=d),
                 **{f"conv{i}_{j}": nn.Conv2d(d, d, (k, 1) if j == 2 else (1, k), groups=d)
                    for i, k in enumerate((7, 11, 21)) for j in (1, 2)},
                 conv3=nn.Conv2d(d, d, 1))
        h = d * r
        return M(norm1=nn.BatchNorm2d(d), attn=M(proj_1=nn.Conv2d(d, d, 1), spatial_gating_unit=gate,
                                                 proj_2=nn.Conv2d(d, d, 1)),
                 norm2=nn.BatchNorm2d(d), mlp=M(fc1=nn.Conv2d(d, h, 1), dwconv=M(dwconv=nn.Conv2d(h, h, 3, groups=h)),
                                                fc2=nn.Conv2d(h, d, 1)),
                 layer_scale_1=torch.zeros(d), layer_scale_2=torch.zeros(d))

    m = nn.Module()
    for i, d in enumerate(dims):
        if i == 0:
            pe = M(proj=nn.Sequential(nn.Conv2d(3, d // 2, 3), nn.BatchNorm2d(d // 2), nn.GELU(),
                                      nn.Conv2d(d // 2, d, 3), nn.BatchNorm2d(d)))
        else:
            pe = M(proj=nn.Conv2d(dims[i - 1], d, 3), norm=nn.BatchNorm2d(d))
        setattr(m, f"patch_embed{i + 1}", pe)
        setattr(m, f"block{i + 1}", nn.ModuleList(block(d, ratios[i]) for _ in range(depths[i])))
        setattr(m, f"norm{i + 1}", nn.LayerNorm(d))
    return m


def mmseg_ham_head(in_channels=DIMS[1:]):
    def conv_module(cin, cout, norm=True):  # mmcv ConvModule: conv (bias only without norm) + gn
        return M(conv=nn.Conv2d(cin, cout, 1, bias=not norm), **({"gn": nn.GroupNorm(32, cout)} if norm else {}))

    return M(conv_seg=nn.Conv2d(HAM, NCLS, 1), squeeze=conv_module(sum(in_channels), HAM),
             hamburger=M(ham_in=conv_module(HAM, HAM, norm=False), ham_out=conv_module(HAM, HAM)),
             align=conv_module(HAM, HAM))


def _segnext(seed=0, fused=False):
    torch.manual_seed(seed)
    head = LightHamHead(in_channels=DIMS[1:], channels=HAM, ham_channels=HAM, num_classes=NCLS,
                        ham_kwargs=dict(MD_S=1, MD_R=4, train_steps=2, eval_steps=3, inv_t=100, rand_init=True))
    return SegNeXt(MSCAN(embed_dims=DIMS, depths=[1, 1, 1, 1], mlp_ratios=RATIOS, fused=fused), head).eval()


def _by_hand_segnext(official):
    return {k.replace(".conv.", ".0.").replace(".gn.", ".1.") if k.startswith("decode_head.") else k: v
            for k, v in official.items()}


def test_segnext_official_checkpoint_loads_strict_and_computes_the_same():
    official = _randomize(M(backbone=mmseg_mscan(), decode_head=mmseg_ham_head()), seed=8)
    reference = _segnext(seed=1)
    reference.load_state_dict(_by_hand_segnext(official), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(5)  # NMF2D draws random bases
        expected = reference(x)
    model = _segnext(seed=2)
    report = load_official(model, {"state_dict": official, "meta": {}})
    assert report.source == "mmseg-segnext"
    with torch.no_grad():
        torch.manual_seed(5)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # into the bare backbone / head: that part of the checkpoint, the rest reported as ignored
    backbone = _segnext(seed=3).backbone
    assert "decode_head.squeeze.conv.weight" in load_official(backbone, official).ignored
    with torch.no_grad():
        for a, b in zip(backbone(x), reference.backbone(x)):
            torch.testing.assert_close(a, b)
    # an MSCAN checkpoint of its own (ImageNet pretraining: no "backbone." prefix)
    backbone = _segnext(seed=5).backbone
    load_official(backbone, {k.removeprefix("backbone."): v for k, v in official.items() if k.startswith("backbone.")})
    torch.testing.assert_close(backbone.block1[0].layer_scale_1, official["backbone.block1.0.layer_scale_1"])
    head = _segnext(seed=4).decode_head
    load_official(head, official, source="mmseg-segnext")
    torch.testing.assert_close(head.squeeze[0].weight, official["decode_head.squeeze.conv.weight"])


def test_segnext_checkpoint_loads_into_patched_model():
    """fastseg.patch keeps the state_dict, so an official checkpoint loads after patching too."""
    official = _randomize(M(backbone=mmseg_mscan(), decode_head=mmseg_ham_head()), seed=9)
    model, report = fastseg.patch(_segnext())
    assert report.count("msca") == 4
    load_official(model, official)
    for k, v in _by_hand_segnext(official).items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_segnext_bn_named_convmodule_is_refused():
    official = _randomize(M(backbone=mmseg_mscan(), decode_head=mmseg_ham_head()), seed=10)
    official = {k.replace("squeeze.gn.", "squeeze.bn."): v for k, v in official.items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_official(_segnext(), official)
    assert "decode_head.squeeze.bn.weight" in e.value.unexpected
    assert "decode_head.squeeze.1.weight (official decode_head.squeeze.gn.weight)" in e.value.missing


# -------------------------------------------------------------------------------------- Context Cluster
COC = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], heads=[1, 1, 2, 2], head_dim=[4, 4, 4, 4])


def official_coc(fork_feat=False, num_classes=NCLS, mlp_ratios=(8, 8, 4, 4)):
    dims, heads, hd = COC["embed_dims"], COC["heads"], COC["head_dim"]

    def block(d, h, e, r):
        mixer = M(f=nn.Conv2d(d, h * e, 1), proj=nn.Conv2d(h * e, d, 1), v=nn.Conv2d(d, h * e, 1),
                  sim_alpha=torch.ones(1), sim_beta=torch.zeros(1))
        return M(norm1=nn.GroupNorm(1, d), token_mixer=mixer, norm2=nn.GroupNorm(1, d),
                 mlp=M(fc1=nn.Linear(d, d * r), fc2=nn.Linear(d * r, d)),
                 layer_scale_1=torch.zeros(d), layer_scale_2=torch.zeros(d))

    network = []
    for i, d in enumerate(dims):
        network.append(nn.Sequential(*[block(d, heads[i], hd[i], mlp_ratios[i]) for _ in range(COC["layers"][i])]))
        if i < 3:
            network.append(M(proj=nn.Conv2d(d, dims[i + 1], 3, 2, 1)))  # PointRecuder, norm = Identity
    m = M(patch_embed=M(proj=nn.Conv2d(5, dims[0], 4, 4)), network=nn.ModuleList(network))
    if fork_feat:
        for j, i in enumerate((0, 2, 4, 6)):
            m.add_module(f"norm{i}", nn.GroupNorm(1, dims[j]))
    else:
        m.norm, m.head = nn.GroupNorm(1, dims[-1]), nn.Linear(dims[-1], num_classes)
    return m


def test_coc_classification_checkpoint_loads_strict_and_computes_the_same():
    official = _randomize(official_coc(), seed=11)
    torch.manual_seed(1)
    reference = coc_tiny(num_classes=NCLS, **COC).eval()
    reference.load_state_dict(official, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    torch.manual_seed(2)
    model = coc_tiny(num_classes=NCLS, **COC).eval()
    assert load_official(model, {"state_dict": official, "epoch": 3}).source == "coc"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # a classification checkpoint into the segmentation backbone: head / norm do not fit, norm0.. are missing
    with pytest.raises(CheckpointMismatchError) as e:
        load_official(coc_tiny(fork_feat=True, **COC), official)
    assert {"head.weight", "norm.weight"} <= set(e.value.unexpected) and "norm0.weight" in e.value.missing


def test_coc_segmentation_checkpoint_backbone():
    official = {"backbone." + k: v for k, v in _randomize(official_coc(fork_feat=True), seed=12).items()}
    official.update({"neck.lateral_convs.0.conv.weight": torch.zeros(4, 8, 1, 1),
                     "decode_head.conv_seg.weight": torch.zeros(NCLS, 4, 1, 1)})  # semantic FPN (not in fastseg)
    model = coc_tiny(fork_feat=True, **COC).eval()
    with pytest.raises(CheckpointMismatchError) as e:
        load_official(model, official)
    assert e.value.unexpected == ["decode_head.conv_seg.weight", "neck.lateral_convs.0.conv.weight"]
    assert "ignore=('decode_head.', 'neck.')" in str(e.value)
    load_official(model, official, ignore=("neck.", "decode_head."))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, official["backbone." + k])
