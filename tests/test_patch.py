"""fastseg.patch: structural replacement of attention modules, on this project's models and a tiny Hugging Face
Mask2Former (random init, no download). Ops whose fastseg class is not in the build must be reported as
skipped (never silently patched)."""
import copy

import pytest
import torch
from torch import nn

import fastseg
from fastseg.models import build_mask2former, build_maskformer
from hf_models import targets as targets_, tiny_hf_mask2former

HAS_MCA = hasattr(fastseg.nn, "MaskedCrossAttention")
HAS_MSCA = hasattr(fastseg.nn, "MSCA")


class OfficialMSCA(nn.Module):
    """SegNeXt's AttentionModule layout (official repository)."""

    def __init__(self, dim):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        attn = self.conv0(x)
        attn = (attn + self.conv0_2(self.conv0_1(attn)) + self.conv1_2(self.conv1_1(attn))
                + self.conv2_2(self.conv2_1(attn)))
        return self.conv3(attn) * x


class MmsegMSCA(nn.Module):
    """mmsegmentation's MSCAAttention layout (convs added by name in a loop)."""

    def __init__(self, channels, kernel_sizes=(5, (1, 7), (1, 11), (1, 21)), paddings=(2, (0, 3), (0, 5), (0, 10))):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_sizes[0], padding=paddings[0], groups=channels)
        for i, (k, p) in enumerate(zip(kernel_sizes[1:], paddings[1:])):
            for kk, pp, name in zip([k, k[::-1]], [p, p[::-1]], [f"conv{i}_1", f"conv{i}_2"]):
                self.add_module(name, nn.Conv2d(channels, channels, tuple(kk), padding=pp, groups=channels))
        self.conv3 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        attn = self.conv0(x)
        attn = attn + sum(getattr(self, f"conv{i}_2")(getattr(self, f"conv{i}_1")(attn)) for i in range(3))
        return self.conv3(attn) * x


class Block(nn.Module):
    def __init__(self, dim, attn):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.spatial_gating_unit = attn
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return self.proj_2(self.spatial_gating_unit(self.proj_1(x))) + x


M2F_TINY = dict(hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=64, dec_layers=3, mask_dim=32, conv_dim=32,
                enc_layers=1, enc_nheads=4, enc_dim_feedforward=64, train_num_points=64)


def _loss_grads(model, x, targets):
    model.zero_grad()
    torch.manual_seed(1)
    losses = model(x, targets)
    loss = sum(losses.values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ga, gb, tol):
    assert ga.keys() == gb.keys()
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in ga.values()))
    for n in ga:
        assert (ga[n].double() - gb[n].double()).norm() <= tol * total, n


def test_patch_finds_cross_attention_in_project_models():
    torch.manual_seed(0)
    m2f = build_mask2former("tiny", 5, **M2F_TINY)
    before = copy.deepcopy(m2f.state_dict())
    _, report = fastseg.patch(m2f, dry_run=True)
    paths = [r[0] for r in report.replaced] + [s[0] for s in report.skipped]
    expect = [f"predictor.transformer_cross_attention_layers.{i}.multihead_attn" for i in range(3)]
    assert sorted(p for p in paths if "attn" in p) == expect  # cross-attention only, never self-attention
    assert report.dry_run and all(type(layer.multihead_attn) is nn.MultiheadAttention
                                  for layer in m2f.predictor.transformer_cross_attention_layers)
    assert all(torch.equal(before[k], v) for k, v in m2f.state_dict().items())
    if HAS_MCA:  # the deeper patch is announced, not applied
        assert [d[0] for d in report.deeper] == ["predictor"] and not m2f.predictor.packed_attn_masks
    mf = build_maskformer("tiny", 4, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64, dec_layers=2,
                          conv_dim=32, mask_dim=32)  # dropout 0.1 (official): the fused kernel has no dropout
    _, report = fastseg.patch(mf)
    assert not report.replaced
    assert [s[0] for s in report.skipped] == [f"predictor.transformer.decoder_layers.{i}.multihead_attn"
                                              for i in range(2)]
    if HAS_MCA:
        assert all("dropout" in s[2] for s in report.skipped)
    with pytest.raises(ValueError, match="unknown ops"):
        fastseg.patch(m2f, ops=["nope"])
    _, report = fastseg.patch(m2f, ops=["msca"])
    assert not report.replaced and not report.skipped


