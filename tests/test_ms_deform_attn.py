"""Multi-scale deformable attention: the fused Triton op (forward and all three gradients) against the official
PyTorch core (grid_sample), the drop-in modules against the official layouts, fastseg.patch on an
official-style encoder and on Hugging Face's module, and the pixel decoder's fused switch.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors; every test that claims the Triton path asserts the
launch counter."""
import copy

import pytest
import torch
from torch import nn

import fastseg
from fastseg.nn import MSDeformAttn, MSDeformAttnHF
from fastseg.ops import ms_deform_attn
from fastseg.reference import ReferenceMSDeformAttn, ms_deform_attn_core_pytorch
from helpers import TOL, assert_close

SHAPES = [(5, 7), (3, 4), (1, 2)]  # small odd levels (S = 49)


def _inputs(shapes, N=2, Lq=9, M=3, D=5, P=3, dtype=torch.float64, lo=-0.2, hi=1.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    locs = (torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64).to(dtype)
    return value, locs, attn


def _grads(fn, value, locs, attn, g):
    xs = [t.detach().clone().requires_grad_() for t in (value, locs, attn)]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, g.to(out.dtype)))


def _compare(shapes, value, locs, attn, tol, triton_launches, device, ref_dtype=torch.float64):
    """fused(value, locs, attn) on ``device`` vs the official core in ``ref_dtype`` on the same (rounded) inputs."""
    st = torch.tensor(shapes, device=device)
    g = torch.randn(value.shape[0], locs.shape[1], value.shape[2] * value.shape[3],
                    generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = _grads(lambda v, l, a: ms_deform_attn(v, st, None, l, a), value.to(device), locs.to(device),
                 attn.to(device), g.to(device))
    ref = _grads(lambda v, l, a: ms_deform_attn_core_pytorch(v, shapes, l, a), value.to(ref_dtype),
                 locs.to(ref_dtype), attn.to(ref_dtype), g.to(ref_dtype))
    for name, a, b in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), got, ref):
        assert a.dtype == (value.dtype if name in ("output", "grad value") else
                           locs.dtype if "locations" in name else attn.dtype), name
        assert_close(a, b, tol, name)
    assert triton_launches["ms_deform_attn_fwd"] >= 1 and triton_launches["ms_deform_attn_bwd"] >= 1
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_reference(dtype, device, triton_launches):
    # random locations, about a sixth of them outside the image on some axis
    value, locs, attn = _inputs(SHAPES, dtype=dtype)
    _compare(SHAPES, value, locs, attn, TOL[dtype], triton_launches, device)


@pytest.mark.parametrize("D,M,P,shapes", [(20, 2, 1, [(3, 5)]), (64, 1, 2, [(2, 3), (4, 1), (1, 1), (3, 3)]),
                                          (1, 4, 5, [(6, 2), (1, 7)])])
def test_op_head_dims_levels_points(D, M, P, shapes, device, triton_launches):
    """Head dims not a power of 2 (masked), 1 and 64; 1 to 4 levels; 1 to 5 points."""
    value, locs, attn = _inputs(shapes, N=1, Lq=7, M=M, D=D, P=P)
    _compare(shapes, value, locs, attn, TOL[torch.float64], triton_launches, device)


def test_op_borders_edges_and_outside(device, triton_launches):
    """Locations on texel centres and borders (h = y·H − 0.5 an integer or half-integer), exactly 0 and 1, just
    inside and outside (h = −1 exactly: next test). Levels with power-of-2 sides keep every location exact in
    both paths' arithmetic
    (the reference computes ((2y − 1) + 1)·H − 1) / 2), so both pick the same bilinear cell on a border."""
    shapes = [(4, 8), (2, 2), (8, 4)]
    N, Lq, M, D, P, L = 1, 17, 2, 6, 4, 3
    grid = torch.tensor([k / 16 for k in range(17)], dtype=torch.float64)  # 0, 1/16, ..., 1: borders + centres
    extra = torch.tensor([-0.3, 1.25, -3.0, 5.0, 0.0, 1.0, 1 - 1 / 64, 1 / 64], dtype=torch.float64)
    pool = torch.cat([grid, extra])
    g = torch.Generator().manual_seed(1)
    locs = pool[torch.randint(len(pool), (N, Lq, M, L, P, 2), generator=g)]
    locs[0, 0, 0, :, 0] = 0.0
    locs[0, 0, 1, :, 0] = 1.0
    locs[0, 1, :, :, :, 0] = 1.0  # x = 1 (w = W - 0.5): the right column alone
    value = torch.randn(N, sum(h * w for h, w in shapes), M, D, generator=g, dtype=torch.float64)
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    _compare(shapes, value, locs, attn, TOL[torch.float64], triton_launches, device)


