"""fastseg.patch: structural replacement of attention modules, on this project's models and a tiny Hugging Face
Mask2Former (random init, no download). Ops whose fastseg class is not in the build must be reported as
skipped (never silently patched)."""
import copy

import pytest
import torch
from torch import nn

import fastseg
from fastseg.models import build_mask2former, build_maskformer
from fastseg.reference import AttentionModule
from hf_models import targets as targets_, tiny_hf_mask2former

HAS_MCA = hasattr(fastseg.nn, "MaskedCrossAttention")
HAS_MSCA = hasattr(fastseg.nn, "MSCA")


# SegNeXt's AttentionModule layout (official repository): fastseg's faithful copy of it
OfficialMSCA = AttentionModule


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
                          conv_dim=32, mask_dim=32)  # attention dropout 0.1 (official): fused, so replaced
    _, report = fastseg.patch(mf, dry_run=True)
    paths = [f"predictor.transformer.decoder_layers.{i}.multihead_attn" for i in range(2)]
    assert [r[0] for r in (report.replaced if HAS_MCA else report.skipped)] == paths
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
    triton_launches.clear()  # the probe ran the kernels too: count the model's step only
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
    triton_launches.clear()  # the probe ran the kernels too: count the model's step only
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
        assert report.count("ms_deform_attn_hf") == 1  # encoder_layers=1
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


# --- verification: a module that looks like the original but computes something else is not swapped ---------

HAS_CC = hasattr(fastseg.nn, "ContextCluster")


class MSCAWithoutBranch(OfficialMSCA):
    """A fork: same convs (recognised by structure), the 21-tap branch left out of the sum."""

    def forward(self, x):
        attn = self.conv0(x)
        attn = attn + self.conv0_2(self.conv0_1(attn)) + self.conv1_2(self.conv1_1(attn))
        return self.conv3(attn) * x


class MSCANoisyNorm(OfficialMSCA):
    """A fork that counts its calls in a buffer, normalises its input with a BatchNorm (running statistics
    updated in training) and draws from the global RNG: the probe must leave all of that untouched. (The
    counter is not persistent and the BatchNorm not a registered submodule, so that MSCA's strict state_dict
    load accepts the fork and the probe really runs it.)"""

    def __init__(self, dim):
        super().__init__(dim)
        object.__setattr__(self, "norm", nn.BatchNorm2d(dim))
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return super().forward(self.norm(x)) + 1e-3 * torch.randn_like(x)


class BiasedMHA(nn.MultiheadAttention):
    """A fork whose forward adds a bias to the attention output."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return out + 0.1, weights


class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class GradScaledMHA(nn.MultiheadAttention):
    """A fork with the original's forward but twice its gradient: only the gradient comparison sees it."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return _DoubleGrad.apply(out), weights


class Decoder(nn.Module):
    def __init__(self, attns):
        super().__init__()
        from fastseg.models.mask2former import CrossAttentionLayer

        self.layers = nn.ModuleList(CrossAttentionLayer(32, 4) for _ in attns)
        for layer, attn in zip(self.layers, attns):
            if attn is not None:
                attn.load_state_dict(layer.multihead_attn.state_dict())
                layer.multihead_attn = attn


def _skipped(report):
    return {s[0]: s[2] for s in report.skipped}