@pytest.mark.skipif(not HAS_MCA, reason="fastseg.nn.MaskedCrossAttention is not in this build")
def test_patch_project_mask2former_same_results(triton_launches):
    torch.manual_seed(0)
    model = build_mask2former("tiny", 5, **M2F_TINY).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = targets_(torch.float64)
    ref = copy.deepcopy(model)
    loss_r, grads_r = _loss_grads(ref, x, targets)
    _, report = fastseg.patch(model)
    assert report.count("masked_attention") == 3
    # deeper patch: the mask predictor hands head-shared packed masks built from the embeddings to the attention
    assert [d[0] for d in report.deeper] == ["predictor"] and model.predictor.packed_attn_masks
    assert "deeper patch" in str(report)
    masks = []
    hooks = [layer.multihead_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["attn_mask"]), with_kwargs=True)
        for layer in model.predictor.transformer_cross_attention_layers]
    loss_p, grads_p = _loss_grads(model, x, targets)
    for h in hooks:
        h.remove()
    assert len(masks) == 3 and all(type(m).__name__ == "PackedMask" and m.bits.shape[1] == 1 for m in masks)
    out_p = model(x)
    assert out_p["pred_masks"].shape == (2, 6, 16, 16)  # outputs keep the reference layout
    assert abs(loss_p.item() - loss_r.item()) <= 1e-10 * abs(loss_r.item())
    _assert_grads_close(grads_p, grads_r, 1e-9)
    if fastseg.interpreter_enabled():
        assert triton_launches["masked_attention_fwd"] > 0 and triton_launches["masked_attention_bwd_dq"] > 0
        assert triton_launches["attention_mask_sign_pack"] > 0
    _, again = fastseg.patch(model)  # idempotent
    assert not again.replaced and not again.deeper


def _hf_step(model, x, targets):
    model.zero_grad()
    torch.manual_seed(1)
    out = model(pixel_values=x, mask_labels=[t["masks"] for t in targets], class_labels=[t["labels"] for t in targets])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_patch_hugging_face_mask2former(triton_launches):
    model = tiny_hf_mask2former()
    # At init every deformable-attention point sits exactly on a texel centre (a kink of the bilinear
    # interpolation: its location gradient depends on rounding) and some exactly on h = -1, where the official
    # CUDA op (followed by fastseg's MSDeformAttnHF) and grid_sample differ: generic offsets keep the
    # comparison well posed.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sampling_offsets"):
                m.sampling_offsets.weight.normal_(0, 0.2)
    x = torch.randn(2, 3, 64, 64)
    targets = targets_(torch.float32)
    ref = copy.deepcopy(model)
    out_r, grads_r = _hf_step(ref, x, targets)
    _, report = fastseg.patch(model)
    cross = [f"model.transformer_module.decoder.layers.{i}.cross_attn" for i in range(2)]
    if not HAS_MCA:
        assert [s[0] for s in report.skipped] == cross and not report.count("masked_attention")
        return
    assert [r[0] for r in report.replaced if r[1] == "masked_attention"] == cross
    assert all(type(layer.cross_attn).__name__ == "MaskedCrossAttention"
               for layer in model.model.transformer_module.decoder.layers)
    assert model.training and all(p.device == x.device and p.dtype == torch.float32 for p in model.parameters())
    out_p, grads_p = _hf_step(model, x, targets)
    torch.testing.assert_close(out_p.loss, out_r.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.class_queries_logits, out_r.class_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_p.masks_queries_logits, out_r.masks_queries_logits, rtol=1e-4, atol=1e-4)
    _assert_grads_close(grads_p, grads_r, 1e-4)
    if fastseg.interpreter_enabled():
        assert triton_launches["masked_attention_fwd"] > 0 and triton_launches["masked_attention_bwd_dkdv"] > 0
    if hasattr(fastseg.nn, "MSDeformAttnHF"):
        assert report.count("ms_deform_attn") == 1  # encoder_layers=1
        if fastseg.interpreter_enabled():
            assert triton_launches["ms_deform_attn_fwd"] > 0 and triton_launches["ms_deform_attn_bwd"] > 0


@pytest.mark.parametrize("layout", [OfficialMSCA, MmsegMSCA])
def test_patch_segnext_attention(layout):
    torch.manual_seed(0)
    model = nn.Sequential(Block(8, layout(8)), Block(8, layout(8))).eval()
    x = torch.randn(1, 8, 12, 12)
    ref = model(x)
    _, report = fastseg.patch(model, ops=["msca"])
    found = [r[0] for r in report.replaced] + [s[0] for s in report.skipped]
    assert found == ["0.spatial_gating_unit", "1.spatial_gating_unit"]
    if not HAS_MSCA:
        assert not report.replaced
        return
    assert not model.training and type(model[0].spatial_gating_unit).__name__ == "MSCA"
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_patch_context_cluster_structure():
    ref_mod = pytest.importorskip("fastseg.reference")
    Cluster = getattr(ref_mod, "Cluster", None) or getattr(ref_mod, "ReferenceContextCluster", None)
    if Cluster is None:
        pytest.skip("no reference Context Cluster module in this build")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), Cluster(16, 16, heads=2, head_dim=8))
    x = torch.randn(1, 3, 8, 8)
    ref = model(x)
    _, report = fastseg.patch(model)
    assert len(report.replaced) + len(report.skipped) == 1
    if report.replaced:
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
