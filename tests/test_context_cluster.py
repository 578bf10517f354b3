"""fastseg.nn.ContextCluster / fastseg.ops.context_cluster (Triton) against the reference Cluster.

The hard argmax makes the output piecewise: where a point is (nearly) equally similar to two centers, two
correct implementations that round differently may assign it differently. Every input here is therefore
checked (in float64, with the reference math) to have a gap of at least ``MIN_GAP`` between the best and the
second-best sigmoid similarity of every point, and redrawn with the next seed otherwise (``_draw``); the
exact-tie test builds exact ties on purpose, to check the first-index rule of ``torch.argmax``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastseg.nn import ContextCluster
from fastseg.ops import context_cluster
from fastseg.ops.context_cluster import effective_folds
from fastseg.reference import Cluster, cluster_core
from fastseg.reference.context_cluster import fold_regions
from helpers import TOL, assert_close, rel_err

MIN_GAP = 1e-4




def _argmax_gap(xf, alpha, beta, heads, fold_w, fold_h, pw, ph):
    """Smallest (best - second best) sigmoid similarity over all points, in float64."""
    xf = xf.detach().double().cpu()
    B, EC, W, H = xf.shape
    t = xf.reshape(B * heads, EC // heads, W, H)
    f2, f3 = effective_folds(fold_w, fold_h)
    if f2 > 1:
        t = fold_regions(t, f2, f3)
    if pw * ph == 1:
        return float("inf")
    cen = F.adaptive_avg_pool2d(t, (pw, ph)).flatten(2).transpose(1, 2)
    pts = t.flatten(2).transpose(1, 2)
    cos = F.normalize(cen, dim=-1) @ F.normalize(pts, dim=-1).transpose(1, 2)
    sim = torch.sigmoid(float(beta) + float(alpha) * cos)
    top2 = sim.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def _draw(make, gap_of, seed=0, tries=20):
    """make(generator) -> inputs; redraw until gap_of(inputs) >= MIN_GAP (deterministic sequence of seeds)."""
    for k in range(tries):
        gen = torch.Generator().manual_seed(seed + k)
        inputs = make(gen)
        if gap_of(inputs) >= MIN_GAP:
            return inputs
    raise AssertionError("could not draw an input without near-ties in the argmax")


def _modules(cfg, dtype, device, alpha, beta):
    dim, out_dim, pw, ph, fw, fh, heads, hd, rc = cfg
    ref = Cluster(dim, out_dim, pw, ph, fw, fh, heads, hd, rc)
    with torch.no_grad():
        ref.sim_alpha.fill_(alpha)
        ref.sim_beta.fill_(beta)
    fused = ContextCluster(dim, out_dim, pw, ph, fw, fh, heads, hd, rc)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device, dtype), fused.to(device, dtype)


# (dim, out_dim, proposal_w, proposal_h, fold_w, fold_h, heads, head_dim, return_center), input (B, W, H),
# alpha, beta
CASES = [
    # folded, non-square regions (4x3) and proposals (2x3), tiny head_dim (padded to 16)
    ((8, 10, 2, 3, 2, 3, 2, 5, False), (2, 8, 9), 1.0, 0.0),
    # no fold, odd map 7x11 (N = 77: several BLOCK_N chunks), proposals 3x2 with uneven adaptive bins
    ((6, 7, 3, 2, 1, 1, 2, 20, False), (1, 7, 11), 1.7, 0.3),
    # fold_w > 1 but fold_h == 1: the original does not fold at all
    ((6, 6, 2, 2, 2, 1, 1, 24, False), (1, 6, 5), -2.0, 0.5),
    # return_center, folded (3x2 regions of 3x4), proposals 2x3
    ((5, 9, 2, 3, 3, 2, 3, 8, True), (1, 9, 8), 1.2, -0.4),
    # proposals larger than the region (4x3 bins on a 3x4 region: overlapping adaptive bins), head_dim 40
    ((4, 6, 4, 3, 2, 2, 2, 40, False), (1, 6, 8), 3.0, 0.0),
    # two centers per region (proposals 1x2), 3 heads of 16
    ((6, 5, 1, 2, 2, 2, 3, 16, False), (1, 4, 6), 1.0, 0.2),
    # coc_tiny-like stage: head_dim 24, 4 heads, 2x2 proposals on 5x5 regions
    ((16, 16, 2, 2, 2, 2, 4, 24, False), (1, 10, 10), 1.0, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_module_matches_reference(case, dtype, device, triton_launches):
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 is checked under the interpreter only")
    cfg, (B, W, H), alpha, beta = case
    ref, fused = _modules(cfg, dtype, device, alpha, beta)
    dim, heads, (pw, ph, fw, fh) = cfg[0], cfg[6], cfg[2:6]

    def make(gen):
        return torch.randn(B, dim, W, H, generator=gen, dtype=torch.float64).to(device, dtype)

    inp = _draw(make, lambda t: _argmax_gap(ref.f(t), alpha, beta, heads, fw, fh, pw, ph))
    x_ref = inp.clone().requires_grad_()
    x_fus = inp.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_fus = fused(x_fus)
    tol = TOL[dtype]
    assert_close(y_fus, y_ref, tol, "out")
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    (y_ref * g).sum().backward()
    (y_fus * g).sum().backward()
    assert_close(x_fus.grad, x_ref.grad, tol, "d input")
    for (name, p_ref), p_fus in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p_fus.grad, p_ref.grad, tol, f"d {name}")
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1


def test_op_gradients_through_pooling(device, triton_launches):
    """The op alone on hand-made features: gradients to x and value include the center-pooling paths."""
    heads, fw, fh, pw, ph = 2, 2, 2, 2, 2
    alpha, beta = torch.tensor([1.5], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)

    def make(gen):
        return (torch.randn(1, 2 * 12, 6, 8, generator=gen, dtype=torch.float64),
                torch.randn(1, 2 * 12, 6, 8, generator=gen, dtype=torch.float64))

    x, v = _draw(make, lambda t: _argmax_gap(t[0], alpha, beta, heads, fw, fh, pw, ph), seed=10)
    dtype = torch.float64 if device == "cpu" else torch.float32
    leaves_ref = [t.to(device, dtype).requires_grad_() for t in (x, v, alpha, beta)]
    leaves_fus = [t.to(device, dtype).requires_grad_() for t in (x, v, alpha, beta)]
    y_ref = cluster_core(*leaves_ref, heads, fw, fh, pw, ph)
    y_fus = context_cluster(*leaves_fus, heads, fw, fh, pw, ph)
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, g)
    grads_fus = torch.autograd.grad(y_fus, leaves_fus, g)
    for name, a, b in zip(("x", "value", "alpha", "beta"), grads_fus, grads_ref):
        assert_close(a, b, TOL[dtype], f"d {name}")
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1


def test_exact_ties_pick_the_first_center(device, triton_launches):
    """Regions of identical points: all centers are equal, every point ties, torch.argmax picks center 0."""
    x = torch.randn(1, 8, 1, 1, dtype=torch.float64).expand(1, 8, 4, 6).contiguous()
    v = torch.randn(1, 8, 4, 6, dtype=torch.float64)
    x, v = x.to(device), v.to(device)
    alpha, beta = torch.ones(1, dtype=torch.float64, device=device), torch.zeros(1, dtype=torch.float64, device=device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    args = [t.to(dtype) for t in (x, v, alpha, beta)]
    y_ref = cluster_core(*args, 2, 2, 2, 2, 3)
    y_fus = context_cluster(*args, 2, 2, 2, 2, 3)
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    assert triton_launches["coc_fwd_kernel"] == 1


@pytest.mark.parametrize("region,dup", [((2, 2), (1, 3)), ((3, 4), (5, 9))], ids=["M4", "M12-dot"])
def test_ties_between_later_centers_pick_the_first(region, dup, device, triton_launches):
    """Proposals = region size, so every center is one point; points dup[0] and dup[1] are equal, so each of
    the two ties between centers dup[0] and dup[1] (not center 0) and must go to dup[0], as torch.max does.
    A last-index rule would move both to dup[1] and change the aggregated centers."""
    (r2, r3), (i, j) = region, dup
    dtype = torch.float64 if device == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, r2 * r3, generator=gen, dtype=torch.float64)
    x[:, :, j] = x[:, :, i]
    x = x.reshape(1, 8, r2, r3).to(device, dtype)
    v = torch.randn(1, 8, r2, r3, generator=gen, dtype=torch.float64).to(device, dtype)
    alpha, beta = torch.ones(1, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
    y_ref = cluster_core(x, v, alpha, beta, 1, 1, 1, r2, r3)
    y_fus = context_cluster(x, v, alpha, beta, 1, 1, 1, r2, r3)
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    assert triton_launches["coc_fwd_kernel"] == 1


def test_one_row_map_with_unusual_size1_stride(device, triton_launches):
    """A [B, C, 1, W] map made by a transpose is 'contiguous' for torch with a non-standard stride on its size-1
    dim; the op must accept it (it used to raise) and match the reference, gradients included."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(5)
    x, v = (torch.randn(2, 8, 7, 1, generator=gen, dtype=torch.float64).to(device, dtype).transpose(2, 3)
            .requires_grad_() for _ in range(2))
    assert x.is_contiguous() and x.stride(2) != x.shape[3]
    alpha, beta = torch.tensor([1.3], dtype=dtype, device=device), torch.tensor([0.1], dtype=dtype, device=device)
    assert _argmax_gap(x, alpha, beta, 2, 1, 1, 1, 3) >= MIN_GAP
    y_ref = cluster_core(x, v, alpha, beta, 2, 1, 1, 1, 3)
    y_fus = context_cluster(x, v, alpha, beta, 2, 1, 1, 1, 3)
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    g = torch.randn_like(y_ref)
    for name, a, b in zip(("x", "value"), torch.autograd.grad(y_fus, (x, v), g), torch.autograd.grad(y_ref, (x, v), g)):
        assert_close(a, b, TOL[dtype], f"d {name}")
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1