@pytest.mark.skipif(not HAS_MCA, reason="fastseg.nn.MaskedCrossAttention is not in this build")
def test_patch_probe_refuses_attention_forks():
    torch.manual_seed(0)
    model = Decoder([None, BiasedMHA(32, 4), GradScaledMHA(32, 4), None]).train()
    _, report = fastseg.patch(model)
    assert [r[0] for r in report.replaced] == ["layers.0.multihead_attn", "layers.3.multihead_attn"]
    assert report.verified == ["layers.0.multihead_attn", "layers.3.multihead_attn"]
    assert type(model.layers[1].multihead_attn) is BiasedMHA and type(model.layers[2].multihead_attn) is GradScaledMHA
    skipped = _skipped(report)
    assert set(skipped) == {"layers.1.multihead_attn", "layers.2.multihead_attn"}
    assert all("disagree on the probe" in why for why in skipped.values())
    # one probe per type: the two plain layers share one, each fork has its own
    assert sorted(len(p.paths) for p in report.probes) == [1, 1, 2]
    biased, scaled = report.probe_of("layers.1.multihead_attn"), report.probe_of("layers.2.multihead_attn")
    assert biased.worst()["quantity"] == "forward" and biased.difference > 0.05
    assert f"{biased.difference:.1e}" in skipped["layers.1.multihead_attn"]
    # forward identical, gradients doubled: seen by the gradient comparison only
    assert all(r["rel"] < 1e-4 for r in scaled.results if r["quantity"] == "forward")
    assert scaled.worst()["quantity"].startswith("grad") and abs(scaled.difference - 0.5) < 1e-3  # |g - 2g| / |2g|
    plain = report.probe_of("layers.0.multihead_attn")
    assert plain.ok and plain.difference <= plain.tol
    assert {r["probe"] for r in plain.results} == {"mask with fully masked rows (forward, other rows)",
                                                   "fully masked rows reset as Mask2Former does"}
    # the probe compared gradients in training mode, the forward only in eval mode
    assert any(r["quantity"] == "grad in_proj_weight" for r in plain.results)
    _, report = fastseg.patch(Decoder([BiasedMHA(32, 4)]).eval())
    assert not report.replaced and all(r["quantity"] == "forward" for r in report.probes[0].results)


