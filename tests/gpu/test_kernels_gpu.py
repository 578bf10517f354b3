"""Every kernel family on the GPU, compiled: fp32 / bf16 / fp16, forward and every gradient against the
references in float64 (on the same rounded inputs), fresh random inputs (a new seed per case, never zeros),
CUDA memory poisoned with NaN before each test (``poison.py``), the Triton launches asserted.

Without CUDA (``FASTSEG_GPU_DRYRUN=1``, under TRITON_INTERPRET=1) the same tests run at tiny shapes in fp32 only
(the interpreter has no bf16 GEMM): a check that the tests themselves work, not of the GPU.
"""
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastseg import ops
from fastseg.models.mscan import Mlp
from fastseg.nn import MSCA, ContextCluster, MaskedCrossAttention, MSCANMlp
from fastseg.ops.context_cluster import effective_folds
from fastseg.reference import AttentionModule, Cluster, cluster_core, masked_attention as ref_attention
from fastseg.reference.context_cluster import fold_regions
from helpers import assert_close, rel_err

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
# relative L2 error against the float64 reference on the same (rounded) inputs
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ids = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def big(gpu, cpu):
    """GPU shape, or the tiny dry-run shape."""
    return gpu if CUDA else cpu


def gen(*key) -> torch.Generator:
    """A fresh generator per test case (seeded from its parameters)."""
    return torch.Generator(device=DEV).manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, device=DEV, dtype=torch.float32) * scale).to(dtype)


def _load_rounded(fused, ref, dtype):
    """``fused`` takes ``ref``'s parameters and is cast to ``dtype``; the float64 ``ref`` then holds the same
    rounded weights."""
    fused.load_state_dict(ref.state_dict())
    fused.to(dtype)
    with torch.no_grad():
        for p, pf in zip(ref.parameters(), fused.parameters()):
            p.copy_(pf.double())


def _check_module(fused, ref, x, g):
    """A one-input module ``fused`` on ``x`` against the float64 ``ref`` on ``x.double()``: the output, then the
    gradients of x and of every parameter for one random output gradient, at ``TOL[x.dtype]``. Returns the
    output."""
    tol = TOL[x.dtype]
    x_f, x_r = x.clone().requires_grad_(), x.double().requires_grad_()
    y, y_ref = fused(x_f), ref(x_r)
    assert_close(y, y_ref, tol, "forward")
    grad = randn(y.shape, x.dtype, g)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert_close(x_f.grad, x_r.grad, tol, "d x")
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, tol, f"d {name}")
    return y


def test_poison_fills_new_buffers_with_nan():
    """The fixture works: fresh torch.empty buffers of every size class read as NaN (0xFF bytes)."""
    if not CUDA:
        pytest.skip("poisoning is a CUDA caching-allocator hook")
    for n, dt in ((17, torch.bfloat16), (1000, torch.float16), (3 << 20, torch.float32), (40 << 20, torch.bfloat16)):
        t = torch.empty(n, dtype=dt, device="cuda")
        assert t.isnan().all(), f"{n} x {dt}: {int((~t.isnan()).sum())} elements not poisoned"