def test_op_exactly_minus_one_is_outside_as_the_cuda_op(device, triton_launches):
    """The official CUDA op samples a point only if −1 < h < H and −1 < w < W. At h = −1 exactly
    (y = −0.5/H) it contributes nothing and gets no gradient (grid_sample would give the location a one-sided
    gradient from row 0, with value 0): fastseg follows the CUDA op."""
    shapes = [(4, 4)]
    value, _, _ = _inputs(shapes, N=1, Lq=2, M=1, D=4, P=1)
    locs = torch.tensor([[[[[[0.5, -0.5 / 4]]]], [[[[-0.5 / 4, 0.5]]]]]], dtype=torch.float64)  # (1, 2, 1, 1, 1, 2)
    attn = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    st = torch.tensor(shapes, device=device)
    g = torch.ones(1, 2, 4, dtype=torch.float64, device=device)
    out, gv, gl, ga = _grads(lambda v, l, a: ms_deform_attn(v, st, None, l, a), value.to(device), locs.to(device),
                             attn.to(device), g)
    assert triton_launches["ms_deform_attn_bwd"] == 1
    for t in (out, gv, gl, ga):
        assert torch.count_nonzero(t) == 0
    # just inside, the location gradient is the bilinear derivative over row 0 (H · Σ g · v(row 0 texels))
    locs[..., 1] += 1e-9
    locs[0, 1, ..., 0] += 1e-9
    _, _, gl, _ = _grads(lambda v, l, a: ms_deform_attn(v, st, None, l, a), value.to(device), locs.to(device),
                         attn.to(device), g)
    assert gl[0, 0, 0, 0, 0, 1].abs() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_op_half_precision(dtype, tol, device, triton_launches):
    """fp16/bf16 inputs, fp32 accumulation, against the fp64 core on the same rounded inputs."""
    value, locs, attn = _inputs(SHAPES, dtype=dtype)
    _compare(SHAPES, value, locs, attn, tol, triton_launches, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_fused_softmax_and_locations(dtype, device, triton_launches):
    """ms_deform_attn_from_offsets (softmax over L·P and ref + offset / (W, H) in the kernels) vs the same
    arithmetic in PyTorch + the official core, on the same (rounded) inputs; large logits exercise the online
    softmax, a -inf logit gets weight 0."""
    from fastseg.ops import ms_deform_attn_from_offsets

    g = torch.Generator().manual_seed(4)
    N, Lq, M, D, P, L = 2, 7, 3, 6, 3, len(SHAPES)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    refs = torch.rand(N, Lq, L, 2, generator=g, dtype=torch.float64).to(dtype)
    offsets = (torch.randn(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    logits = (torch.randn(N, Lq, M, L, P, generator=g, dtype=torch.float64) * 8).to(dtype)
    logits[0, 0, 0, 0, 0] = float("-inf")
    gout = torch.randn(N, Lq, M * D, generator=g, dtype=torch.float64)
    st = torch.tensor(SHAPES, device=device)

    def run(fn, dt, dev):
        xs = [t.to(dev, dt).requires_grad_() for t in (value, refs, offsets, logits)]
        out = fn(*xs)
        return [out, *torch.autograd.grad(out, xs, gout.to(dev, out.dtype))]

    def ref_fn(v, r, o, lg):
        w = lg.flatten(3).softmax(-1).view(lg.shape)
        norm = torch.tensor([[w_, h_] for h_, w_ in SHAPES], dtype=r.dtype)
        return ms_deform_attn_core_pytorch(v, SHAPES, r[:, :, None, :, None] + o / norm[None, None, None, :, None], w)

    got = run(lambda v, r, o, lg: ms_deform_attn_from_offsets(v, st, None, r, o, lg), dtype, device)
    ref = run(ref_fn, torch.float64, "cpu")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for name, a, b in zip(("output", "grad value", "grad reference_points", "grad offsets", "grad logits"), got, ref):
        assert a.dtype == dtype, name
        assert_close(a, b, tol, name)
    assert got[4][0, 0, 0, 0, 0] == 0
    assert triton_launches["ms_deform_attn_fwd"] == 1 and triton_launches["ms_deform_attn_bwd"] == 1


def test_op_bad_inputs(device):
    value, locs, attn = _inputs(SHAPES, dtype=torch.float32)
    st = torch.tensor(SHAPES, device=device)
    value, locs, attn = value.to(device), locs.to(device), attn.to(device)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, st, None, locs, attn[..., :2])
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        ms_deform_attn(value, st[:2], None, locs, attn)
    with pytest.raises(TypeError, match="integer"):
        ms_deform_attn(value, st.float(), None, locs, attn)
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, st, None, locs[..., :1], attn)
    with pytest.raises(ValueError, match="S = 49"):  # a list of shapes is checked on the host, on any device
        ms_deform_attn(value, [(5, 7), (3, 4), (2, 2)], None, locs, attn)
    if device == "cpu":  # the Σ H·W == S check of tensors is CPU-only (a host sync on CUDA)
        with pytest.raises(ValueError, match="S = 49"):
            ms_deform_attn(value, torch.tensor([(5, 7), (3, 4), (2, 2)]), None, locs, attn)
        with pytest.raises(ValueError, match="level_start_index"):
            ms_deform_attn(value, st, torch.tensor([0, 35, 40]), locs, attn)


def _module_inputs(C, L, shapes, coords, dtype=torch.float64, N=2, Lq=6, pad=False):
    g = torch.Generator().manual_seed(3)
    S = sum(h * w for h, w in shapes)
    query = torch.randn(N, Lq, C, generator=g, dtype=dtype)
    flat = torch.randn(N, S, C, generator=g, dtype=dtype)
    refs = torch.rand(N, Lq, L, coords, generator=g, dtype=dtype)
    if coords == 4:
        refs[..., 2:] *= 0.5
    mask = (torch.rand(N, S, generator=g) < 0.2) if pad else None
    return query, refs, flat, mask


@pytest.mark.filterwarnings("ignore:You'd better set d_model")  # head dim 6 on purpose
@pytest.mark.parametrize("coords,pad", [(2, False), (4, True)])
def test_module_matches_official_layout(coords, pad, device, triton_launches):
    C, L, M, P = 24, 3, 4, 2
    ref = ReferenceMSDeformAttn(C, L, M, P).double()
    with torch.no_grad():  # non-trivial offsets / weights (the official init has zero weight matrices)
        ref.sampling_offsets.weight.normal_(0, 0.5)
        ref.attention_weights.weight.normal_(0, 0.5)
    fused = MSDeformAttn(C, L, M, P).double().to(device)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    query, refs, flat, mask = _module_inputs(C, L, SHAPES, coords, pad=pad)
    st = torch.tensor(SHAPES)
    starts = torch.tensor([0, 35, 47])

    def run(mod, dev):
        xs = [t.to(dev).requires_grad_() for t in (query, refs, flat)]
        m = None if mask is None else mask.to(dev)
        out = mod(xs[0], xs[1], xs[2], st.to(dev), starts.to(dev), m)
        params = list(mod.parameters())
        return out, torch.autograd.grad(out.square().sum(), xs + params)

    out_r, grads_r = run(ref, "cpu")
    out_f, grads_f = run(fused, device)
    assert_close(out_f, out_r, TOL[torch.float64], "output")
    names = ["query", "reference_points", "input_flatten"] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, grads_f, grads_r):
        assert_close(a, b, TOL[torch.float64], f"grad {n}")
    assert triton_launches["ms_deform_attn_fwd"] == 1 and triton_launches["ms_deform_attn_bwd"] == 1