@pytest.mark.skipif(not HAS_MSCA, reason="fastseg.nn.MSCA is not in this build")
def test_patch_probe_refuses_msca_fork_and_keeps_state():
    """A fork is refused with the measured difference; the probe changes no parameter, buffer (BatchNorm
    statistics), .grad or random number generator state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8), Block(8, MSCAWithoutBranch(8)), Block(8, MSCANoisyNorm(8)),
                          Block(8, OfficialMSCA(8))).train()
    model(torch.randn(2, 8, 6, 6)).sum().backward()  # non-trivial BN statistics and .grad everywhere
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fork = model[2].spatial_gating_unit
    fork_state = [t.clone() for t in (fork.calls, fork.norm.running_mean, fork.norm.running_var,
                                      fork.norm.num_batches_tracked)]
    assert fork_state[0] == 1 and fork_state[3] == 1
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) >= len(list(model.parameters())) - 4  # all but the fork's unused conv2_1 / conv2_2
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    _, report = fastseg.patch(model)
    assert [r[0] for r in report.replaced] == ["3.spatial_gating_unit"]
    assert type(model[3].spatial_gating_unit).__name__ == "MSCA"
    assert set(_skipped(report)) == {"1.spatial_gating_unit", "2.spatial_gating_unit"}
    assert report.probe_of("1.spatial_gating_unit").difference > 1e-2
    assert "rel. L2 difference" in _skipped(report)["1.spatial_gating_unit"]
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    for n, p in model.named_parameters():
        if not n.startswith("3.spatial_gating_unit."):  # the swapped module's parameters are new
            assert (p.grad is None and n not in grads) or torch.equal(p.grad, grads[n]), n
    assert all(torch.equal(a, b) for a, b in zip(fork_state, (fork.calls, fork.norm.running_mean,
                                                              fork.norm.running_var, fork.norm.num_batches_tracked)))
    noisy = report.probe_of("2.spatial_gating_unit")  # it ran (no error), and differs
    assert not noisy.error and next(r for r in noisy.results if r["quantity"] == "forward")["rel"] > noisy.tol
    assert torch.equal(torch.get_rng_state(), rng)
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    # verify=False swaps the fork: its faithfulness is then the caller's responsibility (said in the notes)
    _, report = fastseg.patch(model, verify=False)
    assert [r[0] for r in report.replaced] == ["1.spatial_gating_unit", "2.spatial_gating_unit"]
    assert type(model[1].spatial_gating_unit).__name__ == "MSCA"
    assert not report.probes and any("verify=False" in n for n in report.notes)
    # a module no drop-in can be built from (weights MSCA has not) is a reported skip, not an exception
    fork = MSCAWithoutBranch(8)
    fork.extra = nn.Conv2d(8, 8, 1)
    for verify in (True, False):
        _, report = fastseg.patch(nn.Sequential(Block(8, fork)), verify=verify)
        assert not report.replaced and "extra.weight" in _skipped(report)["0.spatial_gating_unit"]


@pytest.mark.skipif(not HAS_CC, reason="fastseg.nn.ContextCluster is not in this build")
def test_patch_probe_refuses_context_cluster_fork(triton_launches):
    """A Cluster subclass computing something else (whichever normaliser fastseg's default uses) is refused; a
    faithful Cluster of the same configuration is swapped: probes are keyed by type, not only by config."""
    from fastseg.reference import Cluster

    class ScaledCluster(Cluster):
        def forward(self, x):
            return 1.5 * super().forward(x)

    torch.manual_seed(0)
    args = dict(heads=2, head_dim=8, fold_w=2, fold_h=2)
    model = nn.Sequential(Cluster(16, 16, **args), ScaledCluster(16, 16, **args), Cluster(16, 16, **args))
    _, report = fastseg.patch(model)
    assert [r[0] for r in report.replaced] == ["0", "2"] and list(_skipped(report)) == ["1"]
    assert type(model[1]) is ScaledCluster and type(model[0]).__name__ == "ContextCluster"
    assert abs(report.probe_of("1").difference - 0.5 / 1.5) < 1e-3  # |1.5 y - y| / |1.5 y|
    assert report.probe_of("0").paths == ["0", "2"] and len(report.probes) == 2
    # verify="cpu": float64 CPU copies on fastseg's PyTorch path, no kernel runs; the same decisions
    model = nn.Sequential(Cluster(16, 16, **args), ScaledCluster(16, 16, **args)).float()
    triton_launches.clear()
    _, report = fastseg.patch(model, verify="cpu")
    assert [r[0] for r in report.replaced] == ["0"] and list(_skipped(report)) == ["1"]
    assert report.probe_of("0").tol == 1e-8 and report.probe_of("0").difference <= 1e-8
    assert sum(triton_launches.values()) == 0 and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="verify must be"):
        fastseg.patch(model, verify="gpu")


@pytest.mark.skipif(not HAS_MCA, reason="fastseg.nn.MaskedCrossAttention is not in this build")
def test_patch_dry_run_reports_probes(triton_launches):
    torch.manual_seed(0)
    m2f = build_mask2former("tiny", 5, **M2F_TINY)
    _, report = fastseg.patch(m2f, dry_run=True)
    assert sum(triton_launches.values()) == 0  # a dry run computes nothing
    assert len(report.probes) == 1 and report.probes[0].ok is None  # 3 identical layers: one probe, not run
    assert report.probes[0].paths == [f"predictor.transformer_cross_attention_layers.{i}.multihead_attn"
                                      for i in range(3)]
    assert "would probe 1 time(s)" in str(report) and "(to be verified)" in str(report)
    assert all(type(layer.multihead_attn) is nn.MultiheadAttention
               for layer in m2f.predictor.transformer_cross_attention_layers)
    _, report = fastseg.patch(m2f)
    assert len(report.probes) == 1 and report.probes[0].ok and len(report.verified) == 3
    if fastseg.interpreter_enabled():  # on CPU under the interpreter the probe checks the kernels themselves
        assert triton_launches["masked_attention_fwd"] == 2 and triton_launches["masked_attention_bwd_dq"] == 1


def test_fingerprint_shares_probes_only_for_plain_state():
    from fastseg.patch import _fingerprint

    a, b = nn.MultiheadAttention(32, 4), nn.MultiheadAttention(32, 4)
    assert _fingerprint(a) == _fingerprint(b) != _fingerprint(nn.MultiheadAttention(32, 8))
    assert _fingerprint(a) != _fingerprint(BiasedMHA(32, 4)) != _fingerprint(b.eval())
    b.forward = lambda *args, **kw: (None, None)  # an instance attribute the key cannot describe
    assert _fingerprint(b) is None
