"""MaskFormer's fused full-resolution mask losses (bilinear upsample + sigmoid focal + dice) vs the official
criterion's formulas, forward and every gradient, and MaskFormer.set_fused vs the reference path."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg import _backend
from fastseg.kernels import mask_loss as K
from fastseg.models import build_maskformer
from fastseg.models.criterion import dice_loss
from fastseg.models.maskformer import MaskFormerMatcher, sigmoid_focal_loss
from fastseg.ops.mask_loss import mask_losses, mask_losses_from_embeddings, matched_logits

from helpers import EXACT, TOL, assert_close


def _official(x, targets, num_masks, alpha=0.25, gamma=2.0):
    """facebookresearch/MaskFormer criterion.loss_masks on matched logits x (T, h, w), targets (T, H, W)."""
    up = F.interpolate(x[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
    t = targets.flatten(1).to(up)
    return sigmoid_focal_loss(up, t, num_masks, alpha, gamma), dice_loss(up, t, num_masks)


def _targets(T, H, W, device, seed=0):
    """Blob-ish binary masks; row 0 empty, row 1 all ones (when T allows)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(T, H, W, generator=g) > torch.rand(T, 1, 1, generator=g)
    if T > 1:
        t[0] = False
        t[1] = True
    return t.to(device)


def _losses_and_grads(fn, x):
    x = x.detach().clone().requires_grad_()
    focal, dice = fn(x)
    g_focal, = torch.autograd.grad(focal, x, retain_graph=True)
    g_dice, = torch.autograd.grad(dice, x)
    return focal, dice, g_focal, g_dice


def _compare(x, targets, num_masks, tol, rows=None, **kw):
    ref_t = targets if rows is None else targets[rows]
    ref = _losses_and_grads(lambda v: _official(v.to(torch.promote_types(v.dtype, torch.float32)), ref_t,
                                                num_masks, **kw), x)
    out = _losses_and_grads(lambda v: mask_losses(v, targets, num_masks, rows, **kw), x)
    for name, a, b in zip(("loss_mask", "loss_dice", "d logits (focal)", "d logits (dice)"), out, ref):
        assert_close(a.to(b.dtype), b, tol, name)
    return out


@pytest.mark.parametrize("T,h,w,H,W,dtype", [
    (3, 5, 7, 21, 26, EXACT),            # odd sizes, about 4x (not exactly)
    (4, 8, 8, 32, 32, torch.float32),    # exactly 4x
    (3, 9, 6, 7, 5, EXACT),              # targets smaller than the logits (downsampling)
    (2, 4, 5, 31, 29, EXACT),            # targets larger than 4x
])
def test_mask_losses_match_official(T, h, w, H, W, dtype, device, triton_launches):
    x = torch.randn(T, h, w, device=device, dtype=dtype) * 3
    targets = _targets(T, H, W, device)
    focal, dice, g, _ = _compare(x, targets, 2.5, TOL[dtype])
    assert focal.dtype == dice.dtype == dtype and g.dtype == dtype
    assert triton_launches["mask_loss_fwd"] == 1 and triton_launches["mask_loss_bwd"] == 2


def test_many_tiles_halos_and_chunks(device, triton_launches, monkeypatch):
    """Small blocks: several output tiles, low-res tiles whose halos overlap, several chunks per tile."""
    monkeypatch.setitem(K.INTERPRETER_BLOCKS, "BP", 64)
    monkeypatch.setitem(K.INTERPRETER_BLOCKS, "BI", 16)
    monkeypatch.setitem(K.INTERPRETER_BLOCKS, "BJ", 16)
    monkeypatch.setitem(K.INTERPRETER_BLOCKS, "BO", 16)
    x = torch.randn(1, 19, 18, device=device, dtype=EXACT) * 2
    _compare(x, _targets(1, 75, 70, device, seed=1), 1.0, TOL[EXACT])
    x = torch.randn(1, 33, 18, device=device, dtype=EXACT) * 2  # downsampling: rows/columns without taps
    _compare(x, _targets(1, 13, 7, device, seed=3), 1.0, TOL[EXACT])
    assert triton_launches["mask_loss_bwd"] == 4


