"""MaskFormer's fused matcher costs (kernels/mask_cost.py) against the official matcher's formulas.

The reference is facebookresearch/MaskFormer's ``HungarianMatcher.memory_efficient_forward``: zero-pad the
targets to the batch's (H_max, W_max), ``F.interpolate(mode="nearest")`` to the logits' size, then
``batch_sigmoid_focal_loss`` and ``batch_dice_loss`` (fastseg.models: the official code's formulas).
"""
import pytest
import torch
import torch.nn.functional as F

from fastseg import _backend
from fastseg.models.maskformer import MaskFormerMatcher, batch_sigmoid_focal_loss
from fastseg.models.matcher import batch_dice_loss
from fastseg.ops.mask_cost import matcher_mask_costs, matcher_mask_costs_batch, matcher_mask_costs_from_embeddings

from helpers import DTYPES_EXACT, EXACT, sm90_rows

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _official(x, target, padded):
    """The official costs (Q, T) in x's dtype: x (Q, h, w) logits, target (T, H, W) at any size."""
    Hp, Wp = padded
    t = F.pad(target.to(x.dtype), (0, Wp - target.shape[2], 0, Hp - target.shape[1]))
    t = F.interpolate(t[:, None], size=x.shape[-2:], mode="nearest")[:, 0].flatten(1)
    return batch_sigmoid_focal_loss(x.flatten(1), t), batch_dice_loss(x.flatten(1), t)


def _check(got, want, dtype, name):
    for g, r, what in zip(got, want, ("focal", "dice")):
        assert g.shape == r.shape and g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        err = (g.double() - r.double()).abs().max().item() if g.numel() else 0.0
        assert err < TOL[dtype], f"{name} {what}: max abs error {err:.2e}"


