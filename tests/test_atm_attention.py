"""SegViT's ATM attention: the fused kernels (output + head-mean logits, forward and every gradient from
either output) against the PyTorch reference, the drop-in module against the official ``Attention``, and
fastseg.patch recognition. Runs under TRITON_INTERPRET=1 on CPU, compiled on CUDA."""
import pytest
import torch
from helpers import DTYPES_EXACT, EXACT, TOL, assert_close, sm90_rows

import fastseg
from fastseg import _backend, ops
from fastseg.nn import ATMAttention
from fastseg.reference import ATMAttention as ReferenceATMAttention, atm_attention as ref_atm

FWD = {"masked_attention_fwd": 1, "masked_attention_combine": 1, "atm_attention_logits": 1}
BWD = {"masked_attention_bwd_dq": 1, "masked_attention_bwd_dkdv": 1}


def _qkv(B, H, M, N, D, dtype, device, grad=True):
    mk = lambda n: torch.randn(B, H, n, D, dtype=dtype, device=device, requires_grad=grad)  # noqa: E731
    return mk(M), mk(N), mk(N)


def _grads(outs, grads, leaves, which):
    """Gradients of the leaves from ``which`` of (out, logits): "out", "logits" or "both"."""
    pairs = [(o, g) for o, g, w in zip(outs, grads, ("out", "logits")) if which in (w, "both")]
    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, got)]  # logits do not use v


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
@pytest.mark.parametrize("B,H,M,N,D", [(2, 3, 7, 13, 8), (1, 3, 7, 37, 16), (1, 2, 19, 45, 16)])
def test_op_matches_reference(device, triton_launches, dtype, B, H, M, N, D):
    """Odd sizes (several query and key blocks in the last case), gradients from both outputs."""
    q, k, v = _qkv(B, H, M, N, D, dtype, device)
    scale = D ** -0.5
    out, logits = ops.atm_attention(q, k, v, scale)
    assert dict(triton_launches) == FWD, dict(triton_launches)  # the Triton path, 3 launches
    assert logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert logits.shape == (B, M, N) and out.shape == q.shape
    r_out, r_logits = ref_atm(q, k, v, scale)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "out")
    assert_close(logits, r_logits, tol, "logits")
    g = (torch.randn_like(r_out), torch.randn_like(r_logits))
    got = _grads((out, logits), g, (q, k, v), "both")
    assert set(triton_launches) == set(FWD) | set(BWD) and triton_launches["masked_attention_bwd_dq"] == 1
    want = _grads((r_out, r_logits), g, (q, k, v), "both")
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, tol, f"d{name}")


@pytest.mark.parametrize("which", ["out", "logits"])
def test_gradient_from_one_output(device, triton_launches, which):
    """Only one output used: the other's gradient is absent (None), and the result is still exact."""
    q, k, v = _qkv(2, 3, 7, 37, 8, EXACT, device)
    out, logits = ops.atm_attention(q, k, v, 0.3)
    r_out, r_logits = ref_atm(q, k, v, 0.3)
    g = (torch.randn_like(r_out), torch.randn_like(r_logits))
    got = _grads((out, logits), g, (q, k, v), which)
    want = _grads((r_out, r_logits), g, (q, k, v), which)
    assert triton_launches["masked_attention_bwd_dkdv"] == 1
    for name, a, b in zip("qkv", got, want):
        if which == "logits" and name == "v":
            assert a.abs().max() == 0 and b.abs().max() == 0  # logits do not depend on v
            continue
        assert_close(a, b, TOL[EXACT], f"d{name} from {which}")