def test_nan_input_propagates_like_the_reference(device, triton_launches):
    """A NaN point poisons its region's centers: torch.max then takes the first NaN similarity as the max. The
    kernel must give NaN exactly where the reference does (and never index a center past M)."""
    from fastseg.kernels import context_cluster as K

    dtype = torch.float64 if device == "cpu" else torch.float32
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    x[0, 5, 3, 3] = float("nan")  # head 1, region (1, 1)
    x, v = x.to(device, dtype), torch.randn(1, 8, 4, 4, dtype=torch.float64).to(device, dtype)
    alpha, beta = torch.ones(1, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
    y_ref = cluster_core(x, v, alpha, beta, 2, 2, 2, 2, 2)
    y_fus = context_cluster(x, v, alpha, beta, 2, 2, 2, 2, 2)
    assert y_ref.isnan().any() and not y_ref.isnan().all()
    assert torch.equal(y_fus.isnan(), y_ref.isnan())
    assert_close(y_fus.nan_to_num(), y_ref.nan_to_num(), TOL[dtype], "finite part")
    _, (assign, *_rest) = K.cluster_forward(x, v, alpha, beta, 2, (2, 2), (2, 2), False)
    assert int(assign.min()) >= 0 and int(assign.max()) < 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, device, triton_launches):
    """Half inputs (fp32 accumulation) against the reference in float32 on the same rounded inputs."""
    heads, fw, fh, pw, ph = 2, 2, 2, 2, 2
    alpha, beta = torch.tensor([1.0]), torch.tensor([0.0])

    def make(gen):
        return (torch.randn(1, 2 * 16, 6, 6, generator=gen).to(dtype).float(),
                torch.randn(1, 2 * 16, 6, 6, generator=gen).to(dtype).float())

    x, v = _draw(make, lambda t: _argmax_gap(t[0], alpha, beta, heads, fw, fh, pw, ph), seed=20)
    leaves_ref = [t.to(device).requires_grad_() for t in (x, v, alpha, beta)]
    leaves_fus = [t.to(device, dtype).requires_grad_() for t in (x, v)] + [
        t.to(device).requires_grad_() for t in (alpha, beta)]
    y_ref = cluster_core(*leaves_ref, heads, fw, fh, pw, ph)
    y_fus = context_cluster(*leaves_fus, heads, fw, fh, pw, ph)
    assert y_fus.dtype == dtype
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    g = torch.randn_like(y_ref).to(dtype)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, g.float())
    grads_fus = torch.autograd.grad(y_fus, leaves_fus, g)
    for name, a, b in zip(("x", "value", "alpha", "beta"), grads_fus, grads_ref):
        assert a.dtype == leaves_fus[("x", "value", "alpha", "beta").index(name)].dtype
        assert_close(a.float(), b, TOL[dtype], f"d {name}")
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1


