"""Context Clusters against the official code at both of its versions of the aggregate step's normaliser.

``OfficialCluster`` below is a small transcription (einops rearranges written as reshapes/permutes) of
``Cluster.forward`` in ma-xu/Context-Cluster ``models/context_cluster.py``: at HEAD (be9a03b; the normaliser
``sim.sum(dim=-1) + 1`` since commit 3ccb0b6 of 2023-05-31, where ``sim`` is the similarity already multiplied
by the one-hot mask) and, with ``legacy=True``, before that commit (``mask.sum(dim=-1) + 1``). Like the
official class it has no ``normalizer`` and no ``proposal_w`` attribute. fastseg's reference ``Cluster``, the
fused ``ContextCluster`` (Triton interpreter) and ``fastseg.patch`` are held to it with the same state_dict.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg
from fastseg.models import coc_tiny
from fastseg.nn import ContextCluster
from fastseg.reference import Cluster
from helpers import TOL, assert_close, rel_err
from test_context_cluster import MIN_GAP, _argmax_gap, _draw


class OfficialCluster(nn.Module):
    """Official ``Cluster`` (HEAD, or pre-2023-05-31 with ``legacy``); same parameters and state_dict keys."""

    def __init__(self, dim, out_dim, proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24,
                 return_center=False, legacy=False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)
        self.proj = nn.Conv2d(heads * head_dim, out_dim, kernel_size=1)
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.centers_proposal = nn.AdaptiveAvgPool2d((proposal_w, proposal_h))
        self.fold_w, self.fold_h, self.return_center = fold_w, fold_h, return_center
        self._legacy = legacy

    def forward(self, x):
        value, x = self.v(x), self.f(x)
        B, EC, W, H = x.shape
        x = x.reshape(B * self.heads, EC // self.heads, W, H)  # b (e c) w h -> (b e) c w h
        value = value.reshape(B * self.heads, EC // self.heads, W, H)
        fold = self.fold_w > 1 and self.fold_h > 1
        if fold:  # b c (f1 w) (f2 h) -> (b f1 f2) c w h
            b0, c0, w0, h0 = x.shape
            f1, f2 = self.fold_w, self.fold_h

            def split(t):
                t = t.reshape(b0, c0, f1, w0 // f1, f2, h0 // f2).permute(0, 2, 4, 1, 3, 5)
                return t.reshape(b0 * f1 * f2, c0, w0 // f1, h0 // f2)
            x, value = split(x), split(value)
        b, c, w, h = x.shape
        centers = self.centers_proposal(x)
        value_centers = self.centers_proposal(value).reshape(b, c, -1).permute(0, 2, 1)  # b (w h) c
        b, c, ww, hh = centers.shape
        c1 = F.normalize(centers.reshape(b, c, -1).permute(0, 2, 1), dim=-1)
        x1 = F.normalize(x.reshape(b, c, -1).permute(0, 2, 1), dim=-1)
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * torch.matmul(c1, x1.transpose(-2, -1)))  # [b, M, N]
        sim_max, sim_max_idx = sim.max(dim=1, keepdim=True)
        mask = torch.zeros_like(sim)
        mask.scatter_(1, sim_max_idx, 1.)
        sim = sim * mask
        value2 = value.reshape(b, c, -1).permute(0, 2, 1)  # b (w h) c
        norm = mask if self._legacy else sim
        out = ((value2.unsqueeze(dim=1) * sim.unsqueeze(dim=-1)).sum(dim=2) + value_centers) / (
            norm.sum(dim=-1, keepdim=True) + 1.0)
        if self.return_center:
            out = out.permute(0, 2, 1).reshape(b, c, ww, hh)
        else:
            out = (out.unsqueeze(dim=2) * sim.unsqueeze(dim=-1)).sum(dim=1)
            out = out.permute(0, 2, 1).reshape(b, c, w, h)
        if fold:  # (b f1 f2) c w h -> b c (f1 w) (f2 h)
            bb = out.shape[0] // (f1 * f2)
            out = out.reshape(bb, f1, f2, c, out.shape[-2], out.shape[-1]).permute(0, 3, 1, 4, 2, 5)
            out = out.reshape(bb, c, f1 * out.shape[3], f2 * out.shape[5])
        out = out.reshape(B, self.heads * c, out.shape[-2], out.shape[-1])  # (b e) c w h -> b (e c) w h
        return self.proj(out)


NORMALIZERS = [("sim", False), ("mask", True)]  # (fastseg normalizer, official legacy flag)
# (dim, out_dim, proposal_w, proposal_h, fold_w, fold_h, heads, head_dim), input (B, W, H), alpha, beta
CFGS = {"fold2x2": ((8, 10, 2, 3, 2, 2, 2, 6), (2, 8, 10), 1.5, -0.2),
        "nofold": ((6, 7, 3, 2, 1, 1, 2, 12), (1, 7, 9), 2.0, 0.3)}


def _pair(cfg, normalizer, legacy, dtype, fused_cls=Cluster):
    dims, (B, W, H), alpha, beta = cfg
    off = OfficialCluster(*dims, legacy=legacy)
    with torch.no_grad():
        off.sim_alpha.fill_(alpha)
        off.sim_beta.fill_(beta)
    ours = fused_cls(*dims, normalizer=normalizer)
    ours.load_state_dict(off.state_dict())
    off, ours = off.to(dtype), ours.to(dtype)
    dim, heads, (pw, ph, fw, fh) = dims[0], dims[6], dims[2:6]

    def make(gen):
        return torch.randn(B, dim, W, H, generator=gen, dtype=torch.float64).to(dtype)

    inp = _draw(make, lambda t: _argmax_gap(off.f(t), alpha, beta, heads, fw, fh, pw, ph), seed=30)
    return off, ours, inp


def _compare(off, ours, inp, tol):
    x1, x2 = inp.clone().requires_grad_(), inp.clone().requires_grad_()
    y1, y2 = off(x1), ours(x2)
    assert_close(y2, y1, tol, "out")
    g = torch.randn(y1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y1.dtype)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert_close(x2.grad, x1.grad, tol, "d input")
    theirs = dict(off.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs[name].grad, tol, f"d {name}")


@pytest.mark.parametrize("cfg", CFGS, ids=list(CFGS))
@pytest.mark.parametrize("normalizer,legacy", NORMALIZERS, ids=["sim", "mask"])
def test_reference_matches_official(cfg, normalizer, legacy):
    """fastseg.reference.Cluster (plain PyTorch) against the official code of the same version, float64."""
    off, ours, inp = _pair(CFGS[cfg], normalizer, legacy, torch.float64)
    _compare(off, ours, inp, 1e-12)


def test_the_two_official_versions_differ():
    """The check above can fail: the two normalisers give clearly different outputs and gradients."""
    off, ours, inp = _pair(CFGS["fold2x2"], "sim", False, torch.float64)
    legacy = OfficialCluster(*CFGS["fold2x2"][0], legacy=True).double()
    legacy.load_state_dict(off.state_dict())
    assert rel_err(legacy(inp), off(inp)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg", CFGS, ids=list(CFGS))
@pytest.mark.parametrize("normalizer,legacy", NORMALIZERS, ids=["sim", "mask"])
def test_fused_matches_official(cfg, normalizer, legacy, dtype, device, triton_launches):
    """The fused module (kernels forward and backward) against the official code: output, input gradient and
    every parameter's gradient (f, v, proj, sim_alpha, sim_beta)."""
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 is checked under the interpreter only")
    off, ours, inp = _pair(CFGS[cfg], normalizer, legacy, dtype, ContextCluster)
    _compare(off.to(device), ours.to(device), inp.to(device), TOL[dtype])
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1