def test_dropout(device, triton_launches):
    """p = 0 is the plain attention exactly; p > 0 equals the reference with the kernels' keep mask, forward
    and every gradient; the logits are taken before the dropout."""
    B, H, M, N, D = 1, 3, 7, 37, 16
    q, k, v = _qkv(B, H, M, N, D, EXACT, device)
    seed = ops.dropout_seed(device)
    base = ops.atm_attention(q, k, v, 0.25)
    same = ops.atm_attention(q, k, v, 0.25, 0.0, dropout_seed=seed)
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    p = 0.3
    out, logits = ops.atm_attention(q, k, v, 0.25, p, dropout_seed=seed)
    keep = ops.dropout_keep_mask(seed, B, H, M, N, p)
    assert 0.5 < keep.float().mean() < 0.9
    r_out, r_logits = ref_atm(q, k, v, 0.25, keep, p)
    assert_close(out, r_out, TOL[EXACT], "out")
    assert_close(logits, r_logits, TOL[EXACT], "logits")
    assert torch.equal(logits, base[1])  # pre-dropout
    g = (torch.randn_like(r_out), torch.randn_like(r_logits))
    got = _grads((out, logits), g, (q, k, v), "both")
    want = _grads((r_out, r_logits), g, (q, k, v), "both")
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, TOL[EXACT], f"d{name} (dropout)")


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
def test_module_matches_official(device, triton_launches, dtype):
    """fastseg.nn.ATMAttention vs the official Attention: same state_dict; x, logits and the gradients of
    the inputs and of every parameter (q, k, v, proj), from both outputs."""
    torch.manual_seed(0)
    ref = ReferenceATMAttention(24, 3, qkv_bias=True).to(device=device, dtype=dtype)
    mod = ATMAttention.from_module(ref)
    assert mod.state_dict().keys() == ref.state_dict().keys() and mod.scale == ref.scale
    xq = torch.randn(2, 7, 24, dtype=dtype, device=device, requires_grad=True)
    xk = torch.randn(2, 13, 24, dtype=dtype, device=device, requires_grad=True)
    xv = torch.randn(2, 13, 24, dtype=dtype, device=device, requires_grad=True)
    x, logits = mod(xq, xk, xv)
    assert triton_launches["atm_attention_logits"] == 1
    r_x, r_logits = ref(xq, xk, xv)
    tol = TOL[dtype]
    assert x.shape == r_x.shape == (7, 2, 24) and logits.shape == r_logits.shape == (2, 7, 13)
    assert_close(x, r_x, tol, "x")
    assert_close(logits, r_logits, tol, "logits")
    g = (torch.randn_like(r_x), torch.randn_like(r_logits))
    leaves = [xq, xk, xv] + list(mod.parameters())
    r_leaves = [xq, xk, xv] + list(ref.parameters())
    got = _grads((x, logits), g, leaves, "both")
    want = _grads((r_x, r_logits), g, r_leaves, "both")
    names = ["xq", "xk", "xv"] + [n for n, _ in mod.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, tol, f"grad {name}")


def test_module_dropout_training(device, triton_launches):
    """attn_drop > 0 in training: the keep mask comes from the seed drawn per call; eval mode is exact."""
    torch.manual_seed(0)
    ref = ReferenceATMAttention(16, 2, attn_drop=0.5).to(device=device, dtype=EXACT)
    mod = ATMAttention.from_module(ref).train()
    xq, xk = torch.randn(1, 5, 16, dtype=EXACT, device=device), torch.randn(1, 11, 16, dtype=EXACT, device=device)
    torch.manual_seed(3)
    a, la = mod(xq, xk, xk)
    torch.manual_seed(3)
    b, lb = mod(xq, xk, xk)
    c, lc = mod(xq, xk, xk)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(la, lc)  # logits: before the dropout
    mod.eval(), ref.eval()
    assert_close(mod(xq, xk, xk)[0], ref(xq, xk, xk)[0], TOL[EXACT], "eval")


def test_patch_swaps_the_official_attention(device, triton_launches):
    """fastseg.patch recognises the official layer by its structure, probes it and swaps it; a timm-style
    attention (fused qkv) is not recognised."""
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.multihead_attn = ReferenceATMAttention(16, 2, qkv_bias=True, attn_drop=0.1)
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, q, kv):
            x, attn = self.multihead_attn(self.norm(q), kv, kv)
            return x.transpose(0, 1), attn

    model = Layer().to(device=device, dtype=EXACT)
    q, kv = torch.randn(1, 4, 16, dtype=EXACT, device=device), torch.randn(1, 9, 16, dtype=EXACT, device=device)
    model.eval()
    want = model(q, kv)
    model, report = fastseg.patch(model, ops=["atm_attention"])
    assert isinstance(model.multihead_attn, ATMAttention), report
    assert report.probes and all(p.ok for p in report.probes)
    got = model(q, kv)
    assert_close(got[0], want[0], TOL[EXACT], "x")
    assert_close(got[1], want[1], TOL[EXACT], "logits")


def test_torch_path_matches_reference():
    """The plain-PyTorch path (SDPA + one matmul for the logits), forward and gradients."""
    q, k, v = _qkv(2, 3, 7, 13, 8, torch.float64, "cpu")
    with _backend.use_backend("torch"):
        before = sum(_backend.launches.values())
        out, logits = ops.atm_attention(q, k, v, 0.4)
        assert sum(_backend.launches.values()) == before
    r_out, r_logits = ref_atm(q, k, v, 0.4)
    assert_close(out, r_out, 1e-10, "out")
    assert_close(logits, r_logits, 1e-10, "logits")
    g = (torch.randn_like(r_out), torch.randn_like(r_logits))
    for name, a, b in zip("qkv", _grads((out, logits), g, (q, k, v), "both"),
                          _grads((r_out, r_logits), g, (q, k, v), "both")):
        assert_close(a, b, 1e-10, f"d{name}")


def test_bad_input():
    q, k, v = _qkv(1, 2, 5, 9, 8, torch.float32, "cpu", grad=False)
    with pytest.raises(ValueError, match="4-D"):
        ops.atm_attention(q[0], k, v)
    with pytest.raises(ValueError, match="shape mismatch"):
        ops.atm_attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.atm_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="divisible"):
        ATMAttention(10, 3)