def test_bad_input_errors(device):
    m = ContextCluster(4, 4, fold_w=2, fold_h=2, heads=2, head_dim=4).to(device)
    with pytest.raises(ValueError, match="cannot be divided by the fold 2\\*2"):
        m(torch.randn(1, 4, 5, 6, device=device))
    x = torch.randn(1, 6, 4, 4, device=device)
    with pytest.raises(ValueError, match="cannot be split into 4 heads"):
        context_cluster(x, x, torch.ones(1, device=device), torch.zeros(1, device=device), heads=4)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        context_cluster(x, x, torch.ones(1, device=device), torch.zeros(1, device=device), heads=0)
    with pytest.raises(ValueError, match="proposal sizes must be >= 1"):
        context_cluster(x, x, torch.ones(1, device=device), torch.zeros(1, device=device), heads=2, proposal_w=0)
    with pytest.raises(ValueError, match="must both be"):
        context_cluster(x, x[:, :4], torch.ones(1, device=device), torch.zeros(1, device=device), heads=2)


def test_state_dict_matches_original_layout():
    ref = Cluster(8, 12, 3, 2, 2, 2, 4, 6)
    fused = ContextCluster(8, 12, 3, 2, 2, 2, 4, 6)
    assert list(ref.state_dict().keys()) == list(fused.state_dict().keys())
    assert all(ref.state_dict()[k].shape == fused.state_dict()[k].shape for k in ref.state_dict())
    assert fused.sim_alpha.item() == 1.0 and fused.sim_beta.item() == 0.0


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["loop-M6", "dot-M12"])
def test_mask_normalizer_matches_reference(case, device, triton_launches):
    """normalizer="mask" (the official code before 2023-05-31) on the loop path and the tl.dot path: forward,
    input and every parameter gradient against the reference with the same normaliser."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    cfg, (B, W, H), alpha, beta = case
    dim, out_dim, pw, ph, fw, fh, heads, hd, rc = cfg
    ref = Cluster(dim, out_dim, pw, ph, fw, fh, heads, hd, rc, normalizer="mask")
    with torch.no_grad():
        ref.sim_alpha.fill_(alpha)
        ref.sim_beta.fill_(beta)
    fused = ContextCluster(dim, out_dim, pw, ph, fw, fh, heads, hd, rc, normalizer="mask")
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(device, dtype), fused.to(device, dtype)
    inp = _draw(lambda gen: torch.randn(B, dim, W, H, generator=gen, dtype=torch.float64).to(device, dtype),
                lambda t: _argmax_gap(ref.f(t), alpha, beta, heads, fw, fh, pw, ph))
    x_ref, x_fus = inp.clone().requires_grad_(), inp.clone().requires_grad_()
    y_ref, y_fus = ref(x_ref), fused(x_fus)
    assert_close(y_fus, y_ref, TOL[dtype], "out")
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_fus * g).sum().backward()
    assert_close(x_fus.grad, x_ref.grad, TOL[dtype], "d input")
    for (name, p_ref), p_fus in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p_fus.grad, p_ref.grad, TOL[dtype], f"d {name}")
    # the two normalisers really differ on this input
    sim_ref = Cluster(dim, out_dim, pw, ph, fw, fh, heads, hd, rc).to(device, dtype)
    sim_ref.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert rel_err(sim_ref(inp), y_ref) > 1e-3
    assert triton_launches["coc_fwd_kernel"] == 1 and triton_launches["coc_bwd_kernel"] == 1