# ------------------------------------------------------------------------------------- masked attention
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_masked_attention_op(dtype, density, triton_launches):
    B, H, M, N, D = big((2, 8, 100, 1061, 32), (1, 2, 9, 41, 16))  # N odd: a partial last key tile
    g = gen("attn", dtype, density)
    q, k, v = (randn((B, H, n, D), dtype, g) for n in (M, N, N))
    allowed = torch.rand(B, 1, M, N, generator=g, device=DEV) < density  # shared by the heads, as Mask2Former
    allowed[0, 0, 3] = False  # one query with no allowed key: zero output, zero gradients
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = ops.masked_attention(*leaves, allowed)
    ref = ref_attention(*ref_leaves, allowed, 1.0 / math.sqrt(D), empty_rows="zero")
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    grad = randn(ref.shape, dtype, g)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, TOL[dtype], f"d{name}")
    assert {"masked_attention_fwd", "masked_attention_bwd_dkdv", "masked_attention_bwd_dq"} <= set(triton_launches)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_masked_cross_attention_module(dtype, triton_launches):
    """The drop-in as Mask2Former calls it (seq-first, (B*heads, Q, L) bool mask, True = masked out) against
    nn.MultiheadAttention in float64; every input and parameter gradient."""
    B, Q, L, E, nh = big((2, 100, 64 * 64, 256, 8), (1, 7, 37, 32, 2))
    g = gen("mca", dtype)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device=DEV)))
    ref = torch.nn.MultiheadAttention(E, nh).to(DEV, torch.float64)
    with torch.no_grad():
        ref.in_proj_bias.normal_(0, 0.5)
        ref.out_proj.bias.normal_(0, 0.5)
    fused = MaskedCrossAttention(E, nh).to(DEV)
    _load_rounded(fused, ref, dtype)
    query, key, value = (randn((n, B, E), dtype, g) for n in (Q, L, L))
    allowed = torch.rand(B, Q, L, generator=g, device=DEV) < 0.3
    allowed[..., 0] = True  # no empty row: nn.MultiheadAttention gives NaN there
    mask = (~allowed).repeat_interleave(nh, dim=0)
    xs = [t.clone().requires_grad_() for t in (query, key, value)]
    xs_ref = [t.double().requires_grad_() for t in (query, key, value)]
    out = fused(*xs, attn_mask=mask)[0]
    want = ref(*xs_ref, attn_mask=mask, need_weights=False)[0]
    assert_close(out, want, TOL[dtype], "out")
    grad = randn(want.shape, dtype, g)
    out.backward(grad)
    want.backward(grad.double())
    for name, a, b in zip(("query", "key", "value"), xs, xs_ref):
        assert_close(a.grad, b.grad, TOL[dtype], f"d{name}")
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, TOL[dtype], f"d{name}")
    assert "masked_attention_bwd_dq" in triton_launches


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_mask_from_embeddings(dtype, triton_launches):
    """The sign-and-pack GEMM: bit (q, p) == (mask_embed[q] . features[:, p] >= 0), the float64 logits of the
    same rounded inputs; a bit may differ only where the logit is within rounding of 0."""
    B, Q, C, h, w = big((2, 100, 256, 64, 128), (1, 9, 16, 5, 7))
    g = gen("signpack", dtype)
    emb = randn((B, Q, C), dtype, g)
    feat = randn((B, C, h, w), dtype, g)
    packed = ops.mask_from_embeddings(emb, feat, reset_empty=False)
    assert "attention_mask_sign_pack" in triton_launches
    got = ops.unpack_mask(packed)[:, 0]
    logits = torch.einsum("bqc,bcp->bqp", emb.double(), feat.double().flatten(2))
    want = logits >= 0
    eps = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 5e-2}[dtype] * math.sqrt(C)
    wrong = (got != want) & (logits.abs() > eps)
    assert not wrong.any(), f"{int(wrong.sum())} bits wrong away from 0"