def test_torch_compile_and_opcheck(device, triton_launches):
    """torch.compile(fullgraph=True, aot_eager) reaches the kernels through the fastseg:: custom ops: same
    outputs and gradients as eager; torch.library.opcheck of the forward op (schema, fake shapes, autograd)."""
    import importlib

    atm = importlib.import_module("fastseg.ops.atm_attention")  # fastseg.ops re-exports the function's name

    torch._dynamo.reset()
    mod = ReferenceATMAttention(12, 3, qkv_bias=True).to(device=device, dtype=EXACT)
    mod = ATMAttention.from_module(mod)
    xq = torch.randn(1, 5, 12, dtype=EXACT, device=device, requires_grad=True)
    xk = torch.randn(1, 9, 12, dtype=EXACT, device=device, requires_grad=True)

    def run(m):
        x, logits = m(xq, xk, xk)
        loss = x.square().sum() + logits.square().sum()
        return [x, logits] + list(torch.autograd.grad(loss, [xq, xk] + list(mod.parameters())))

    want = run(mod)
    triton_launches.clear()
    got = run(torch.compile(mod, fullgraph=True, backend="aot_eager"))
    assert "atm_attention_logits" in triton_launches and "masked_attention_bwd_dkdv" in triton_launches
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-12, f"compiled {i}")
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 5, 9, 8, EXACT, device)
    torch.library.opcheck(atm._fwd_op, (q, k, v, None, 0.3, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_memprof_analytic_saved_bytes_match_autograd():
    """The bench op's analytic memory model: its ``saved:`` parts are exactly what autograd saves in the
    fused layer's training step, besides what the benchmark's loss saves (its two outputs, in fp32)."""
    if not _backend.interpreter_enabled():
        pytest.skip("the fused path's saved tensors are measured through its kernels (TRITON_INTERPRET=1)")
    from fastseg.bench.measure import saved_for_backward_bytes
    from fastseg.bench.ops import segvit

    s = {**segvit.SHAPE_KEYS, "B": 2, "K": 7, "H": 5, "W": 9, "C": 24, "heads": 3}
    for dtype in (torch.float32, torch.float64):
        prepared = segvit.prep_fastseg(s, dtype, torch.device("cpu"), "fwdbwd")
        got = saved_for_backward_bytes(prepared.forward, prepared.resident)
        saved = sum(v for k, v in segvit.analytic_fused_bytes(s, dtype).items() if k.startswith("saved"))
        loss = (s["K"] * s["B"] * s["C"] + s["B"] * s["K"] * s["H"] * s["W"]) * 4  # x, logits (fp32) squared
        assert got == saved + loss, (dtype, got, saved, loss)


_RULES = r"""
import json
from fastseg.bench import inspect as I
rows = I.inspect_kernels(["atm_attention"], "default", dtypes=["bf16"], sass=False, max_shapes=1,
                         kernel="_atm_logits")
rows += [r for r in I.inspect_kernels(["atm_attention"], "default", dtypes=["bf16"], sass=False, max_shapes=1,
                                      kernel="_fwd_kernel")]
print(json.dumps(rows))
"""


def test_sm90_forward_resources_bf16():
    """The ATM forward kernel compiled for sm_90 (child process, no interpreter) at the ViT-B 512² shape,
    with and without dropout, every config the autotuner can pick: no spill, shared memory fits, wgmma."""
    from fastseg.bench import inspect as I

    rows = sm90_rows(_RULES)
    assert {r["kernel"] for r in rows} == {"_atm_logits_kernel", "_fwd_kernel"}, rows
    assert I.violations(rows) == []
    assert all(r["spill_bytes"] == 0 and r["wgmma"] > 0 for r in rows), rows


def test_patch_segvit_model(device, triton_launches):
    """fastseg.patch on a (tiny) SegViT model swaps every ATM decoder layer's multihead_attn (probe-verified);
    the segmentation output is unchanged."""
    from fastseg.models import build_segvit

    torch.manual_seed(0)
    model = build_segvit("t", num_classes=5, img_size=64, num_layers=4, out_indices=[1, 3]).to(device, EXACT).eval()
    x = torch.randn(1, 3, 64, 64, dtype=EXACT, device=device)
    with torch.no_grad():
        want = model(x)
    model, report = fastseg.patch(model, ops=["atm_attention"])
    swapped = [n for n, m in model.named_modules() if isinstance(m, ATMAttention)]
    assert len(swapped) == 6 and all(n.endswith("multihead_attn") for n in swapped), report
    triton_launches.clear()
    with torch.no_grad():
        got = model(x)
    assert triton_launches["atm_attention_logits"] == 6
    assert_close(got, want, TOL[EXACT], "segvit output")