def test_target_rows_strides_float_targets_and_options(device, triton_launches):
    """Targets addressed by row (padded (B·T_max, H, W) needs no gather), non-contiguous logits, soft float
    targets (the official formulas for any target value), gamma ≠ 2 and alpha < 0."""
    x = (torch.randn(5, 9, 3, device=device, dtype=EXACT) * 2).transpose(1, 2)  # (5, 3, 9) strided
    targets = _targets(7, 13, 35, device, seed=2)
    rows = torch.tensor([6, 0, 3, 1, 5])
    _compare(x, targets, 3.0, TOL[EXACT], rows)
    soft = torch.rand(5, 13, 35, device=device, dtype=EXACT)
    _compare(x, soft, 3.0, TOL[EXACT])
    _compare(x, targets[:5], 3.0, TOL[EXACT], gamma=1.5, alpha=-1.0)
    _compare(x, targets[:5].to(torch.uint8), 3.0, TOL[EXACT], gamma=0.0, alpha=0.4)
    assert triton_launches["mask_loss_fwd"] == 4 and triton_launches["mask_loss_bwd"] == 8


def test_bf16_logits_accumulate_in_fp32(device, triton_launches):
    x = (torch.randn(3, 7, 6, device=device) * 3).to(torch.bfloat16)
    targets = _targets(3, 27, 25, device)
    ref = _losses_and_grads(lambda v: _official(v.float(), targets, 2.0), x.float())
    out = _losses_and_grads(lambda v: mask_losses(v, targets, 2.0), x)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.bfloat16
    assert_close(out[0], ref[0], 1e-5, "loss_mask")  # same bf16 inputs, fp32 math: fp32 rounding only
    assert_close(out[1], ref[1], 1e-5, "loss_dice")
    assert_close(out[2].float(), ref[2], 1e-2, "d logits (focal)")  # rounded to bf16 once
    assert_close(out[3].float(), ref[3], 1e-2, "d logits (dice)")
    # embeddings under autocast: cast to bf16 first (as the reference's einsum), fp32 gradients to fp32 leaves
    e = torch.randn(3, 8, device=device, requires_grad=True)
    f = torch.randn(1, 8, 7, 6, device=device, requires_grad=True)
    with torch.autocast(device if isinstance(device, str) else device.type, dtype=torch.bfloat16):
        got = mask_losses_from_embeddings(e, f, torch.zeros(3, dtype=torch.long), targets, 2.0)
    want = _official(matched_logits(e.bfloat16(), f.bfloat16(), torch.zeros(3, dtype=torch.long)).float(), targets,
                     2.0)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, 1e-5)
    assert_close(torch.autograd.grad(sum(got), e)[0], torch.autograd.grad(sum(want), e)[0], 2e-2, "d embeds")


def test_from_embeddings(device, triton_launches):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 6, 5, 7, generator=g, dtype=EXACT).to(device)
    embeds = torch.randn(4, 6, generator=g, dtype=EXACT).to(device)
    batch_idx = torch.tensor([2, 0, 2, 2])  # image 1 has no pair
    targets = _targets(4, 19, 29, device, seed=5)
    leaves = [feats.clone().requires_grad_(), embeds.clone().requires_grad_()]
    ref = _official(matched_logits(leaves[1], leaves[0], batch_idx), targets, 1.5)
    ref_g = torch.autograd.grad(ref[0] * 0.7 + ref[1] * 1.3, leaves)
    fl = [feats.clone().requires_grad_(), embeds.clone().requires_grad_()]
    out = mask_losses_from_embeddings(fl[1], fl[0], batch_idx, targets, 1.5)
    out_g = torch.autograd.grad(out[0] * 0.7 + out[1] * 1.3, fl)
    for name, a, b in zip(("loss_mask", "loss_dice", "d features", "d embeds"), (*out, *out_g), (*ref, *ref_g)):
        assert_close(a, b, TOL[EXACT], name)
    assert out_g[0][1].abs().max() == 0
    assert triton_launches["mask_loss_fwd"] == 1 and triton_launches["mask_loss_bwd"] == 1
    # host counts instead of batch_idx (pairs sorted by image): the same numbers, no tensor read to group them
    order = torch.argsort(batch_idx, stable=True)
    rows = order.clone()  # pair t of the sorted order uses target row order[t]
    for backend in ("auto", "torch"):
        fc = [feats.clone().requires_grad_(), embeds.clone().requires_grad_()]
        with _backend.use_backend(backend):
            cnt = mask_losses_from_embeddings(fc[1][order], fc[0], None, targets, 1.5, rows,
                                              pairs_per_image=[1, 0, 3])
        cnt_g = torch.autograd.grad(cnt[0] * 0.7 + cnt[1] * 1.3, fc)
        for name, a, b in zip(("loss_mask", "loss_dice", "d features", "d embeds"), (*cnt, *cnt_g), (*ref, *ref_g)):
            assert_close(a, b, TOL[EXACT], f"{backend} pairs_per_image {name}")
    assert triton_launches["mask_loss_fwd"] == 2 and triton_launches["mask_loss_bwd"] == 2
    # a sorted batch_idx: grouped by slices (views, GEMMs straight into their rows), the same numbers
    fs = [feats.clone().requires_grad_(), embeds.clone().requires_grad_()]
    srt = mask_losses_from_embeddings(fs[1][order], fs[0], batch_idx[order], targets, 1.5, rows)
    srt_g = torch.autograd.grad(srt[0] * 0.7 + srt[1] * 1.3, fs)
    for name, a, b in zip(("loss_mask", "loss_dice", "d features", "d embeds"), (*srt, *srt_g), (*ref, *ref_g)):
        assert_close(a, b, TOL[EXACT], f"sorted batch_idx {name}")
    for bi in (batch_idx, batch_idx[order]):  # index and slice groups against a gather + einsum
        assert_close(matched_logits(embeds, feats, bi), torch.einsum("tc,tchw->thw", embeds, feats[bi]), TOL[EXACT])
    with pytest.raises(ValueError, match="summing to the 4 pairs"):
        mask_losses_from_embeddings(embeds, feats, None, targets, 1.5, pairs_per_image=[1, 0, 2])
    with pytest.raises(ValueError, match="not both"):
        mask_losses_from_embeddings(embeds, feats, batch_idx, targets, 1.5, pairs_per_image=[1, 0, 3])


