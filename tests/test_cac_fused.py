"""CAC's fused classifier (kernels/cac.py, fastseg.ops.cac, fastseg.nn.ContextAwareClassifier, the cac record)
against the plain-PyTorch reference (fastseg.reference.cac): forward and every gradient, under TRITON_INTERPRET=1
on CPU (or on CUDA), odd sizes, ignored pixels, absent classes; the launch counter proves the kernels ran."""
import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.models import CACSegmentor, FCNHeadCAC, LightHamHeadCAC
from fastseg.nn import ContextAwareClassifier
from fastseg.ops import cac as ops
from fastseg.reference import cac as ref

from helpers import DTYPES_EXACT, TOL, assert_close, sm90_rows

B, C, K, H, W = 2, 12, 7, 5, 9  # odd sizes: K = 7 classes, C = 12 channels, 5 x 9 pixels


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4


def _labels(b=B, h=2 * H, w=2 * W, k=K, absent=(3,), ignored_rows=3, seed=0):
    """(b, 1, h, w) labels with ``absent`` classes never used and the first rows ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b, 1, h, w), generator=g)
    for a in absent:
        y[y == a] = (a + 1) % k
    y[:, :, :ignored_rows] = 255
    return y


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
def test_soft_prototypes(device, dtype, triton_launches):
    f = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=True)
    z0 = 3 * torch.randn(B, H, W, K, device=device, dtype=dtype)
    z = z0.permute(0, 3, 1, 2).detach().requires_grad_()  # strided (channels-last) logits
    p = ops.soft_class_prototypes(f, z)
    assert triton_launches["cac_proto_fwd"] == 1
    g = torch.randn_like(p)
    got = _grads(p, (f, z), g)
    assert triton_launches["cac_proto_bwd"] == 1
    exp_p = ref.soft_class_prototypes(f, z)
    exp = _grads(exp_p, (f, z), g)
    assert_close(p, exp_p, _tol(dtype), "proto")
    for n, a, b in zip(("feat", "logits"), got, exp):
        assert_close(a, b, _tol(dtype), f"grad {n}")


def test_soft_prototypes_many_classes(device, triton_launches):
    """K = 171 (COCO-Stuff): the class tile is padded to 256."""
    f = torch.randn(1, 16, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 171, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    p = ops.soft_class_prototypes(f, z)
    g = torch.randn_like(p)
    got = _grads(p, (f, z), g)
    exp_p = ref.soft_class_prototypes(f, z)
    exp = _grads(exp_p, (f, z), g)
    assert triton_launches["cac_proto_fwd"] == 1 and triton_launches["cac_proto_bwd"] == 1
    assert_close(p, exp_p, 1e-10, "proto")
    for a, b in zip(got, exp):
        assert_close(a, b, 1e-10, "grad")


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
@pytest.mark.parametrize("shared,clamp,eps", [(False, False, 1e-12), (True, True, 1e-12), (False, False, 0.0),
                                              (True, False, 1e-12), (False, True, 1e-12)])
def test_cosine_logits(device, dtype, shared, clamp, eps, triton_launches):
    f = torch.randn(B, C, H, W, device=device, dtype=dtype)
    if not clamp and eps > 0:  # an all-zero pixel: defined (the gradient of its norm is 0, as torch's)
        f[0, :, 1, 2] = 0
    f.requires_grad_()
    q = torch.randn(*(() if shared else (B,)), K, C, device=device, dtype=dtype, requires_grad=True)
    out = ops.cosine_logits(f, q, 15.0, eps, clamp)
    assert triton_launches["cac_cos_fwd"] == 1
    g = torch.randn_like(out)
    got = _grads(out, (f, q), g)
    assert triton_launches["cac_cos_bwd_df"] == 1 and triton_launches["cac_cos_bwd_dq"] == 1
    if clamp:  # get_adaptive_perspective: F.normalize on both sides
        exp_o = torch.einsum("kc,bchw->bkhw" if shared else "bkc,bchw->bkhw", F.normalize(q, 2, -1),
                             F.normalize(f, 2, 1)) * 15
    else:
        exp_o = ref.cosine_logits(f, q, 15.0, eps)
    exp = _grads(exp_o, (f, q), g)
    assert_close(out, exp_o, _tol(dtype), "logits")
    for n, a, b in zip(("feat", "proto"), got, exp):
        assert_close(a, b, _tol(dtype), f"grad {n}")


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
def test_oracle_prototypes(device, dtype, triton_launches):
    f = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(K, C, device=device, dtype=dtype, requires_grad=True)
    y = _labels(absent=(3, 5)).to(device)
    got_t = ops.oracle_class_prototypes(f, y, w)
    g = torch.randn_like(got_t)
    got = _grads(got_t, (f, w), g)
    assert triton_launches["cac_proto_fwd"] == 1 and triton_launches["cac_proto_bwd"] == 1
    exp_t = ref.oracle_class_prototypes(f, y, w)
    exp = _grads(exp_t, (f, w), g)
    assert_close(got_t, exp_t, _tol(dtype), "table")
    assert torch.equal(got_t[3], w[3]) and torch.equal(got_t[5], w[5])  # absent classes: the weights
    for n, a, b in zip(("feat", "weight"), got, exp):
        assert_close(a, b, _tol(dtype), f"grad {n}")


@pytest.mark.parametrize("dtype", DTYPES_EXACT + [torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_entropy_distill_loss(device, dtype, eps, triton_launches):
    """bf16 too: no dot in these kernels (the statistics are float32, as the reference's)."""
    pred = torch.randn(B, K, H, W, device=device, dtype=dtype, requires_grad=True)
    teacher = (2 * torch.randn(B, K, H, W, device=device)).to(dtype)
    y = _labels(absent=(2,)).to(device)
    loss = ops.entropy_distill_loss(pred, teacher, y, 0.5, 255, eps)
    assert triton_launches["cac_distill_fwd"] == 1
    (got,) = torch.autograd.grad(loss, pred)
    assert triton_launches["cac_distill_bwd"] == 1
    exp_l = ref.entropy_distill_loss(pred, teacher, y, 0.5, 255, eps)
    (exp,) = torch.autograd.grad(exp_l, pred)
    tol = TOL[dtype] if dtype == torch.bfloat16 else _tol(dtype)
    assert loss.dtype == exp_l.dtype
    assert abs(loss.item() - exp_l.item()) <= tol * abs(exp_l.item()), (loss.item(), exp_l.item())
    assert_close(got, exp.to(got.dtype), tol, "grad pred")
    assert got[:, :, :1].abs().max() == 0  # the ignored rows (labels rows 0-2 -> feature row 0)


def test_distill_without_labelled_pixels(device, triton_launches):
    pred = torch.randn(1, K, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.full((1, 3, 4), 255, dtype=torch.long, device=device)
    loss = ops.entropy_distill_loss(pred, torch.randn_like(pred), y)
    assert loss.item() == 0 and triton_launches["cac_distill_fwd"] == 1
    (g,) = torch.autograd.grad(loss, pred)
    assert g.abs().max() == 0


def test_bad_inputs(device):
    f = torch.randn(1, C, 3, 4, device=device)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.soft_class_prototypes(f, torch.randn(1, K, 3, 4, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not match"):
        ops.soft_class_prototypes(f, torch.randn(1, K, 3, 5, device=device))
    with pytest.raises(NotImplementedError, match="K <= 256"):
        ops.soft_class_prototypes(f, torch.randn(1, 300, 3, 4, device=device))
    with pytest.raises(ValueError, match=r"must be \(K, 12\)"):
        ops.cosine_logits(f, torch.randn(K, 5, device=device))
    with fastseg.use_backend("torch"), pytest.raises(ValueError, match="labels must be in"):  # the reference
        ops.entropy_distill_loss(torch.randn(1, K, 3, 4, device=device), torch.randn(1, K, 3, 4, device=device),
                                 torch.full((1, 3, 4), K, dtype=torch.long, device=device))


@pytest.mark.parametrize("bad", [K, -3, 2 ** 32 + 1])  # the last one would wrap to 1 as an int32
def test_out_of_range_labels_are_nan(bad, device, triton_launches):
    """No host check on the Triton path (it would make every call wait for the GPU): a label outside [0, K) is
    never used as an index and makes the results NaN; the same labels without it are finite."""
    f = torch.randn(B, C, H, W, device=device, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(B, K, H, W, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, C, device=device, dtype=torch.float64)
    for y, loud in ((_labels().to(device), False), (_labels().to(device), True)):
        if loud:
            y[1, 0, 2 * (H - 1), 4] = bad  # one pixel: (H - 1, 2) after the nearest resize by 2
        table = ops.oracle_class_prototypes(f, y, weight)
        loss = ops.entropy_distill_loss(pred, torch.randn_like(pred), y)
        gf, gp = torch.autograd.grad(table.sum() + loss, (f, pred))
        for name, t in (("table", table), ("loss", loss), ("dfeat", gf), ("dpred", gp)):
            assert t.isnan().any() == loud, f"{name} bad={bad} loud={loud}"
    assert triton_launches["cac_proto_fwd"] == 2 and triton_launches["cac_distill_bwd"] == 2
    assert gp[1, :, H - 1, 2].isnan().all() and gp[0].isfinite().all()  # NaN gradient at that pixel only


def test_classifier_state_dict_and_training_step(device, triton_launches):
    """The drop-in has the reference block's (and FCNHeadCAC's classifier-only) state_dict; inference logits, the
    training loss dict and every gradient match the reference."""
    torch.manual_seed(0)
    r = ref.CACClassifier(C, K, dropout_ratio=0.0).double().to(device)
    m = ContextAwareClassifier(C, K, dropout_ratio=0.0).double().to(device)
    head = FCNHeadCAC(in_channels=C, channels=C, num_classes=K, num_convs=0, concat_input=False)
    assert set(m.state_dict()) == set(r.state_dict()) == set(head.state_dict())
    m.load_state_dict(r.state_dict())
    x = torch.randn(B, C, H, W, device=device, dtype=torch.float64, requires_grad=True)
    y = _labels().to(device)
    assert_close(m(x), r(x), 1e-10, "logits")
    launches = sum(triton_launches.values())
    got, exp = m.forward_train(x, y), r.forward_train(x, y)
    assert sum(triton_launches.values()) > launches and triton_launches["upsample_ce_fwd"] >= 3
    for k in exp:
        assert abs(got[k].item() - exp[k].item()) <= 1e-10 * max(1.0, abs(exp[k].item())), k
    leaves_m = [x] + list(m.parameters())
    ga = torch.autograd.grad(got["loss_ce"], leaves_m)
    gb = torch.autograd.grad(exp["loss_ce"], [x] + list(r.parameters()))
    for (n, _), a, b in zip([("feat", None)] + list(m.named_parameters()), ga, gb):
        assert_close(a, b, 1e-10, n)


def test_patch_swaps_a_cac_model(device, triton_launches):
    """fastseg.patch on a reference CAC model: the classifier-only head becomes ContextAwareClassifier, a whole
    head (LightHamHeadCAC) a fused copy; outputs, losses and gradients match the unpatched model."""
    torch.manual_seed(0)

    class Backbone(torch.nn.Module):  # a tiny stand-in for MSCAN: 4 levels
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, c, 3, 2 ** (i + 2), 1)
                                             for i, c in enumerate((4, 8, 8, 8)))

        def forward(self, x):
            return [c(x) for c in self.convs]

    head = LightHamHeadCAC(in_channels=[8, 8, 8], channels=32, ham_channels=32, num_classes=K, dropout_ratio=0.0,
                           ham_kwargs=dict(MD_S=1, MD_R=4, train_steps=2, eval_steps=2, inv_t=100, rand_init=True))
    model = CACSegmentor(Backbone(), head).to(device)  # float32: the Ham head's NMF draws float32 bases
    parent = torch.nn.Module()
    parent.classifier = ref.CACClassifier(C, K).double().to(device)
    patched_model, rep = fastseg.patch(CACSegmentor(Backbone(), head).to(device))
    patched_model.load_state_dict(model.state_dict())
    assert rep.count("cac") == 1 and rep.verified == ["decode_head"], str(rep)
    assert patched_model.decode_head.fused and not model.decode_head.fused
    _, rep2 = fastseg.patch(parent)
    assert isinstance(parent.classifier, ContextAwareClassifier) and rep2.verified == ["classifier"], str(rep2)
    img = torch.randn(1, 3, 16, 24, device=device)
    y = _labels(1, 16, 24, absent=()).to(device)
    outs = []
    for mod in (model, patched_model):
        mod.eval()
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the NMF's random bases
            out = mod(img)
            losses = mod.forward_train(img, y)
        outs.append((out, losses["loss"], [torch.zeros(()) if t is None else t for t in
                                                   torch.autograd.grad(losses["loss"], list(mod.parameters()),
                                                                       allow_unused=True)]))
    assert triton_launches["cac_proto_fwd"] > 0 and triton_launches["cac_distill_bwd"] > 0
    assert_close(outs[1][0], outs[0][0], 1e-5, "logits")
    assert abs(outs[1][1].item() - outs[0][1].item()) < 1e-5 * abs(outs[0][1].item())
    # all parameter gradients as one vector (the backbone biases' gradients are ~0: GroupNorm removes shifts)
    assert_close(torch.cat([a.flatten() for a in outs[1][2]]), torch.cat([b.flatten() for b in outs[0][2]]), 1e-4,
                 "parameter gradients")


def test_torch_compile_fullgraph(triton_launches):
    """torch.compile(fullgraph=True, backend="aot_eager") of the training step reaches the kernels through the
    fastseg::cac_* / upsample_ce custom ops: same loss and gradients as eager; opcheck of the forward ops."""
    from fastseg import _backend

    if not _backend.interpreter_enabled():
        pytest.skip("the kernels need TRITON_INTERPRET=1 on CPU")
    torch.manual_seed(0)
    clf = ContextAwareClassifier(C, K, dropout_ratio=0.0).double()
    y = _labels(absent=(2,))

    def run(x):  # the whole training loss (both classifiers, distillation, upsampled CEs) and the logits
        return clf.forward_train(x, y)["loss_ce"] + clf(x).square().mean()

    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    leaves = [x] + list(clf.parameters())
    want = run(x)
    g_want = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    triton_launches.clear()
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    g_got = torch.autograd.grad(got, leaves)
    torch._dynamo.reset()
    assert {"cac_proto_fwd", "cac_proto_bwd", "cac_cos_fwd", "cac_cos_bwd_df", "cac_cos_bwd_dq", "cac_distill_fwd",
            "cac_distill_bwd", "upsample_ce_fwd", "upsample_ce_bwd"} <= set(triton_launches)
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert_close(a, b, 1e-12, f"gradient {i}")
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    f = torch.randn(1, C, 3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, K, 3, 4, dtype=torch.float64, requires_grad=True)
    yy = _labels(1, 3, 4).reshape(1, 12)
    torch.library.opcheck(ops._soft_fwd_op, (f, z), test_utils=tests)
    torch.library.opcheck(ops._label_fwd_op, (f, yy, K, 255), test_utils=tests)
    q = torch.randn(1, K, C, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops._cos_fwd_op, (f, q, 15.0, 1e-12, True), test_utils=tests)
    torch.library.opcheck(ops._distill_fwd_op, (z, z.detach(), yy, 0.5, 255, 0.0), test_utils=tests)
    from fastseg.ops import upsample_ce

    torch.library.opcheck(upsample_ce._fwd_op, (z, _labels(1, 7, 6)[:, 0], True, 255), test_utils=tests)


_RULES = r"""
import json
from fastseg.bench import inspect as I
print(json.dumps(I.inspect_kernels(["cac"], "default", dtypes=["bf16"], sass=False, max_shapes=1)))
"""


def test_sm90_resources_bf16():
    """sm_90 (Triton's ptxas, no GPU): at ADE20K's shape (K = 150, C = 512) every CAC kernel compiles with no
    spill in bf16, fits the shared memory, and every dot runs on tensor cores (wgmma / mma)."""
    from fastseg.bench import inspect as I

    rows = sm90_rows(_RULES)
    assert {r["kernel"] for r in rows} == {"_proto_fwd_kernel", "_proto_bwd_kernel", "_cos_fwd_kernel",
                                           "_cos_bwd_df_kernel", "_cos_bwd_dq_kernel", "_distill_fwd_kernel",
                                           "_distill_bwd_kernel"}
    assert I.violations(rows) == []
    for r in rows:
        if not r["kernel"].startswith("_distill"):
            assert r["wgmma"] + r["mma"] > 0, r