def test_module_same_init_as_official():
    torch.manual_seed(5)
    a = ReferenceMSDeformAttn(32, 3, 8, 4)
    torch.manual_seed(5)
    b = MSDeformAttn(32, 3, 8, 4)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


class _OfficialEncoderLayer(nn.Module):
    """Mask2Former's ``MSDeformAttnTransformerEncoderLayer`` layout (self_attn = official MSDeformAttn)."""

    def __init__(self, d_model=16, d_ffn=32, n_levels=3, n_heads=2, n_points=3):
        super().__init__()
        self.self_attn = ReferenceMSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                              padding_mask))
        return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


def test_patch_official_encoder(device, triton_launches):
    torch.manual_seed(0)
    enc = nn.ModuleList(_OfficialEncoderLayer() for _ in range(2)).to(device)
    for layer in enc:
        with torch.no_grad():
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.3)
    ref = copy.deepcopy(enc)
    _, report = fastseg.patch(enc, ops="ms_deform_attn")
    assert [r[0] for r in report.replaced] == ["0.self_attn", "1.self_attn"]
    assert all(type(layer.self_attn) is MSDeformAttn for layer in enc)
    assert report.verified == ["0.self_attn", "1.self_attn"]  # one probe (same configuration), kernels launched
    assert triton_launches["ms_deform_attn_fwd"] >= 1
    triton_launches.clear()
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in SHAPES)
    src, pos = torch.randn(2, S, 16, generator=g).to(device), torch.randn(2, S, 16, generator=g).to(device)
    refs = torch.rand(2, S, 3, 2, generator=g).to(device)
    st, starts = torch.tensor(SHAPES, device=device), torch.tensor([0, 35, 47], device=device)
    proj = torch.randn(2, S, 16, generator=g).to(device)

    def step(model):
        x = src.clone().requires_grad_()
        out = x
        for layer in model:
            out = layer(out, pos, refs, st, starts)
        # a random projection: the square sum of a LayerNorm output is constant (its gradient is pure rounding)
        grads = torch.autograd.grad((out * proj).sum(), [x] + list(model.parameters()))
        return out, grads

    out_r, grads_r = step(ref)
    out_p, grads_p = step(enc)
    assert_close(out_p, out_r, 1e-5, "output")
    for i, (a, b) in enumerate(zip(grads_p, grads_r)):
        assert_close(a, b, 1e-4, f"grad {i}")
    assert triton_launches["ms_deform_attn_fwd"] == 2 and triton_launches["ms_deform_attn_bwd"] == 2


