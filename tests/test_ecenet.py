"""ECENet reference (fastseg.reference.ecenet, fastseg.models.ecenet): hand-computed cases, the properties the
paper / port state, and forward + backward of the head and a tiny MSCAN + ECENet model. CPU, tiny sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastseg.models import MSCAN, ECENetHead, ECENetSegmentor, mscan_t_ecenet
from fastseg.reference import atm_attention
from fastseg.reference.ecenet import (ClassEmbedding, ClassEmbeddingUpdater, FeatureReconstruction, GhostUpscale,
                                      SemanticsAttention, class_mask_fusion, class_mask_targets, diversity_loss,
                                      diversity_maps, mask_dice_loss, mask_focal_loss, pyramid_length, sau_attention)


@pytest.fixture(autouse=True)
def _fp64_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------- ECE


def test_pyramid_length_matches_port_configs():
    assert pyramid_length(150, 1.0) == 13  # the released config (ratio=1): 12 -> odd 13
    assert pyramid_length(150, math.sqrt(2)) == 17  # the head's default ratio
    assert pyramid_length(171, 1.0) == 13
    assert ClassEmbedding(150, 32, 1.0).cls_learner.in_features == 13 * 13 + 50


def test_class_embedding_pools_each_mask_hand_computed():
    emb = ClassEmbedding(num_tokens=1, out_dim=3, ratio=1.0)  # L = 1: bins 1, 2, 3, 6, 1
    assert emb.pooling_size == (1, 2, 3, 6, 1)
    mask = torch.arange(36.0).reshape(1, 1, 6, 6)
    pooled = emb.pooled(mask)[0, 0]
    assert pooled.shape == (51,)
    m = mask[0, 0]
    assert pooled[0] == m.mean() and pooled[50] == m.mean()
    assert torch.equal(pooled[1:5], torch.stack([m[:3, :3].mean(), m[:3, 3:].mean(), m[3:, :3].mean(),
                                                 m[3:, 3:].mean()]))
    assert torch.equal(pooled[5:14], torch.stack([m[i:i + 2, j:j + 2].mean() for i in (0, 2, 4) for j in (0, 2, 4)]))
    assert torch.equal(pooled[14:50], m.flatten())
    out = emb(mask)
    assert torch.allclose(out[0, 0], emb.cls_learner.weight @ pooled + emb.cls_learner.bias)


def test_class_embedding_depends_on_own_mask_only():
    emb = ClassEmbedding(num_tokens=5, out_dim=8, ratio=1.0)
    mask = torch.randn(2, 5, 7, 9)
    base = emb(mask)
    mask2 = mask.clone()
    mask2[:, 3] += torch.randn(2, 7, 9)
    moved = emb(mask2)
    assert torch.equal(base[:, [0, 1, 2, 4]], moved[:, [0, 1, 2, 4]])
    assert not torch.allclose(base[:, 3], moved[:, 3])


# ------------------------------------------------------------------------------------------ gated update


def _ln(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


@pytest.mark.parametrize("gate,expected", [(-1e4, "closed"), (1e4, "open"), (0.0, "half")])
def test_gated_update_hand(gate, expected):
    c = 6
    up = ClassEmbeddingUpdater(c, c, c)
    with torch.no_grad():
        up.norm_in.weight.zero_()
        up.norm_in.bias.fill_(gate)  # LN output = bias: the gate is sigmoid(gate)
        up.fc_layer.weight.copy_(torch.eye(c))
        up.fc_layer.bias.zero_()
    update, prev = torch.randn(2, 4, c), torch.randn(2, 4, c)
    out = up(update, prev)
    p_out = up.dynamic_layer(update)[..., c:]
    g = {"closed": 0.0, "open": 1.0, "half": 0.5}[expected]
    f = g * _ln(p_out) + prev
    assert torch.allclose(out, torch.relu(_ln(f)), atol=1e-6)
    gate_val, _ = up.gate(update, prev)
    assert torch.allclose(gate_val, torch.full_like(gate_val, g))


# ---------------------------------------------------------------------------------------------------- SAU


def test_sau_attention_rows_sum_to_one_and_negated_softmax():
    b, h, n, k = 2, 3, 11, 5
    q, kk = torch.randn(b, h, n, 4), torch.randn(b, h, k, 4)
    eye = torch.eye(k).expand(b, h, k, k)  # v = identity: the output is the attention matrix itself
    p, logits = sau_attention(q, kk, eye, 0.5)
    assert torch.allclose(p.sum(-1), torch.ones(b, h, n))
    assert (p > 0).all()
    a = (q @ kk.transpose(-2, -1)) * 0.5
    assert torch.allclose(p, torch.softmax(-a, -1))  # the port's max - a == softmax of -a
    assert torch.allclose(logits, a.mean(1))  # the masks keep +a
    p_paper, _ = sau_attention(q, kk, eye, 0.5, negate=False)
    assert torch.allclose(p_paper, torch.softmax(a, -1))
    # a pixel attends most to its least similar class (port), most similar (paper)
    assert torch.equal(p.argmax(-1), a.argmin(-1)) and torch.equal(p_paper.argmax(-1), a.argmax(-1))


def test_sau_attention_is_atm_attention_with_negated_scale():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    out, masks = sau_attention(q, k, v, 8 ** -0.5)
    out_atm, logits_atm = atm_attention(q, k, v, -(8 ** -0.5))
    assert torch.allclose(out, out_atm) and torch.allclose(masks, -logits_atm)


def test_semantics_attention_logits_hand_loop():
    c, heads, kt = 8, 2, 3
    att = SemanticsAttention(c, heads, kt).eval()
    query, kv = torch.randn(1, c, 2, 3), torch.randn(1, kt, c)
    out = att(query, kv)
    assert out["out"].shape == (1, c, 2, 3) and out["attn"].shape == (1, 6, kt)
    q = att.q(query)[0].flatten(1)  # C, HW
    kvp = att.kv(kv)[0]  # K, 2C
    d = c // heads
    for pix in range(6):
        for cls in range(kt):
            s = sum(q[hh * d:(hh + 1) * d, pix] @ kvp[cls, hh * d:(hh + 1) * d] for hh in range(heads)) * d ** -0.5
            assert torch.allclose(out["attn"][0, pix, cls], s / heads)
    # the port's q: two ReLUs (act_cfg=None becomes ReLU in its ConvModule)
    assert (att.q(query) >= 0).all()
    assert not (SemanticsAttention(c, heads, kt, q_act=False).q(query) >= 0).all()


# ----------------------------------------------------------------------------------------------------- FR


def test_feature_reconstruction_weights_have_no_sigmoid():
    fr = FeatureReconstruction(8).eval()
    x = torch.randn(2, 8, 5, 4)
    div, out = fr(x)
    assert div.shape == (2, 4, 5, 4) and out.shape == (2, 8, 5, 4)
    with torch.no_grad():
        fr.layer_channel_slct[2].weight.zero_()  # channel weights 0 (a sigmoid would give 0.5)
    div, out = fr(x)
    assert torch.equal(div, torch.zeros_like(div))
    x1 = fr.primary(x)
    assert torch.allclose(out, F.conv2d(x1, fr.conv_out.weight[:, 4:]))


def test_diversity_loss_hand_computed():
    c = 4
    peaks = torch.zeros(1, c, 2, 2)
    for i in range(c):
        peaks.view(1, c, 4)[0, i, i] = 100.0  # each channel on its own pixel
    same = torch.zeros(1, c, 2, 2)
    same.view(1, c, 4)[0, :, 0] = 100.0  # all channels on pixel 0
    flat = torch.zeros(1, c, 2, 2)  # uniform softmax 1/4
    m_peaks, m_same, m_flat = diversity_maps(peaks), diversity_maps(same), diversity_maps(flat)
    assert torch.allclose(m_peaks, torch.ones(1, 4))
    assert torch.allclose(m_same, torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(m_flat, torch.full((1, 4), 0.25))
    assert diversity_loss([m_peaks], [c]).item() == pytest.approx(0.0, abs=1e-12)
    assert diversity_loss([m_same], [c]).item() == pytest.approx(0.75)
    assert diversity_loss([m_flat], [c]).item() == pytest.approx(0.75)
    assert diversity_loss([m_peaks, m_same], [c, c]).item() == pytest.approx(0.375)  # mean over stages
    with pytest.raises(ValueError):
        diversity_loss([m_peaks], [c, c])


# ------------------------------------------------------------------------------------------------ fusion


def test_class_mask_fusion_hand_and_range():
    cls = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # softmax rows [.75, .25], [.5, .5]
    fused = class_mask_fusion(cls, torch.zeros(1, 2, 3, 3))  # sigmoid(0) = .5
    assert torch.allclose(fused[0, 0], torch.full((3, 3), 0.375))
    assert torch.allclose(fused[0, 1], torch.full((3, 3), 0.25))
    cls, masks = torch.randn(2, 5, 5) * 3, torch.randn(2, 5, 4, 6) * 3
    fused = class_mask_fusion(cls, masks)
    assert fused.shape == masks.shape
    assert (fused > 0).all() and (fused < 1).all() and (fused <= masks.sigmoid()).all()
    with pytest.raises(ValueError):
        class_mask_fusion(torch.randn(2, 5, 4), masks)


def test_ghost_upscale_shapes():
    up = GhostUpscale(6, 4)
    assert len(up.layers) == 2
    assert up(torch.randn(2, 6, 3, 5)).shape == (2, 6, 12, 20)
    with pytest.raises(ValueError):
        GhostUpscale(6, 3)


# ------------------------------------------------------------------------------------------------ losses


def test_mask_losses_hand_computed():
    logits = torch.zeros(2, 4)
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    # p = .5 everywhere: focal = alpha_t * .25 * log 2; mean over 4 pixels, sum over 2 masks / 2
    pos, neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert mask_focal_loss(logits, targets, 2).item() == pytest.approx(((pos + 3 * neg) / 4 + neg) / 2)
    # dice: mask 0: 1 - (2*.5 + 1)/(2 + 1 + 1) = .5; mask 1: 1 - 1/(2 + 1) = 2/3
    assert mask_dice_loss(logits, targets, 2).item() == pytest.approx((0.5 + 2 / 3) / 2)


def test_class_mask_targets_ignore():
    labels = torch.tensor([[[0, 2], [255, 2]], [[255, 255], [1, 1]]])
    t = class_mask_targets(labels)
    assert t[0][0].tolist() == [0, 2] and t[1][0].tolist() == [1]
    assert t[0][1].tolist() == [[[1, 0], [0, 0]], [[0, 1], [0, 1]]]


# ------------------------------------------------------------------------------------- head and model


def _tiny_head(k=5, **kw):
    return ECENetHead(in_channels=(8, 12, 16, 20), channels=16, num_classes=k, num_heads=4, **kw)


def _feats(b=2, size=16):
    return [torch.randn(b, c, size // 2 ** i, size // 2 ** i) for i, c in enumerate((8, 12, 16, 20))]


def test_head_forward_shapes_and_losses_match_formulas():
    head = _tiny_head().train()
    feats = _feats()
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[0, :3] = 255
    labels[1][labels[1] == 4] = 0  # class 4 absent from image 1
    out = head(feats)
    assert out["seg_logits"].shape == (2, 5, 16, 16) and out["masks"].shape == (2, 5, 16, 16)
    assert [m.shape for m in out["div_maps"]] == [(2, 256), (2, 64), (2, 16), (2, 4)]
    losses = head.losses(out, labels)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_div"}
    up = F.interpolate(out["seg_logits"], size=(32, 32), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, labels, ignore_index=255, reduction="sum") / labels.numel()  # mmseg 0.x: all pixels
    assert torch.allclose(losses["loss_ce"], ce)
    masks = F.interpolate(out["masks"], size=(32, 32), mode="bilinear", align_corners=False)
    preds, tgts = [], []
    for b in range(2):
        for c in range(5):
            if (labels[b] == c).any():
                preds.append(masks[b, c].flatten())
                tgts.append((labels[b] == c).double().flatten())
    preds, tgts = torch.stack(preds), torch.stack(tgts)
    assert preds.shape[0] == 9
    assert torch.allclose(losses["loss_mask"], 5.0 * mask_focal_loss(preds, tgts, 9))
    assert torch.allclose(losses["loss_dice"], 2.0 * mask_dice_loss(preds, tgts, 9))
    div = sum(1 - m.sum(-1).mean() / (c // 2) for m, c in zip(out["div_maps"], (8, 12, 16, 20))) / 4
    assert torch.allclose(losses["loss_div"], 0.2 * div)
    total = sum(losses.values())
    total.backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert sum(int(g.abs().sum() > 0) for g in grads.values()) >= 0.95 * len(grads)


def test_head_masks_are_the_sau_logits():
    head = _tiny_head().eval()
    feats = _feats(1)
    seen = []
    for layer in head.transfer:
        layer.register_forward_hook(lambda m, i, o: seen.append(o["attn"].detach()))
    out = head(feats)
    lat_last = head.laterals[-1](head.norms[-1](head.layer_slcts[-1](feats[-1])[1].permute(0, 2, 3, 1))
                                 .permute(0, 3, 1, 2))
    masks = [head.learner(lat_last)] + [a.transpose(1, 2).reshape(1, 5, s, s) for a, s in zip(seen, (4, 8, 16))]
    masks = [F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False) for m in masks]
    assert torch.allclose(out["masks"], sum(masks[:-1]))


def test_head_state_dict_uses_port_names():
    head = ECENetHead(in_channels=(32, 64, 160, 256), channels=32, num_classes=150)
    sd = head.state_dict()
    for key, shape in {
        "layer_slcts.0.primary.0.weight": (16, 32, 1, 1), "layer_slcts.0.primary.1.running_mean": (16,),
        "layer_slcts.3.cheap.0.bias": (128,), "layer_slcts.2.layer_channel_slct.2.weight": (80, 40),
        "layer_slcts.1.conv_out.weight": (64, 64, 1, 1), "norms.3.weight": (256,),
        "laterals.2.weight": (32, 160, 1, 1), "learner.0.weight": (32, 8, 1, 1), "learner.1.weight": (150, 32, 1, 1),
        "token_emb.3.cls_learner.weight": (32, 219), "gated_tokens.0.dynamic_layer.weight": (64, 32),
        "gated_tokens.2.fc_norm.bias": (32,), "transfer.0.cross_attn.q.depthwise_conv.conv.weight": (32, 1, 3, 3),
        "transfer.0.cross_attn.q.pointwise_conv.conv.bias": (32,), "transfer.1.cross_attn.kv.weight": (64, 32),
        "transfer.2.cross_attn.proj.weight": (32, 32, 1, 1), "transfer.2.mlp.1.weight": (128, 1, 3, 3),
        "transfer.2.mlp.4.weight": (32, 128, 1, 1), "transfer.0.norm_mlp.weight": (32,),
        "ghost_up_layers.2.layers.2.primary.conv.weight": (64, 32, 1, 1),
        "ghost_up_layers.0.layers.0.cheap.bn.weight": (64,), "proj.conv.weight": (32, 128, 3, 3),
        "proj.bn.running_var": (32,), "trans.weight": (150, 32), "conv_seg.bias": (150,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "transfer.0.cross_attn.kv.bias" not in sd and "proj.conv.bias" not in sd
    assert sum(".layers." in k for k in sd if k.startswith("ghost_up_layers.2.")) == 3 * 2 * 6


def test_head_bad_inputs():
    with pytest.raises(ValueError):
        _tiny_head()(_feats()[:3])
    with pytest.raises(ValueError):
        ECENetHead(in_channels=(8,), channels=16, num_classes=5)


def test_tiny_mscan_model_train_and_eval():
    torch.set_default_dtype(torch.float32)
    backbone = MSCAN(embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))
    model = ECENetSegmentor(backbone, ECENetHead(in_channels=(8, 16, 24, 32), channels=16, num_classes=7))
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 7, (2, 32, 32))
    labels[:, :5] = 255
    losses = model.forward_train(images, labels)
    assert set(losses) == {"decode.loss_ce", "decode.loss_mask", "decode.loss_dice", "decode.loss_div", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 7, 32, 32)


def test_mscan_t_builder_dims():
    model = mscan_t_ecenet(num_classes=19, channels=32)
    assert model.decode_head.in_channels == [32, 64, 160, 256]
    assert model.decode_head.conv_seg.out_channels == 19


# ---------------------------------------------------------------------------------------------------- bench


def test_bench_sau_baselines_compute_the_same_and_labels():
    from fastseg.bench.ops.ecenet import ecenet_labels
    from fastseg.bench.registry import get_op

    spec = get_op("ecenet-sau")
    shape = spec.full_shape({"B": 2, "H": 12, "W": 20, "stride": 4, "C": 16, "heads": 4, "K": 7})
    dev = torch.device("cpu")
    outs = {name: spec.impl(name).prepare(shape, torch.float64, dev, "fwd").forward() for name in ("eager", "sdpa")}
    for a, b in zip(outs["eager"], outs["sdpa"]):
        torch.testing.assert_close(a, b)
    labels = ecenet_labels(3, 40, 50, 150, torch.Generator().manual_seed(0), dev)
    assert labels.shape == (3, 40, 50)
    for lab in labels:
        classes = lab.unique()
        assert 1 < (classes != 255).sum() <= 12 and (lab == 255).any()


def test_bench_head_case_runs_both_modes():
    from fastseg.bench.registry import get_op

    spec = get_op("ecenet-head")
    shape = spec.full_shape({"B": 1, "H": 64, "W": 64, "C": 16, "K": 5})
    for mode in ("fwd", "fwdbwd"):
        prepared = spec.impl("eager").prepare(shape, torch.float32, torch.device("cpu"), mode)
        prepared.run()
    assert spec.heavy is False and get_op("ecenet").heavy is True


def test_hot_parts_map_onto_existing_fastseg_ops():
    """docs/ecenet.md's claims: the SAU MLP's depthwise conv + GELU is fastseg.ops.dwconv3x3_gelu, and loss_ce is
    fastseg.ops.upsampled_cross_entropy's mean (Triton kernels under TRITON_INTERPRET=1, else the torch path)."""
    from fastseg import _backend
    from fastseg.ops import dwconv3x3_gelu, upsampled_cross_entropy

    head = _tiny_head(mask_loss=False, div_loss=False).train()
    mlp = head.transfer[0].mlp
    x = torch.randn(1, 16, 3, 5)
    before = sum(_backend.launches.values())
    h = mlp[0](x)
    torch.testing.assert_close(dwconv3x3_gelu(h, mlp[1].weight, mlp[1].bias), mlp[2](mlp[1](h)))
    out = {"seg_logits": torch.randn(1, 5, 4, 6)}
    labels = torch.randint(0, 5, (1, 9, 11))
    labels[:, :2] = 255
    ce = upsampled_cross_entropy(out["seg_logits"], labels, False, 255).mean()
    torch.testing.assert_close(ce, head.losses(out, labels)["loss_ce"])
    if _backend.interpreter_enabled():
        assert sum(_backend.launches.values()) > before