# ------------------------------------------------------------------------------------------------ MSCA
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("path", ["fused", "twopass", "split", "unfused"])
def test_msca(dtype, channels_last, path, triton_launches, monkeypatch):
    from fastseg.kernels import msca as K

    if path != "unfused":  # at this small shape the tiles do not fill the GPU: force the one-kernel forward
        monkeypatch.setattr(K, "FUSED_FWD_MIN_TILES_PER_SM", 0)
    # "fused": the opt-in one-kernel backward (FASTSEG_MSCA_FUSED_BWD=1); "twopass" (the default at C <= 64):
    # ds, then dx_direct / dW3 with the depthwise backward; "split": the fused pointwise + dW3 backward, then the
    # depthwise one
    monkeypatch.setattr(K, "FUSED_BWD_MAX_C", 64 if path == "fused" else 0)
    monkeypatch.setattr(K, "TWOPASS_BWD_MAX_C", 64 if path == "twopass" else 0)
    if path == "unfused":  # the kernels used above 64 channels, at this C
        monkeypatch.setattr(K, "FUSED_FWD_MAX_C", 0)
        monkeypatch.setattr(K, "PW_FUSED_MAX_C", 0)
    N, C, H, W = big((2, 64, 67, 45), (1, 6, 9, 11))
    g = gen("msca", dtype, channels_last)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device=DEV)))
    ref = AttentionModule(C).to(DEV, torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    fused = MSCA(C).to(DEV)
    _load_rounded(fused, ref, dtype)
    x = randn((N, C, H, W), dtype, g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert _check_module(fused, ref, x, g).dtype == dtype
    want = {"fused": {"msca_fused_fwd", "msca_fused_bwd"},
            "twopass": {"msca_fused_fwd", "msca_pw_ds_bwd", "msca_dw_pw_bwd", "msca_bwd_reduce"},
            "split": {"msca_fused_fwd", "msca_pw_w3_bwd", "msca_dw_bwd"},
            "unfused": {"msca_dw_fwd", "msca_pw_fwd", "msca_pw_bwd", "msca_w3_bwd", "msca_dw_bwd"}}[path]
    assert want <= set(triton_launches)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_mscan_mlp_dwconv(dtype, triton_launches):
    N, C, hidden, H, W = big((2, 32, 256, 37, 61), (1, 4, 8, 5, 7))
    g = gen("mlp", dtype)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device=DEV)))
    ref = Mlp(C, hidden).to(DEV, torch.float64)
    fused = MSCANMlp(C, hidden).to(DEV)
    _load_rounded(fused, ref, dtype)
    x = randn((N, C, H, W), dtype, g)
    _check_module(fused, ref, x, g)
    assert {"dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd_dz", "dwconv3x3_gelu_bwd_dx"} <= set(triton_launches)


# ------------------------------------------------------------------------------------- context cluster
MIN_GAP = 2e-5  # the kernels' fp32 similarity vs float64: far below this


def _min_gap(x, alpha, beta, heads, f, p):
    """Smallest best-minus-second-best similarity of any point (float64): near-ties make the hard argmax of
    two correct implementations differ, so inputs with one are redrawn."""
    t = x.double().reshape(x.shape[0] * heads, x.shape[1] // heads, x.shape[2], x.shape[3])
    f2, f3 = effective_folds(f, f)
    if f2 > 1:
        t = fold_regions(t, f2, f3)
    cen = F.adaptive_avg_pool2d(t, (p, p)).flatten(2).transpose(1, 2)
    cos = F.normalize(cen, dim=-1) @ F.normalize(t.flatten(2), dim=1)
    top2 = torch.sigmoid(beta + alpha * cos).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def _cluster_inputs(shape, heads, f, p, dtype, key):
    for k in range(30):
        g = gen(*key, k)
        x, v = randn(shape, dtype, g), randn(shape, dtype, g)
        alpha, beta = 1.0 + torch.rand(1, generator=g, device=DEV).item(), 0.3 * randn((), torch.float32, g).item()
        if _min_gap(x, alpha, beta, heads, f, p) >= MIN_GAP:
            return x, v, alpha, beta
    raise AssertionError("no input without argmax near-ties in 30 draws")


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_context_cluster_op(dtype, triton_launches):
    """The fused op on the same rounded x / value as the float64 reference: output and the gradients of x,
    value, sim_alpha, sim_beta (the backward's precision on the GPU included: fp32 is held to 2e-5)."""
    (B, heads, hd, Hs, Ws), f, p = big(((2, 4, 24, 28, 28), 2, 2), ((1, 2, 8, 6, 6), 2, 2))
    x, v, alpha, beta = _cluster_inputs((B, heads * hd, Hs, Ws), heads, f, p, dtype, ("cc", dtype))
    a, b = torch.tensor([alpha], device=DEV), torch.tensor([beta], device=DEV)
    leaves = [x.clone().requires_grad_(), v.clone().requires_grad_(), a.clone().requires_grad_(),
              b.clone().requires_grad_()]
    ref_leaves = [t.double().requires_grad_() for t in (x, v, a, b)]
    out = ops.context_cluster(*leaves, heads, f, f, p, p)
    ref = cluster_core(*ref_leaves, heads, f, f, p, p)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    grad = randn(ref.shape, dtype, g=gen("ccg", dtype))
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    errs = {n: rel_err(u, w) for n, u, w in zip(("x", "value", "sim_alpha", "sim_beta"), got, want)}
    print(f"context cluster {ids[dtype]} backward relative errors vs float64: "
          + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    for name, u, w in zip(("x", "value", "sim_alpha", "sim_beta"), got, want):
        assert_close(u, w, TOL[dtype], f"d {name}")
    assert triton_launches["coc_fwd_kernel"] >= 1 and triton_launches["coc_bwd_kernel"] >= 1


def test_context_cluster_module_fp32(triton_launches):
    """The drop-in module (f/v convs packed into one, proj) in fp32 against the reference Cluster in float64."""
    B, dim, Hs, Ws, heads, hd, f, p = big((2, 32, 28, 28, 4, 24, 2, 2), (1, 6, 6, 6, 2, 8, 2, 2))
    for k in range(30):
        g = gen("ccm", k)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device=DEV)))
        ref = Cluster(dim, dim, p, p, f, f, heads, hd).to(DEV, torch.float64)
        x = randn((B, dim, Hs, Ws), torch.float32, g)
        with torch.no_grad():
            if _min_gap(ref.f(x.double()), ref.sim_alpha.item(), ref.sim_beta.item(), heads, f, p) >= MIN_GAP:
                break
    fused = ContextCluster(dim, dim, p, p, f, f, heads, hd).to(DEV)
    fused.load_state_dict(ref.state_dict())
    _check_module(fused, ref, x, g)
    assert triton_launches["coc_bwd_kernel"] >= 1