# (Q, h, w, T, H, W, padded): odd sizes, targets smaller / larger than the logits, padding, odd ratios. At
# 62 -> 14 rows and 26 -> 22 columns PyTorch's float32 scale picks another row / column than the exact
# floor(i·H/h) would (i = 7 and 11): the kernel must follow PyTorch.
CASES = [(7, 5, 9, 3, 20, 36, None), (37, 13, 11, 5, 50, 23, (53, 47)), (5, 16, 12, 17, 7, 5, (9, 5)),
         (40, 6, 7, 2, 6, 7, None), (6, 14, 22, 3, 62, 26, None),
         (45, 6, 5, 35, 13, 11, None)]  # several query and target tiles


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
@pytest.mark.parametrize("Q,h,w,T,H,W,padded", CASES)
def test_costs_match_the_official_formulas(Q, h, w, T, H, W, padded, dtype, device, triton_launches):
    g = torch.Generator().manual_seed(Q + T)
    x = (torch.randn(Q, h, w, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    tgt = (torch.rand(T, H, W, generator=g) > 0.6).to(device)
    tgt[0] = False  # an empty target
    tgt[-1] = True  # an all-ones target
    want = _official(x, tgt, padded or (H, W))
    for t in (tgt.float(), tgt, tgt.to(torch.uint8)):
        _check(matcher_mask_costs(x, t, padded), want, dtype, f"{t.dtype} target")
    _check(matcher_mask_costs(x.transpose(1, 2).contiguous().transpose(1, 2), tgt.float()[:, ::1],
                              padded), want, dtype, "strided logits")
    assert triton_launches["mask_cost"] == 4 and triton_launches["mask_cost_finalize"] == 4
    with _backend.use_backend("torch"):
        _check(matcher_mask_costs(x, tgt, padded), want, dtype, "torch path")
    assert triton_launches["mask_cost"] == 4


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
def test_costs_from_embeddings(dtype, device, triton_launches):
    g = torch.Generator().manual_seed(1)
    Q, C, h, w, T = 19, 40, 9, 14, 6
    e = (torch.randn(Q, C, generator=g, dtype=torch.float64) / 3).to(dtype).to(device)
    feats = torch.randn(C, h, w, generator=g, dtype=torch.float64).to(dtype).to(device)
    tgt = (torch.rand(T, 35, 57, generator=g) > 0.5).float().to(device)
    x = torch.einsum("qc,chw->qhw", e.double(), feats.double()).to(dtype)
    want = _official(x.double(), tgt, (37, 57))
    got = matcher_mask_costs_from_embeddings(e, feats, tgt, (37, 57))
    _check(got, want, dtype if dtype == torch.float64 else torch.float32, "embeddings")
    assert triton_launches["mask_cost"] == 1


@pytest.mark.parametrize("embed", [False, True], ids=["logits", "embeddings"])
def test_batch_in_one_launch(embed, device, triton_launches):
    # images with different T (one without targets, one spanning two target tiles) and sizes, mixed target
    # dtypes, padded to the batch's (max H, max W) as the official matcher
    g = torch.Generator().manual_seed(7)
    B, Q, C, h, w = 4, 10, 12, 7, 9
    sizes = [(29, 35, 3), (31, 30, 0), (24, 37, 35), (30, 36, 1)]
    targets = [(torch.rand(T, H, W, generator=g) > 0.5).to(device) for H, W, T in sizes]
    targets[3] = targets[3].float()
    x = (torch.randn(B, Q, h, w, generator=g, dtype=torch.float64) * 3).to(EXACT).to(device)
    kw = dict(logits=x)
    if embed:
        e = torch.randn(B, Q, C, generator=g, dtype=torch.float64).to(EXACT).to(device)
        feats = torch.randn(B, C, h, w, generator=g, dtype=torch.float64).to(EXACT).to(device)
        x, kw = torch.einsum("bqc,bchw->bqhw", e, feats), dict(embeds=e, features=feats)
    got = matcher_mask_costs_batch(targets, **kw)
    assert len(got) == B and triton_launches["mask_cost"] == 1 and triton_launches["mask_cost_finalize"] == 1
    for b, t in enumerate(targets):
        _check(got[b], _official(x[b], t, (31, 37)), EXACT, f"image {b}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, device, triton_launches):
    # 16-bit logits / embeddings: costs accumulated in fp32 from the 16-bit values. fp16 runs the GPU's path
    # under the interpreter too: focal terms split hi + lo into two fp16 dots (one fp16 dot alone: ~6e-5 off)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(11, 8, 10, generator=g) * 3).to(dtype).to(device)
    e = (torch.randn(11, 24, generator=g) / 2).to(dtype).to(device)
    feats = torch.randn(24, 8, 10, generator=g).to(dtype).to(device)
    tgt = (torch.rand(4, 30, 41, generator=g) > 0.5).to(device)
    got = [matcher_mask_costs(x, tgt, (32, 41)), matcher_mask_costs_from_embeddings(e, feats, tgt, (32, 41))]
    want = [_official(x.double(), tgt, (32, 41)),
            _official(torch.einsum("qc,chw->qhw", e.double(), feats.double()), tgt, (32, 41))]
    for pair, ref in zip(got, want):
        for a, b in zip(pair, ref):
            assert a.dtype == torch.float32 and (a.double() - b).abs().max().item() < 2e-6
    assert triton_launches["mask_cost"] == 2


def test_empty_and_bad_inputs(device):
    x = torch.randn(4, 5, 6, device=device)
    f, d = matcher_mask_costs(x, torch.zeros(0, 10, 12, device=device))
    assert f.shape == d.shape == (4, 0)
    with pytest.raises(ValueError, match="padded_size"):
        matcher_mask_costs(x, torch.zeros(2, 10, 12, device=device), (8, 12))
    with pytest.raises(ValueError, match="target must be"):
        matcher_mask_costs(x, torch.zeros(10, 12, device=device))
    with pytest.raises(TypeError, match="logits must be"):
        matcher_mask_costs(x.long(), torch.zeros(2, 10, 12, device=device))
    with pytest.raises(ValueError, match="no pixels"):
        matcher_mask_costs(x[:, :0], torch.zeros(2, 10, 12, device=device))
    with pytest.raises(ValueError, match="same B and C"):
        matcher_mask_costs_from_embeddings(torch.randn(4, 3, device=device), x, torch.zeros(2, 10, 12, device=device))


def _batch(device, dtype, g):
    """Three images of different sizes (one without targets; an all-zero and an all-ones mask)."""
    Q, h, w = 12, 9, 11
    sizes = [(33, 41, 4), (36, 30, 0), (29, 44, 3)]
    targets = []
    for H, W, T in sizes:
        targets.append({"labels": torch.randint(0, 5, (T,), generator=g).to(device),
                        "masks": (torch.rand(T, H, W, generator=g) > 0.5).float().to(device)})
    targets[0]["masks"][1] = 0  # an all-zero mask
    targets[2]["masks"][0] = 1  # an all-ones mask
    outputs = {"pred_logits": torch.randn(3, Q, 6, generator=g, dtype=torch.float64).to(dtype).to(device),
               "pred_masks": (torch.randn(3, Q, h, w, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)}
    return outputs, targets


def test_fused_matcher_matches_the_reference(device, triton_launches):
    g = torch.Generator().manual_seed(5)
    outputs, targets = _batch(device, EXACT, g)
    ref, fused = MaskFormerMatcher(1, 20, 1), MaskFormerMatcher(1, 20, 1, fused=True)
    for a, b in zip(fused.cost_matrices(outputs, targets), ref.cost_matrices(outputs, targets)):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=0, atol=20 * TOL[EXACT])
    for (qa, ta), (qb, tb) in zip(fused(outputs, targets), ref(outputs, targets)):
        assert torch.equal(qa, qb) and torch.equal(ta, tb)
    assert triton_launches["mask_cost"] == 2  # one launch per call for the whole batch (costs + forward)
    with _backend.use_backend("torch"):  # the plain-PyTorch path of the op (CPU without the interpreter)
        for (qa, ta), (qb, tb) in zip(fused(outputs, targets), ref(outputs, targets)):
            assert torch.equal(qa, qb) and torch.equal(ta, tb)
    assert triton_launches["mask_cost"] == 2
    # the embeddings layout: same assignments, no (B, Q, h, w) logits passed at all
    C = 16
    emb = torch.randn(3, 12, C, generator=g, dtype=torch.float64).to(EXACT).to(device)
    feats = torch.randn(3, C, 9, 11, generator=g, dtype=torch.float64).to(EXACT).to(device)
    masks = torch.einsum("bqc,bchw->bqhw", emb, feats)
    out_e = {"pred_logits": outputs["pred_logits"], "pred_embeds": emb, "mask_features": feats}
    out_m = {"pred_logits": outputs["pred_logits"], "pred_masks": masks}
    for (qa, ta), (qb, tb) in zip(fused(out_e, targets), ref(out_m, targets)):
        assert torch.equal(qa, qb) and torch.equal(ta, tb)
    assert "fused=True" in repr(fused)


_RULES = r"""
import json
from fastseg.bench import inspect as I
print(json.dumps(I.inspect_kernels(["mask_cost"], "default", dtypes=["bf16"], sass=False, defaults=False)))
"""


def test_sm90_resources_bf16():
    # built for sm_90 with the launcher's own blocks at Q=100, T=30, 128x128 logits: no spills, tensor cores
    from fastseg.bench import inspect as I

    rows = sm90_rows(_RULES, timeout=600)
    assert {r["layout"] for r in rows if r["kernel"] == "_mask_cost_kernel"} == {"qhw", "emb"}, rows
    assert I.violations(rows) == []
    for r in rows:
        if r["kernel"] == "_mask_cost_kernel":
            assert r["wgmma"] + r["mma"] > 0, r
