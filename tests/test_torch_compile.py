"""torch.compile(fullgraph=True) of the fused drop-ins: no graph break, same forward and gradients as eager.

Under the interpreter (the default here, see conftest) the compiled graph reaches the Triton kernels through the
``fastseg::`` torch.library custom ops (checked on the launch counter); with ``use_backend("torch")`` it traces
the plain PyTorch path. ``aot_eager`` traces forward and backward (fake tensors, functionalisation) without
Inductor's code generation, so it is cheap on CPU.
"""
import importlib

import pytest
import torch

import fastseg
from fastseg import _backend
from fastseg.nn import MSCA, ContextCluster, MSCANMlp, MSDeformAttn

from helpers import assert_close

F64 = torch.float64
BACKENDS = ["auto", pytest.param("torch", id="torch-path")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(mod, inputs, y):
    return [t.grad for t in inputs] + [p.grad for p in mod.parameters()]


def _compare(mod, inputs, backend, kernels):
    """Eager vs torch.compile(fullgraph=True, backend="aot_eager"): output and every gradient."""
    with fastseg.use_backend(backend):
        y = mod(*inputs)
        y.square().sum().backward()
        want = [g.clone() for g in _grads(mod, inputs, y)]
        for t in inputs:
            t.grad = None
        mod.zero_grad()
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
        _backend.launches.clear()
        out = compiled(*inputs)
        out.square().sum().backward()
    assert_close(out, y, 1e-12, "compiled output")
    for i, (g, w) in enumerate(zip(_grads(mod, inputs, out), want)):
        assert g is not None, f"gradient {i} missing"
        assert_close(g, w, 1e-12, f"compiled gradient {i}")
    ran = set(_backend.launches)
    if backend == "auto" and _backend.interpreter_enabled():
        assert kernels <= ran, f"kernels {kernels - ran} did not run"
    else:
        assert not ran, f"the torch path launched {ran}"


def _leaf(*shape, channels_last=False):
    x = torch.randn(*shape, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_msca(backend, channels_last):
    mod = MSCA(3).to(F64)
    _compare(mod, (_leaf(2, 3, 5, 7, channels_last=channels_last),), backend,
             {"msca_fused_fwd", "msca_pw_ds_bwd", "msca_dw_pw_bwd"})  # C <= 64: the fused / two-pass kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_mscan_mlp(backend, channels_last):
    mod = MSCANMlp(3, 5).to(F64)
    _compare(mod, (_leaf(2, 3, 5, 7, channels_last=channels_last),), backend,
             {"dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd_dz", "dwconv3x3_gelu_bwd_dx"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(return_center=True, proposal_w=3, proposal_h=1, normalizer="mask")],
                         ids=["default", "center-mask"])
def test_context_cluster(backend, kw):
    mod = ContextCluster(5, 6, heads=2, head_dim=3, **kw).to(F64)
    with torch.no_grad():
        mod.sim_alpha.fill_(1.3)
        mod.sim_beta.fill_(0.2)
    _compare(mod, (_leaf(2, 5, 6, 8),), backend, {"coc_fwd_kernel", "coc_bwd_kernel"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("boxes", [False, True], ids=["fused-offsets", "locations"])
def test_ms_deform_attn(backend, boxes):
    # the torch path: the official core's per-level copies + cat made aot_eager's backward fail ("view size is not
    # compatible"); fastseg's torch path lays value out once (fastseg.ops.ms_deform_attn._torch_core)
    if backend == "auto" and not _backend.interpreter_enabled():
        pytest.skip("the kernels need TRITON_INTERPRET=1 on CPU")
    C, L, M, P = 8, 2, 2, 2
    mod = MSDeformAttn(C, L, M, P).to(F64)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
    shapes = torch.tensor([[3, 4], [2, 3]])
    q, refs, inp = _leaf(2, 5, C), torch.rand(2, 5, L, 4 if boxes else 2, dtype=F64).requires_grad_(), _leaf(2, 18, C)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mod

        def forward(self, q, refs, inp):
            return self.m(q, refs, inp, shapes)

    _compare(Wrap(), (q, refs, inp), backend, {"ms_deform_attn_fwd", "ms_deform_attn_bwd"})


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake (meta) shapes/strides vs the real kernels, autograd registration."""
    if not _backend.interpreter_enabled():
        pytest.skip("the kernels need TRITON_INTERPRET=1 on CPU")
    # (fastseg.ops re-exports functions under the modules' names)
    cc, md, ms, da = (importlib.import_module(f"fastseg.ops.{n}")
                      for n in ("context_cluster", "mlp_dwconv", "msca", "ms_deform_attn"))

    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    x = _leaf(1, 3, 4, 5, channels_last=True)
    m = MSCA(3).to(F64)
    dw = [getattr(m, n).weight for n in ms.DW_NAMES] + [getattr(m, n).bias for n in ms.DW_NAMES]
    torch.library.opcheck(ms._fwd_op, (x, m.conv3.weight, m.conv3.bias, dw), test_utils=tests)
    conv = torch.nn.Conv2d(3, 3, 3, groups=3).to(F64)
    torch.library.opcheck(md._fwd_op, (x, conv.weight, conv.bias), test_utils=tests)
    a, b = torch.ones(1, dtype=F64, requires_grad=True), torch.zeros(1, dtype=F64, requires_grad=True)
    xv = _leaf(1, 8, 4, 4)
    torch.library.opcheck(cc._fwd_op, (xv, None, a, b, 2, 2, 2, 2, 2, False, "sim"), test_utils=tests)
    torch.library.opcheck(cc._fwd_op, (xv[:, :4].detach().requires_grad_(), xv[:, 4:].detach().requires_grad_(), a,
                                       b, 2, 2, 2, 2, 2, True, "mask"), test_utils=tests)
    shapes, starts = torch.tensor([[3, 4], [2, 3]]), torch.tensor([0, 12])
    value, locs, w = _leaf(1, 18, 2, 4), torch.rand(1, 3, 2, 2, 2, 2, dtype=F64).requires_grad_(), _leaf(1, 3, 2, 2, 2)
    torch.library.opcheck(da._fwd_op, (value, shapes, starts, locs, w, None), test_utils=tests)
    refs = torch.rand(1, 3, 2, 2, dtype=F64).requires_grad_()
    torch.library.opcheck(da._fwd_op, (value, shapes, starts, _leaf(1, 3, 2, 2, 2, 2), w, refs), test_utils=tests)


@pytest.mark.parametrize("name", ["segnext", "coc", "mask2former"])
def test_patched_model_compiles_fullgraph(name):
    """A whole patched model (the convergence tests' small ones) under torch.compile(fullgraph=True): inference
    for all three, and a training step (forward + backward) for SegNeXt and CoC (Mask2Former's training loss runs
    scipy's Hungarian matching, a graph break by nature). Same numbers as eager."""
    from fastseg.bench.convergence import build, synthetic_batch

    dtype = torch.float32 if name == "segnext" else F64  # the Ham head's NMF is float32-only (as the original)
    model = build(name, 4, "ci").to(dtype)
    model, report = fastseg.patch(model, verify=False)
    assert report.count() > 0
    x, _ = synthetic_batch(2, 16 if name == "segnext" else 32, 4, torch.Generator().manual_seed(0), dtype)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tol = 1e-5 if dtype == torch.float32 else 1e-12

    def run(m, train):
        m.train(train)
        torch.manual_seed(0)  # the Ham head draws random NMF bases every call
        with torch.set_grad_enabled(train):
            out = m(x)
        out = out["pred_masks"] if isinstance(out, dict) else out
        if not train:
            return out, []
        model.zero_grad()
        out.square().mean().backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for train in ([False] if name == "mask2former" else [False, True]):
        want, gw = run(model, train)
        got, gg = run(compiled, train)
        assert_close(got, want, tol, f"{name} output (train={train})")
        assert len(gg) == len(gw)
        if gw:  # one relative error over all gradients: a conv bias followed by BatchNorm has a ~0 gradient
            assert_close(torch.cat([g.flatten() for g in gg]), torch.cat([g.flatten() for g in gw]), tol * 10,
                         f"{name} gradients")


def test_mask_losses_compile_and_opcheck(triton_launches):
    """MaskFormer's fused mask losses (the logits variant) under torch.compile(fullgraph=True): the custom ops,
    same losses and gradient as eager; and torch.library.opcheck of the forward op."""
    if not _backend.interpreter_enabled():
        pytest.skip("the kernels need TRITON_INTERPRET=1 on CPU")
    from fastseg.ops import mask_loss as ml

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, dtype=F64, generator=g).requires_grad_()
    targets = torch.rand(3, 17, 22, generator=g) > 0.5

    def f(x):
        focal, dice = ml.mask_losses(x, targets, 2.0)
        return focal + 2 * dice

    want = f(logits)
    (gw,) = torch.autograd.grad(want, logits)
    triton_launches.clear()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits)
    (gg,) = torch.autograd.grad(got, logits)
    assert_close(got, want, 1e-12, "compiled mask losses")
    assert_close(gg, gw, 1e-12, "compiled gradient")
    assert triton_launches["mask_loss_fwd"] >= 1 and triton_launches["mask_loss_bwd"] >= 1
    rows = torch.arange(3)
    torch.library.opcheck(ml._sums_fwd_op, (logits, targets, rows, 0.25, 2.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