# ------------------------------------------------------------------------------- multi-scale deformable attention
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_ms_deform_attn_op(dtype, triton_launches):
    """The fused op (gather + bilinear + weighted sum; atomics for d value) on the same rounded inputs as the
    float64 official core (grid_sample): output and the gradients of value, locations and weights. Locations
    span [-0.1, 1.1] so some points fall outside the image (they contribute zero)."""
    from fastseg.reference.ms_deform_attn import ms_deform_attn_core_pytorch

    N, Lq, M, D, P, shapes = big((2, 300, 8, 32, 4, [(64, 64), (32, 32), (16, 16)]),
                                 (1, 7, 2, 8, 2, [(5, 6), (3, 2)]))
    g = gen("msda", dtype)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    ss = torch.tensor(shapes, dtype=torch.long, device=DEV)
    start = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    value = randn((N, S, M, D), dtype, g)
    loc = (torch.rand((N, Lq, M, L, P, 2), generator=g, device=DEV) * 1.2 - 0.1).to(dtype)
    attn = torch.softmax(randn((N, Lq, M, L * P), torch.float32, g), -1).view(N, Lq, M, L, P).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref_leaves = [t.double().requires_grad_() for t in (value, loc, attn)]
    out = ops.ms_deform_attn(leaves[0], ss, start, leaves[1], leaves[2])
    ref = ms_deform_attn_core_pytorch(ref_leaves[0], shapes, ref_leaves[1], ref_leaves[2])
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    grad = randn(ref.shape, dtype, g=gen("msdag", dtype))
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, u, w in zip(("value", "sampling_locations", "attention_weights"), got, want):
        assert_close(u, w, TOL[dtype], f"d {name}")
    assert triton_launches["ms_deform_attn_fwd"] >= 1 and triton_launches["ms_deform_attn_bwd"] >= 1