def test_losses_reduce_in_float32_under_bf16_autocast():
    torch.set_default_dtype(torch.float32)
    head = _tiny_head().train()
    feats = _feats()
    labels = torch.randint(0, 5, (2, 32, 32))
    torch.manual_seed(1)
    ref = head.forward_train(feats, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        low = head.forward_train(feats, labels)
    for k in ref:
        assert low[k].dtype == torch.float32, k
        assert torch.allclose(low[k], ref[k], rtol=0.05, atol=1e-2), (k, low[k], ref[k])


def test_bench_sau_fastseg_row_wiring(monkeypatch):
    """The ecenet-sau fastseg row calls fastseg.ops.atm_attention(q, k, v, -scale) and negates its logits: with
    the reference ATM attention standing in for the fused op, it reproduces the eager row."""
    import fastseg.ops
    from fastseg.bench.measure import Unavailable
    from fastseg.bench.registry import get_op

    spec = get_op("ecenet-sau")
    shape = spec.full_shape({"B": 1, "H": 8, "W": 12, "stride": 4, "C": 8, "heads": 2, "K": 5})
    dev = torch.device("cpu")
    if not hasattr(fastseg.ops, "atm_attention"):
        with pytest.raises(Unavailable):
            spec.impl("fastseg").prepare(shape, torch.float64, dev, "fwd")
    monkeypatch.setattr(fastseg.ops, "atm_attention", atm_attention, raising=False)
    got = spec.impl("fastseg").prepare(shape, torch.float64, dev, "fwd").forward()
    want = spec.impl("eager").prepare(shape, torch.float64, dev, "fwd").forward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
