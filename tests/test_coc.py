"""CoC backbones: fused token mixers (fastseg.nn.ContextCluster) against the reference ones (Cluster).

The model runs in float64 under the interpreter, so the two paths differ by ~1e-15 and a point's argmax
could only flip on a gap that small; the test asserts no such near-tie exists (every Cluster's inputs are
checked with a forward hook), so it is deterministic rather than lucky.
"""
import copy

import pytest
import torch

import fastseg
from fastseg.models import coc_medium, coc_small, coc_tiny
from fastseg.nn import ContextCluster
from fastseg.reference import Cluster
from helpers import assert_close
from test_context_cluster import MIN_GAP, _argmax_gap

# coc_tiny's fold / proposal settings (folds 8, 4, 2, 1; proposals 2x2) with one small block per stage
TINY = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], heads=[2, 2, 2, 2], head_dim=[4, 8, 8, 8],
            mlp_ratios=[2, 2, 2, 2], num_classes=5)


def test_state_dicts_match_and_mixers_are_swapped():
    for build in (coc_tiny, coc_small, coc_medium):
        ref, fused = build(fused=False), build(fused=True)
        assert list(ref.state_dict()) == list(fused.state_dict())
        assert all(type(m) is ContextCluster for m in fused.modules() if isinstance(m, (Cluster, ContextCluster)))
        assert not any(isinstance(m, ContextCluster) for m in ref.modules())
    assert sum(p.numel() for p in coc_tiny().parameters()) == 5_570_584  # 5.6M in the paper


def _nontrivial(ref):
    with torch.no_grad():  # non-trivial layer scales, alphas and betas
        for name, p in ref.named_parameters():
            if "layer_scale" in name:
                p.fill_(0.5)
            if "sim_alpha" in name:
                p.fill_(2.0)
            if "sim_beta" in name:
                p.fill_(-0.3)
    return ref


def _compare_models(ref, other, device, dtype):
    """Logits, image gradient and every parameter gradient of ``other`` against ``ref`` (same weights)."""
    # redraw the image until no Cluster sees a near-tie (1e-8 is ample in float64, MIN_GAP in float32)
    min_gap = 1e-8 if dtype == torch.float64 else MIN_GAP
    gaps = []

    def hook(mod, args):
        gaps.append(_argmax_gap(mod.f(args[0]), mod.sim_alpha.item(), mod.sim_beta.item(), mod.heads, mod.fold_w,
                                mod.fold_h, mod.proposal_w, mod.proposal_h))
    handles = [m.register_forward_pre_hook(hook) for m in ref.modules() if isinstance(m, Cluster)]
    # 96x96 input: maps 24, 12, 6, 3 -> 3x3 regions in every stage, 2x2 proposals with overlapping bins
    for seed in range(20):
        gaps.clear()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 3, 96, 96, dtype=torch.float64, generator=gen).to(device, dtype)
        with torch.no_grad():
            ref(x)
        if min(gaps) >= min_gap:
            break
    for h in handles:
        h.remove()
    assert len(gaps) == 4 and min(gaps) >= min_gap, gaps
    x_ref, x_fus = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_fus = other(x_fus)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(y_fus, y_ref, tol, "logits")
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_fus * g).sum().backward()
    assert_close(x_fus.grad, x_ref.grad, tol, "d image")
    theirs = dict(ref.named_parameters())
    for name, p_fus in other.named_parameters():
        assert_close(p_fus.grad, theirs[name].grad, tol, f"d {name}")


def test_coc_fused_matches_reference(device, triton_launches):
    dtype = torch.float64 if device == "cpu" else torch.float32
    ref = _nontrivial(coc_tiny(fused=False, **TINY).to(device, dtype))
    fused = coc_tiny(fused=True, **TINY).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    _compare_models(ref, fused, device, dtype)
    assert triton_launches["coc_fwd_kernel"] == 4 and triton_launches["coc_bwd_kernel"] == 4


@pytest.mark.parametrize("normalizer", ["sim", "mask"])
def test_coc_patched_matches_reference(normalizer, device, triton_launches):
    """fastseg.patch on a reference coc_tiny swaps every token mixer, carrying the normaliser over (the
    official code's "sim", or the pre-2023-05-31 "mask"), and the patched model computes the same function."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    ref = _nontrivial(coc_tiny(fused=False, normalizer=normalizer, **TINY).to(device, dtype))
    patched, report = fastseg.patch(copy.deepcopy(ref))
    mixers = [m for m in patched.modules() if isinstance(m, Cluster)]
    assert report.count("context_cluster") == 4 == len(mixers)
    assert all(type(m) is ContextCluster and m.normalizer == normalizer for m in mixers)
    _compare_models(ref, patched, device, dtype)
    assert triton_launches["coc_fwd_kernel"] == 4 and triton_launches["coc_bwd_kernel"] == 4


def test_coc_fused_bad_size_errors(device):
    fused = coc_tiny(fused=True, **TINY).to(device)
    with pytest.raises(ValueError, match="cannot be divided by the fold 8\\*8"):
        fused(torch.randn(1, 3, 72, 72, device=device))  # stage-1 map 18x18 is not divisible by 8