@pytest.mark.parametrize("family", ["mask2former", "oneformer"])
def test_patch_hugging_face_module(device, triton_launches, family):
    # OneFormer's copy of the module is also called with the shapes as a tensor (`spatial_shapes`)
    pytest.importorskip("transformers")
    import importlib

    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(hf, f"{'Mask2Former' if family == 'mask2former' else 'OneFormer'}"
                      "PixelDecoderEncoderMultiscaleDeformableAttention")
    torch.manual_seed(0)
    attn = cls(embed_dim=16, num_heads=2, n_levels=3, n_points=4)
    for lin in (attn.sampling_offsets, attn.attention_weights, attn.value_proj, attn.output_proj):
        nn.init.normal_(lin.weight, 0, 0.3)
        nn.init.normal_(lin.bias, 0, 0.3)
    holder = nn.Module()
    holder.self_attn = attn
    ref = copy.deepcopy(attn)
    _, report = fastseg.patch(holder)
    assert report.replaced == [("self_attn", "ms_deform_attn_hf", type(attn).__name__, "MSDeformAttnHF")]
    new = holder.self_attn
    assert isinstance(new, MSDeformAttnHF) and report.verified == ["self_attn"]
    triton_launches.clear()  # the probe's
    from fastseg.records.ms_deform_attn import probe_inputs
    query, refs, flat, shapes_list, shapes, starts = probe_inputs(ref, torch.device("cpu"), torch.float32,
                                                                  torch.Generator().manual_seed(0))
    kwargs = dict(hidden_states=query, encoder_hidden_states=flat, reference_points=refs,
                  spatial_shapes_list=shapes_list, level_start_index=starts)
    if family == "oneformer":
        kwargs["spatial_shapes"] = shapes
    mask = torch.zeros(2, flat.shape[1], dtype=torch.bool)
    mask[:, -3:] = True
    pos = torch.randn(query.shape)

    def run(mod):
        kw = dict(kwargs, attention_mask=mask, position_embeddings=pos)
        h = kw["hidden_states"].clone().requires_grad_()
        kw.update(hidden_states=h)
        out, weights = mod(**kw)
        return out, weights, torch.autograd.grad(out.square().sum(), [h] + list(mod.parameters()))

    out_r, w_r, grads_r = run(ref)
    new = new.to(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    mask, pos = mask.to(device), pos.to(device)
    out_p, w_p, grads_p = run(new)
    assert_close(out_p, out_r, 1e-5, "output")
    assert_close(w_p, w_r, 1e-6, "attention weights")
    for a, b in zip(grads_p, grads_r):
        assert_close(a, b, 1e-4, "grad")
    assert triton_launches["ms_deform_attn_fwd"] == 1 and triton_launches["ms_deform_attn_bwd"] == 1


def test_records_recognise_and_probe():
    from fastseg.records import get

    rec, hf_rec = get("ms_deform_attn"), get("ms_deform_attn_hf")
    m = ReferenceMSDeformAttn(8, 2, 2, 3)
    assert rec.matches(None, "self_attn", m) and rec.matches(None, "self_attn", MSDeformAttn(8, 2, 2, 3))
    assert not hf_rec.matches(None, "self_attn", m) and hf_rec.matches(None, "a", MSDeformAttnHF(8, 2, 2, 3))
    for case in rec.probe(m, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0)):
        assert case.call(m, *case.inputs).shape == (2, 5, 8)
    from fastseg.models.pixel_decoder import MSDeformAttn as ProjectMSDeformAttn
    assert not rec.matches(None, "self_attn", ProjectMSDeformAttn(8, 2, 2, 3))  # own `fused` switch
    assert not hf_rec.matches(None, "self_attn", ProjectMSDeformAttn(8, 2, 2, 3))
    assert not rec.matches(None, "x", nn.Linear(3, 3))


