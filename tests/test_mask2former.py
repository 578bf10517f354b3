"""Mask2Former reference model and its fused (memory-lean) path, on CPU with tiny configurations."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastseg

from fastseg.models import build_mask2former, fused as fz
from fastseg.models.common import point_sample
from fastseg.models.matcher import batch_sigmoid_ce_loss, batch_sigmoid_ce_loss_gemm
from helpers import assert_close

TINY = dict(hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=64, dec_layers=3, mask_dim=32, conv_dim=32,
            enc_layers=1, enc_nheads=4, enc_dim_feedforward=64, train_num_points=64, test_topk_per_image=8,
            object_mask_threshold=0.0, overlap_threshold=0.0, thing_ids=(0, 1))


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return build_mask2former("tiny", 5, **{**TINY, **kw}).to(dtype)


def _batch(dtype, size=64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=g, dtype=dtype)
    targets = [{"labels": torch.tensor([1, 3]), "masks": (torch.rand(2, size, size, generator=g) > 0.5).to(dtype)},
               {"labels": torch.tensor([0]), "masks": (torch.rand(1, size, size, generator=g) > 0.5).to(dtype)}]
    return x, targets


def test_reference_train_step_and_inference():
    model = _model()
    x, targets = _batch(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = model(x, targets)
    assert len(losses) == 3 * (TINY["dec_layers"] + 1)  # ce, mask, dice on every prediction
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    model.eval()
    out = model(x)
    assert out["pred_masks"].shape == (2, 6, 16, 16) and out["pred_logits"].shape == (2, 6, 6)
    sem = model.semantic_inference(out, (64, 64))
    assert sem[0].shape == (5, 64, 64)
    post = model.semantic_inference(out, (64, 64), image_sizes=[(60, 50), (64, 64)], output_sizes=[(30, 25), (64, 64)])
    assert post[0].shape == (5, 30, 25) and torch.equal(post[1], sem[1])
    pan, info = model.panoptic_inference(out, (64, 64))[0]
    assert pan.shape == (64, 64) and pan.dtype == torch.int32
    inst = model.instance_inference(out, (64, 64))[0]
    assert inst["pred_masks"].shape == (8, 64, 64)


def _copy(mask):
    return mask.clone() if isinstance(mask, torch.Tensor) else mask


def _capture_masks(model):
    masks = []
    hooks = [layer.multihead_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(_copy(kwargs["attn_mask"])), with_kwargs=True)
        for layer in model.predictor.transformer_cross_attention_layers]
    return masks, hooks


def _run(model, fused, x, targets):
    model.set_fused(fused)
    model.zero_grad()
    masks, hooks = _capture_masks(model)
    torch.manual_seed(1)  # same random points on both paths
    outputs = model.forward_features(x)
    raw, indices = model.criterion(outputs, targets, return_indices=True)
    losses = {k: v * model.criterion.weight_dict[k] for k, v in raw.items()}
    sum(losses.values()).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, losses, indices, masks, grads


def test_fused_matches_reference_float64():
    model = _model(torch.float64)
    x, targets = _batch(torch.float64)
    out_r, loss_r, idx_r, masks_r, grad_r = _run(model, False, x, targets)
    out_f, loss_f, idx_f, masks_f, grad_f = _run(model, True, x, targets)
    assert "pred_masks" not in out_f and out_f["pred_embeds"].shape == (2, 6, 32)
    # attention masks, bit for bit (both bool (B·heads, Q, HW), True = masked)
    assert len(masks_r) == len(masks_f) == TINY["dec_layers"]
    for mr, mf in zip(masks_r, masks_f):
        assert mr.dtype == mf.dtype == torch.bool and torch.equal(mr, mf)
    allm = torch.cat([m.flatten() for m in masks_r])
    assert allm.any() and not allm.all()  # non-trivial masks
    # logits, mask logits, matcher assignments, losses
    assert torch.equal(out_r["pred_logits"], out_f["pred_logits"])
    for a, b in zip([out_r] + out_r["aux_outputs"], [out_f] + out_f["aux_outputs"]):
        assert_close(torch.einsum("bqc,bchw->bqhw", b["pred_embeds"], b["mask_features"]), a["pred_masks"], 1e-12)
    for ir, jf in zip(idx_r, idx_f):
        for (qr, tr), (qf, tf) in zip(ir, jf):
            assert torch.equal(qr, qf) and torch.equal(tr, tf)
    assert loss_r.keys() == loss_f.keys()
    for k in loss_r:
        assert abs(loss_r[k].item() - loss_f[k].item()) <= 1e-12 * max(1.0, abs(loss_r[k].item())), k
    # every parameter gradient (relative to the global gradient norm: some true gradients are exactly 0,
    # e.g. conv biases before GroupNorm, and carry only rounding noise)
    assert grad_r.keys() == grad_f.keys() and len(grad_r) == len(list(model.parameters()))
    total = torch.sqrt(sum(g.pow(2).sum() for g in grad_r.values()))
    for n in grad_r:
        assert (grad_r[n] - grad_f[n]).norm() <= 1e-10 * total, n
    # inference: semantic, panoptic, instance
    model.eval()
    with torch.no_grad():
        out_r = model.set_fused(False).forward_features(x)
        out_f = model.set_fused(True).forward_features(x)
    for sr, sf in zip(model.semantic_inference(out_r, (64, 48)), model.semantic_inference(out_f, (64, 48))):
        assert_close(sf, sr, 1e-12)
    for (pr, ir), (pf, if_) in zip(model.panoptic_inference(out_r, (64, 64)), model.panoptic_inference(out_f, (64, 64))):
        assert torch.equal(pr, pf) and ir == if_
    assert any(len(ir) > 0 for _, ir in model.panoptic_inference(out_r, (64, 64)))
    for a, b in zip(model.instance_inference(out_r, (64, 64)), model.instance_inference(out_f, (64, 64))):
        assert torch.equal(a["pred_classes"], b["pred_classes"]) and torch.equal(a["pred_masks"], b["pred_masks"])
        assert_close(b["scores"], a["scores"], 1e-12)
    # official order: crop each image's masks to its size and resize to its output size *before* panoptic /
    # instance inference (detectron2's sem_seg_postprocess); the fused path streams both resizes as one map
    size, sizes, outs = tuple(x.shape[-2:]), [(50, 37), tuple(x.shape[-2:])], [(80, 61), (23, 30)]
    kw = dict(image_sizes=sizes, output_sizes=outs)
    for (pr, ir), (pf, if_), o in zip(model.panoptic_inference(out_r, size, **kw),
                                      model.panoptic_inference(out_f, size, tile_rows=7, **kw), outs):
        assert pr.shape == o and torch.equal(pr, pf) and ir == if_
    for a, b, o in zip(model.instance_inference(out_r, size, **kw), model.instance_inference(out_f, size, **kw), outs):
        assert a["pred_masks"].shape[1:] == o and torch.equal(a["pred_masks"], b["pred_masks"])
        assert torch.equal(a["pred_classes"], b["pred_classes"]) and a["pred_masks"].any()
        assert_close(b["scores"], a["scores"], 1e-12)
    assert any(len(ir) > 0 for _, ir in model.panoptic_inference(out_r, size, **kw))
    with pytest.raises(ValueError, match="one .* per image"):
        model.panoptic_inference(out_f, size, image_sizes=sizes[:1])


def test_point_sampling_identities():
    torch.manual_seed(0)
    B, C, h, w, N, P = 2, 5, 7, 9, 5, 11
    feats = torch.randn(B, C, h, w, dtype=torch.float64, requires_grad=True)
    e = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    bidx = torch.tensor([1, 0, 1, 1, 0])
    coords = torch.rand(N, P, 2, dtype=torch.float64)
    # reference: form the masks, then sample them
    masks = torch.einsum("nc,nchw->nhw", e, feats[bidx])
    ref = point_sample(masks[:, None], coords, align_corners=False)[:, 0]
    g = torch.randn(N, P, dtype=torch.float64)
    ge_r, gf_r = torch.autograd.grad((ref * g).sum(), (e, feats))
    for chunk in (1, 2 * (h * w + 3 * P), 1 << 20):  # one mask per chunk, two per chunk, everything at once
        out = fz.point_logits(e, feats, bidx, coords, chunk_elems=chunk)
        assert_close(out, ref, 1e-13, "point_logits")
        ge, gf = torch.autograd.grad((out * g).sum(), (e, feats))
        assert_close(ge, ge_r, 1e-13, "grad e")
        assert_close(gf, gf_r, 1e-13, "grad F")
    # shared points: sample F once, then one GEMM
    c1 = coords[:1]
    shared = fz.shared_point_logits(e.detach(), feats.detach()[0], c1)
    full = point_sample(torch.einsum("nc,chw->nhw", e.detach(), feats.detach()[0])[:, None],
                        c1.expand(N, -1, -1), align_corners=False)[:, 0]
    assert_close(shared, full, 1e-13, "shared_point_logits")
    # BCE cost as one GEMM
    t = (torch.rand(3, P, dtype=torch.float64) > 0.5).double()
    assert_close(batch_sigmoid_ce_loss_gemm(full, t), batch_sigmoid_ce_loss(full, t), 1e-13, "bce gemm")


@pytest.mark.parametrize("size,tile", [((50, 37), 7), ((13, 5), None), ((7, 9), 3)])
def test_tiled_upsampling_matches_interpolate(size, tile):
    torch.manual_seed(0)
    feats = torch.randn(4, 7, 9, dtype=torch.float64)
    e = torch.randn(3, 4, dtype=torch.float64)
    ref = F.interpolate(torch.einsum("nc,chw->nhw", e, feats)[None], size=size, mode="bilinear",
                        align_corners=False)[0]
    out = torch.empty_like(ref)
    rows = 0
    for y0, y1, t in fz.iter_upsampled_logits(e, feats, size, tile_rows=tile):
        assert tile is None or y1 - y0 <= tile
        out[:, y0:y1] = t
        rows += y1 - y0
    assert rows == size[0]
    assert_close(out, ref, 1e-13)


def test_level_allowed_matches_reference_mask():
    torch.manual_seed(0)
    e = torch.randn(2, 4, 6, dtype=torch.float64)
    feats = torch.randn(2, 6, 16, 12, dtype=torch.float64)
    e[0, 1] = 0  # logits exactly 0: sigmoid = 0.5 is not < 0.5, so allowed on both paths
    feats[1] = feats[1].abs() + 0.1
    e[1, 3] = -1.0  # every logit negative: empty row -> attends everywhere
    logits = F.interpolate(torch.einsum("bqc,bchw->bqhw", e, feats), size=(5, 7), mode="bilinear", align_corners=False)
    ref_masked = logits.sigmoid().flatten(2) < 0.5
    ref_masked[torch.where(ref_masked.sum(-1) == ref_masked.shape[-1])] = False
    allowed = fz.level_allowed(e, fz.resize_mask_features(feats, (5, 7)))
    assert torch.equal(allowed, ~ref_masked)
    assert allowed[1, 3].all() and allowed[0, 1].all() and not allowed.all()


def test_fused_with_masked_cross_attention_if_available(triton_launches):
    nn_mod = pytest.importorskip("fastseg.nn")
    if not hasattr(nn_mod, "MaskedCrossAttention"):
        pytest.skip("fastseg.nn.MaskedCrossAttention is not in this build")
    model = _model(torch.float64)
    x, targets = _batch(torch.float64)
    _, loss_r, _, _, grad_r = _run(model, False, x, targets)
    for layer in model.predictor.transformer_cross_attention_layers:
        layer.multihead_attn = nn_mod.MaskedCrossAttention.from_mha(layer.multihead_attn)
    _, loss_r2, _, masks_r, grad_r2 = _run(model, False, x, targets)  # reference decoder, patched attention
    _, loss_f, _, masks_f, grad_f = _run(model, True, x, targets)
    from fastseg.ops import unpack_mask
    for mr, mf in zip(masks_r, masks_f):
        # packed from the embeddings (no (B·heads, Q, L) tensor), shared by the heads, equal bit for bit
        assert type(mf).__name__ == "PackedMask" and mf.bits.shape[1] == 1
        B, Q, L = mr.shape[0] // 4, mr.shape[1], mr.shape[2]
        assert torch.equal(unpack_mask(mf)[:, 0], ~mr.view(B, 4, Q, L)[:, 0])
    for k in loss_r:
        assert abs(loss_r[k].item() - loss_r2[k].item()) <= 1e-9 * max(1.0, abs(loss_r[k].item())), k
    for k in loss_r:
        assert abs(loss_r[k].item() - loss_f[k].item()) <= 1e-9 * max(1.0, abs(loss_r[k].item())), k
    total = torch.sqrt(sum(g.pow(2).sum() for g in grad_r.values()))
    for n in grad_r:
        assert (grad_r[n] - grad_f[n]).norm() <= 1e-8 * total, n
    if fastseg.interpreter_enabled():  # the Triton kernels ran (sign-and-pack mask, attention fwd + bwd)
        for name in ("attention_mask_sign_pack", "masked_attention_fwd", "masked_attention_bwd_dq"):
            assert triton_launches[name] > 0, name


def test_bad_inputs():
    with pytest.raises(ImportError, match="not available"):
        build_mask2former("no_such_backbone", 3)
    model = _model()
    with pytest.raises(AssertionError):
        model.predictor([torch.randn(1, 32, 2, 2)] * 2, torch.randn(1, 32, 16, 16))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.where = t.numel(), (str(func), tuple(t.shape))
        return out


def test_fused_path_never_forms_query_by_pixel_tensors():
    """Decoder + matcher + losses + backward, then semantic inference: the reference forms (B, Q, H/4, W/4)
    logits and (Q, H, W) upsampled masks; the fused path stays below both (many queries, few channels, so
    Q·pixels dominates every other tensor; nheads=2 keeps nn.MultiheadAttention's (B·heads, Q, HW/4)
    probabilities at stride 8 below the bound too)."""
    Q, size = 64, 64
    model = _model(num_queries=Q, mask_dim=16, conv_dim=16, hidden_dim=16, nheads=2, enc_nheads=2)
    x, targets = _batch(torch.float32, size)
    mask_features, multi_scale = model.pixel_decoder(model.backbone(x))
    mask_features = mask_features.detach().requires_grad_()
    multi_scale = [f.detach().requires_grad_() for f in multi_scale]
    h, w = mask_features.shape[-2:]
    largest = {}
    for fused in (False, True):
        model.set_fused(fused)
        train, infer = _LargestTensor(), _LargestTensor()
        with train:
            outputs = model.predictor(multi_scale, mask_features)
            sum(model.losses(outputs, targets).values()).backward()
        with torch.no_grad(), infer:
            model.semantic_inference(outputs, (size, size), tile_rows=8)
        largest[fused] = (train, infer)
    ref_train, ref_infer = largest[False]
    fz_train, fz_infer = largest[True]
    assert ref_train.numel >= 2 * Q * h * w and ref_infer.numel >= Q * size * size  # the bound can be hit
    assert fz_train.numel < 2 * Q * h * w, fz_train.where
    assert fz_infer.numel <= Q * size * size // 4, fz_infer.where


def test_reference_matches_hugging_face_port():
    """The reference model built from a Hugging Face Mask2Former (same weights) computes the same logits, masks
    and, with the same random points, the same loss; the fused path on it gives that loss too."""
    from hf_models import targets as hf_targets, tiny_hf_mask2former
    from fastseg.models.convert import mask2former_from_hf

    hf = tiny_hf_mask2former()
    model = mask2former_from_hf(hf)
    x = torch.randn(2, 3, 64, 64)
    targets = hf_targets(torch.float32)
    hf.eval(), model.eval()
    with torch.no_grad():
        out_hf, out = hf(pixel_values=x), model(x)
    torch.testing.assert_close(out["pred_logits"], out_hf.class_queries_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_masks"], out_hf.masks_queries_logits, rtol=1e-5, atol=1e-5)
    hf.train(), model.train()
    torch.manual_seed(1)
    loss_hf = hf(pixel_values=x, mask_labels=[t["masks"] for t in targets],
                 class_labels=[t["labels"] for t in targets]).loss
    for fused in (False, True):
        model.set_fused(fused)
        torch.manual_seed(1)
        loss = sum(model(x, targets).values())
        torch.testing.assert_close(loss, loss_hf, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_both_paths():
    model = _model()
    x, targets = _batch(torch.float32)
    for fused in (False, True):
        model.set_fused(fused).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(model(x, targets).values())
        loss.backward()
        assert torch.isfinite(loss)
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            sem = model.semantic_inference(model(x), (64, 64))
        assert sem[0].shape == (5, 64, 64) and torch.isfinite(sem[0].float()).all()


@pytest.mark.parametrize("backbone", ["mscan_t", "coc_tiny"])
def test_project_backbone_configs(backbone):
    """The shipped backbone configs plug in: channels known without a dummy forward, one training step."""
    from fastseg.models.backbones import KNOWN_CHANNELS

    torch.manual_seed(0)
    model = build_mask2former(backbone, 5, **TINY)
    x, targets = _batch(torch.float32, size=32)
    feats = model.backbone(x)
    assert [f.shape[1] for f in feats] == KNOWN_CHANNELS[backbone]
    assert [32 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    if backbone == "coc_tiny":  # plugs in the same way; one training step (MSCAN) is enough CPU time
        out = model.eval()(x)
        assert out["pred_masks"].shape == (2, TINY["num_queries"], 8, 8)
        return
    losses = model(x, targets)
    assert len(losses) == 3 * (TINY["dec_layers"] + 1) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