def test_out_of_range_target_rows_are_nan(device, triton_launches):
    # no host check on the Triton path (it would make every call wait for the GPU): the bad pair's sums and
    # gradient are NaN, the others' are not
    from fastseg.ops.mask_loss import mask_loss_sums

    x = torch.randn(3, 4, 5, dtype=EXACT, device=device, requires_grad=True)
    targets = _targets(2, 9, 11, device)
    for bad in (2, -1):
        sums = mask_loss_sums(x, targets, torch.tensor([1, bad, 0]))
        (g,) = torch.autograd.grad(sums.sum(), x)
        assert sums[1].isnan().all() and sums[[0, 2]].isfinite().all()
        assert g[1].isnan().all() and g[[0, 2]].isfinite().all()
    assert triton_launches["mask_loss_fwd"] == 2 and triton_launches["mask_loss_bwd"] == 2


def test_torch_path_and_errors(device):
    x = torch.randn(2, 4, 5, dtype=EXACT, device=device)
    targets = _targets(2, 9, 11, device)
    with _backend.use_backend("torch"):
        plain = mask_losses(x, targets, 1.0)
    fused = mask_losses(x, targets, 1.0)
    for a, b in zip(plain, fused):
        assert_close(a, b, TOL[EXACT])
    empty = mask_losses(torch.zeros(0, 4, 5, dtype=EXACT, device=device, requires_grad=True), targets[:0], 1.0)
    assert all(v.item() == 0 for v in empty)
    with pytest.raises(ValueError, match="one mask per pair"):
        mask_losses(x, targets[:1], 1.0)
    with pytest.raises(ValueError, match="no gradient flows to the targets"):
        mask_losses(x, targets.to(EXACT).requires_grad_(), 1.0)
    with _backend.use_backend("torch"), pytest.raises(ValueError, match="target_rows must be in"):
        mask_losses(x, targets, 1.0, target_rows=[0, 2])  # the plain path checks CPU rows (the Triton path: NaN)
    with pytest.raises(ValueError, match=r"\(T, h, w\)"):
        mask_losses(x[0], targets, 1.0)
    with pytest.raises(ValueError, match="batch_idx must be in"):
        mask_losses_from_embeddings(torch.randn(2, 3, dtype=EXACT, device=device),
                                    torch.randn(1, 3, 4, 5, dtype=EXACT, device=device), torch.tensor([0, 1]), targets,
                                    1.0)


# ------------------------------------------------------------------------------------- MaskFormer.set_fused
LOSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
TINY = dict(hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64, dec_layers=2, conv_dim=32, mask_dim=32)
FUSED_MATCHER = "fused" in inspect.signature(MaskFormerMatcher.__init__).parameters