def test_pixel_decoder_fused_switch(device, triton_launches):
    from fastseg.models import MSDeformAttnPixelDecoder

    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder([8, 8, 8, 8], conv_dim=16, mask_dim=16, norm="GN", transformer_nheads=2,
                                   transformer_dim_feedforward=32, transformer_enc_layers=1).double().to(device)
    # At the official init every sampling point sits exactly on a texel centre (reference points at centres,
    # integer offsets), where the location gradient is one-sided (and at h = -1 exactly the CUDA op and
    # grid_sample differ, see above): generic offsets make the comparison well posed.
    with torch.no_grad():
        for m in dec.modules():
            if hasattr(m, "sampling_offsets"):
                m.sampling_offsets.weight.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 16 // s, 24 // s, generator=g, dtype=torch.float64).to(device) for s in (1, 2, 4, 8)]

    def run():
        xs = [f.clone().requires_grad_() for f in feats]
        mask, ms = dec(xs)
        return mask, torch.autograd.grad(mask.square().sum() + sum(m.sum() for m in ms), xs + list(dec.parameters()),
                                         allow_unused=True)

    ref_mask, ref_grads = run()
    assert not triton_launches
    dec.set_fused(True)
    mask, grads = run()
    assert triton_launches["ms_deform_attn_fwd"] == 1 and triton_launches["ms_deform_attn_bwd"] == 1
    assert_close(mask, ref_mask, 1e-10, "mask features")
    # some parameter gradients are analytically 0 (rounding noise): compare on the scale of all gradients
    scale = max(b.norm().item() for b in ref_grads if b is not None)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            assert (a - b).norm().item() <= 1e-10 * scale


@pytest.mark.parametrize("op", ["ms-deform-attn", "ms-deform-attn-module"])
def test_bench_cases_agree(op, device, triton_launches):
    """The benchmark's fastseg and eager cases compute the same thing (same seeded inputs)."""
    from fastseg.bench.registry import get_op

    spec = get_op(op)
    s = spec.full_shape({"B": 1, "H": 32, "W": 48, "heads": 2, "D": 8, "points": 2})
    outs = [spec.impl(name).prepare(s, torch.float64, torch.device(device), "fwdbwd").forward()
            for name in ("fastseg", "eager")]
    assert_close(outs[0], outs[1], 1e-10, op)
    assert triton_launches["ms_deform_attn_fwd"] >= 1


def test_deterministic_mode_alert():
    """grad_value's atomics on CUDA honour torch.use_deterministic_algorithms (checked without a GPU)."""
    import types
    import warnings

    from fastseg.ops.ms_deform_attn import _alert_nondeterministic

    cuda_like = types.SimpleNamespace(is_cuda=True)
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        _alert_nondeterministic(cuda_like)  # off: nothing
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="atomic"):
            _alert_nondeterministic(cuda_like)
        _alert_nondeterministic(types.SimpleNamespace(is_cuda=False))  # CPU / interpreter: sequential, fine
        torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _alert_nondeterministic(cuda_like)
        assert any("atomic" in str(x.message) for x in w)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