# ------------------------------------------------------------------------- CAC context-aware classifier
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_cac_ops(dtype, triton_launches):
    """CAC's fused ops (soft prototypes, oracle prototypes, both cosine classifiers, entropy distillation) at
    ADE20K's shape on the same rounded inputs as the float64 reference: outputs and every gradient."""
    from fastseg.ops import cac as cac_ops
    from fastseg.reference import cac as R

    B, C, K, H, W = big((2, 512, 150, 64, 64), (1, 12, 7, 5, 9))
    g = gen("cac", dtype)
    f, z, t = randn((B, C, H, W), dtype, g), randn((B, K, H, W), dtype, g, 3.0), randn((B, K, H, W), dtype, g, 2.0)
    q, w = randn((B, K, C), dtype, g), randn((K, C), dtype, g)
    y = torch.randint(0, K, (B, 1, 2 * H, 2 * W), generator=g, device=DEV)
    y[y == 1] = 2  # class 1 absent
    y[:, :, :3] = 255

    def normalized(f, w):
        return torch.einsum("kc,bchw->bkhw", F.normalize(w, 2, -1), F.normalize(f, 2, 1)) * 15

    cases = [("soft prototypes", cac_ops.soft_class_prototypes, R.soft_class_prototypes, (f, z)),
             ("cosine", cac_ops.cosine_logits, R.cosine_logits, (f, q)),
             ("cosine (F.normalize, shared)", lambda f, w: cac_ops.cosine_logits(f, w, clamp=True), normalized, (f, w)),
             ("oracle prototypes", lambda f, w: cac_ops.oracle_class_prototypes(f, y, w),
              lambda f, w: R.oracle_class_prototypes(f, y, w), (f, w)),
             ("distillation", lambda z: cac_ops.entropy_distill_loss(z, t, y),
              lambda z: R.entropy_distill_loss(z, t.double(), y), (z,))]
    for name, fused, ref, inputs in cases:
        leaves = [x.clone().requires_grad_() for x in inputs]
        ref_leaves = [x.double().requires_grad_() for x in inputs]
        out, want = fused(*leaves), ref(*ref_leaves)
        assert_close(out, want, TOL[dtype], f"{name}: out")
        grad = randn(want.shape, torch.float32, gen("cacg", name, dtype))
        got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
        exp = torch.autograd.grad(want, ref_leaves, grad.double())
        for i, (u, e) in enumerate(zip(got, exp)):
            assert_close(u, e, TOL[dtype], f"{name}: d input {i}")
    for k in ("cac_proto_fwd", "cac_proto_bwd", "cac_cos_fwd", "cac_cos_bwd_df", "cac_cos_bwd_dq", "cac_distill_fwd",
              "cac_distill_bwd"):
        assert triton_launches[k] >= 1, k


def test_cac_classifier_module_fp32(triton_launches):
    """fastseg.nn.ContextAwareClassifier in fp32 against the reference block in float64: logits, the training
    loss and every gradient (COCO-Stuff's 171 classes). Tolerance 1e-4: the whole head runs in fp32 (conv_seg,
    projectors, reductions over B·H·W pixels), e.g. proj.2.bias's gradient sums cancelling terms."""
    from fastseg.nn import ContextAwareClassifier
    from fastseg.reference.cac import CACClassifier

    B, C, K, H, W, s = big((2, 512, 171, 64, 64, 8), (1, 12, 7, 5, 9, 2))
    g = gen("cacm")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device=DEV)))
    ref = CACClassifier(C, K, dropout_ratio=0.0).to(DEV, torch.float64)
    fused = ContextAwareClassifier(C, K, dropout_ratio=0.0).to(DEV)
    fused.load_state_dict(ref.state_dict())
    x = randn((B, C, H, W), torch.float32, g)
    y = torch.randint(0, K, (B, 1, H * s, W * s), generator=g, device=DEV)
    y[:, :, :s] = 255
    assert_close(fused(x), ref(x.double()), 1e-4, "logits")
    x_f, x_r = x.clone().requires_grad_(), x.double().requires_grad_()
    lf, lr = fused.forward_train(x_f, y)["loss_ce"], ref.forward_train(x_r, y)["loss_ce"]
    assert abs(lf.item() - lr.item()) <= 1e-4 * abs(lr.item())
    lf.backward()
    lr.backward()
    assert_close(x_f.grad, x_r.grad, 1e-4, "d feat")
    for (name, p_ref), p_f in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p_f.grad, p_ref.grad, 1e-4, f"d {name}")
    assert triton_launches["cac_proto_bwd"] >= 1 and triton_launches["upsample_ce_bwd"] >= 1