def _batch(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=dtype)
    targets = [{"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 64, 58, generator=g) > 0.5},  # padded
               {"labels": torch.tensor([2]), "masks": torch.rand(1, 60, 64, generator=g) > 0.5}]
    return x, targets


def _step(model, x, targets):
    model.zero_grad()
    torch.manual_seed(1)
    losses = model(x, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_criterion_with_a_matcher_without_fused_costs(device, triton_launches):
    """Fused outputs (embeddings + mask features) and a matcher that reads ``pred_masks``: the criterion hands
    it the stride-4 logits; every loss and gradient as the reference criterion on the full logits."""
    torch.manual_seed(0)
    model = build_maskformer("tiny", 4, **TINY).to(device, EXACT)
    crit_r = model.criterion
    crit_f = copy.deepcopy(crit_r)
    crit_f.fused = True
    crit_f.matcher = _MatcherWithoutFused(crit_r.matcher)
    _, targets = _batch(EXACT)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(3, 2, 5, 5, generator=g, dtype=EXACT).to(device).requires_grad_(),  # (L, B, Q, K+1)
              torch.randn(3, 2, 5, 32, generator=g, dtype=EXACT).to(device).requires_grad_(),  # embeddings
              torch.randn(2, 32, 16, 16, generator=g, dtype=EXACT).to(device).requires_grad_()]  # mask features
    cls, emb, feats = leaves
    masks = torch.einsum("lbqc,bchw->lbqhw", emb, feats)
    ref = {"pred_logits": cls[-1], "pred_masks": masks[-1],
           "aux_outputs": [{"pred_logits": cls[i], "pred_masks": masks[i]} for i in range(2)]}
    fused = {"pred_logits": cls[-1], "pred_embeds": emb[-1], "mask_features": feats,
             "aux_outputs": [{"pred_logits": cls[i], "pred_embeds": emb[i], "mask_features": feats} for i in range(2)]}
    losses_r, losses_f = crit_r(ref, targets), crit_f(fused, targets)
    assert sorted(losses_r) == sorted(losses_f) and len(losses_r) == 9
    for k in losses_r:
        assert_close(losses_f[k], losses_r[k], LOSS_TOL[EXACT], k)
    w = torch.rand(len(losses_r), generator=g, dtype=EXACT).to(device)
    grads_r = torch.autograd.grad(sum(wi * losses_r[k] for wi, k in zip(w, sorted(losses_r))), leaves)
    grads_f = torch.autograd.grad(sum(wi * losses_f[k] for wi, k in zip(w, sorted(losses_f))), leaves)
    for name, a, b in zip(("d class logits", "d embeddings", "d mask features"), grads_f, grads_r):
        assert_close(a, b, GRAD_TOL[EXACT], name)
    assert crit_f.matcher.calls == 3 and triton_launches["mask_loss_fwd"] == 3


class _MatcherWithoutFused(nn.Module):
    def __init__(self, matcher):
        super().__init__()
        self.inner = matcher
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return self.inner.forward(outputs, targets)


def test_set_fused_matches_reference(device, triton_launches):
    """fp64 (fp32 on a GPU), dropout 0 (the fused attention dropout draws other random numbers): the same losses and
    every parameter gradient as the reference path, with the fused matcher where the build has it; the mask loss
    and attention kernels ran."""
    torch.manual_seed(0)
    ref = build_maskformer("tiny", 4, **{**TINY, "dropout": 0.0}).to(device, EXACT).train()
    model = copy.deepcopy(ref)
    params = list(model.parameters())
    assert model.set_fused(True) is model and model.fused
    assert getattr(model.criterion.matcher, "fused", False) is FUSED_MATCHER
    assert all(a is b for a, b in zip(params, model.parameters()))  # same parameter objects
    assert all(layer.multihead_attn.need_weights_default is False
               for layer in model.predictor.transformer.decoder_layers)
    x, targets = _batch(EXACT)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    losses_r, grads_r = _step(ref, x.to(device), targets)
    triton_launches.clear()
    losses_f, grads_f = _step(model, x.to(device), targets)
    assert sorted(losses_f) == sorted(losses_r)
    for k in losses_r:
        assert_close(losses_f[k], losses_r[k], LOSS_TOL[EXACT], k)
    assert sorted(grads_f) == sorted(grads_r)
    for k in grads_r:
        assert_close(grads_f[k], grads_r[k], GRAD_TOL[EXACT], k)
    assert triton_launches["mask_loss_fwd"] == 2 and triton_launches["mask_loss_bwd"] == 2
    assert triton_launches["masked_attention_fwd"] == 2
    model.eval()
    with torch.no_grad():
        out = model(x.to(device))
        assert "pred_masks" not in out and out["pred_embeds"].shape == (2, 5, 32)
        sem_f = model.semantic_inference(out, (64, 64))
        sem_r = ref.eval().semantic_inference(ref(x.to(device)), (64, 64))
    assert_close(sem_f[0], sem_r[0], LOSS_TOL[EXACT], "semantic inference")
    model.set_fused(False)
    assert not model.fused and all(type(layer.multihead_attn) is nn.MultiheadAttention
                                   for layer in model.predictor.transformer.decoder_layers)