def test_return_center_matches_official(device, triton_launches):
    """return_center=True (aggregated centers, no dispatch) with the sim normaliser, float64/float32."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    dims, (B, W, H), alpha, beta = CFGS["fold2x2"]
    cfg = (dims, (B, W, H), alpha, beta)
    off, _, inp = _pair(cfg, "sim", False, dtype)
    off.return_center = True
    ours = ContextCluster(*dims, return_center=True).to(dtype)
    ours.load_state_dict(off.state_dict())
    _compare(off.to(device), ours.to(device), inp.to(device), TOL[dtype])
    assert triton_launches["coc_bwd_kernel"] == 1


@pytest.mark.parametrize("legacy", [False, True], ids=["official-head", "fastseg-mask"])
def test_patch_carries_the_normalizer(legacy, device, triton_launches):
    """fastseg.patch on an official Cluster (no normalizer attribute: current math) builds a "sim"
    ContextCluster; on a fastseg Cluster(normalizer="mask") a "mask" one. Either computes what it replaced."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    dims = CFGS["fold2x2"][0]
    off, ref, inp = _pair(CFGS["fold2x2"], "mask" if legacy else "sim", legacy, dtype)
    original = ref if legacy else off  # the module that gets patched
    model = nn.Sequential(nn.Identity(), copy.deepcopy(original)).to(device)
    model, report = fastseg.patch(model)
    assert report.count("context_cluster") == 1
    new = model[1]
    assert type(new) is ContextCluster and new.normalizer == ("mask" if legacy else "sim")
    assert (new.proposal_w, new.proposal_h) == dims[2:4]
    triton_launches.clear()  # the probe of patch's verification ran the kernels too
    _compare(original.to(device), new, inp.to(device), TOL[dtype])
    assert triton_launches["coc_fwd_kernel"] == 1


def test_bad_normalizer_errors():
    with pytest.raises(ValueError, match="normalizer must be one of"):
        Cluster(4, 4, heads=2, head_dim=4, normalizer="count")
    with pytest.raises(ValueError, match="normalizer must be one of"):
        ContextCluster(4, 4, heads=2, head_dim=4, normalizer=None)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        coc_tiny(normalizer="Sim")
    assert all(m.normalizer == "mask" for m in coc_tiny(fused=True, normalizer="mask").modules()
               if isinstance(m, Cluster))
    assert "normalizer='sim'" in repr(ContextCluster(4, 4, heads=2, head_dim=4))
