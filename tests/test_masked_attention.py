"""Masked attention: the Triton kernels (forward and every gradient) against the PyTorch reference and
against ``torch.nn.MultiheadAttention`` itself. Runs under TRITON_INTERPRET=1 on CPU, compiled on CUDA."""
import math

import pytest
import torch
from helpers import DTYPES_EXACT, EXACT, TOL, assert_close, rel_err

import fastseg
from fastseg import ops
from fastseg.nn import MaskedCrossAttention
from fastseg.reference import ReferenceMaskedCrossAttention, masked_attention as ref_attention

KERNELS = {"masked_attention_fwd", "masked_attention_combine"}
BWD_KERNELS = {"masked_attention_bwd_dkdv", "masked_attention_bwd_dq"}


def _qkv(B, H, M, N, D, dtype, device):
    mk = lambda n: torch.randn(B, H, n, D, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return mk(M), mk(N), mk(N)


def _check_op(q, k, v, allowed, launches, num_splits=None, tol=None, packed=None):
    tol = tol or TOL[q.dtype]
    launches.clear()
    out = ops.masked_attention(q, k, v, packed if packed is not None else allowed, num_splits=num_splits)
    ref = ref_attention(q, k, v, allowed, 1.0 / math.sqrt(q.shape[-1]), empty_rows="zero")
    assert_close(out, ref, tol, "out")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, tol, f"d{name}")
    assert KERNELS | BWD_KERNELS <= set(launches), f"Triton kernels did not run: {dict(launches)}"
    return out, got


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
@pytest.mark.parametrize("D", [16, 24, 64])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_op_matches_reference(device, triton_launches, dtype, D, density):
    B, H, M, N = 2, 2, 13, 77  # odd sizes, not multiples of any block
    q, k, v = _qkv(B, H, M, N, D, dtype, device)
    allowed = torch.rand(B, H, M, N, device=device) < density
    _check_op(q, k, v, allowed, triton_launches)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_key_splits(device, triton_launches, num_splits):
    """The forward and dq passes split the keys; every split count gives the same result."""
    q, k, v = _qkv(1, 2, 21, 150, 32, EXACT, device)
    allowed = torch.rand(1, 1, 21, 150, device=device) < 0.3  # shared across heads
    _check_op(q, k, v, allowed, triton_launches, num_splits=num_splits)


def test_no_mask_and_block_sparse(device, triton_launches):
    q, k, v = _qkv(1, 2, 40, 130, 16, torch.float32, device)
    _check_op(q, k, v, None, triton_launches)
    # whole key tiles masked for whole query blocks: exercised by the tile skipping
    allowed = torch.zeros(1, 2, 40, 130, dtype=torch.bool, device=device)
    allowed[:, :, :16, 100:] = True
    allowed[:, :, 16:, :20] = True
    allowed[:, 1, 30:, 64:70] = True
    _check_op(q, k, v, allowed, triton_launches)


def test_empty_rows_are_zero_not_nan(device, triton_launches):
    q, k, v = _qkv(2, 2, 9, 45, 16, EXACT, device)
    allowed = torch.rand(2, 2, 9, 45, device=device) < 0.4
    allowed[0, 1, 3] = False
    allowed[1, :, 8] = False
    allowed[:, :, 5, :3] = True
    out, (dq, dk, dv) = _check_op(q, k, v, allowed, triton_launches)
    assert out[0, 1, 3].abs().max() == 0 and out[1, :, 8].abs().max() == 0
    assert dq[0, 1, 3].abs().max() == 0
    everything_masked = torch.zeros_like(allowed)
    out, grads = _check_op(q, k, v, everything_masked, triton_launches)
    assert out.abs().max() == 0 and all(g.abs().max() == 0 for g in grads)


def test_half_precision(device, triton_launches):
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _qkv(1, 2, 17, 70, 32, dtype, device)
        allowed = torch.rand(1, 2, 17, 70, device=device) < 0.5
        triton_launches.clear()
        out = ops.masked_attention(q, k, v, allowed)
        assert out.dtype == dtype
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = ref_attention(qf, kf, vf, allowed, empty_rows="zero")
        assert_close(out, ref, TOL[dtype], str(dtype))
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
        want = torch.autograd.grad(ref, (qf, kf, vf), grad)
        for name, g, w in zip("qkv", got, want):
            assert g.dtype == dtype
            assert_close(g, w, 2 * TOL[dtype], f"d{name} {dtype}")
        assert KERNELS | BWD_KERNELS <= set(triton_launches)


def test_strided_inputs(device, triton_launches):
    """Views from a (B, S, H·D) projection and a non-contiguous head dim are both handled."""
    B, H, M, N, D = 2, 3, 10, 33, 16
    x = torch.randn(B, M, H * D, dtype=EXACT, device=device)
    q = x.unflatten(-1, (H, D)).permute(0, 2, 1, 3).requires_grad_()
    kv = torch.randn(B, H, D, N, 2, dtype=EXACT, device=device)
    k = kv[..., 0].transpose(2, 3).requires_grad_()  # head dim not contiguous: copied once
    v = kv[..., 1].transpose(2, 3).requires_grad_()
    allowed = torch.rand(B * H, M, N, device=device) < 0.5
    _check_op(q, k, v, allowed.view(B, H, M, N), triton_launches)


# ---------------------------------------------------------------------------------------------- masks


def test_pack_kernel_matches_torch_pack(device, triton_launches):
    B, H, M, N = 2, 3, 7, 71
    am = torch.rand(B * H, M, N, device=device) < 0.5
    kpm = torch.rand(B, N, device=device) < 0.2
    for masked in (False, True):
        packed = ops.pack_mask(am, kpm, batch=B, heads=H, num_queries=M, num_keys=N, masked=masked)
        assert "masked_attention_pack" in triton_launches
        allowed = (~am if masked else am).view(B, H, M, N) & (~kpm if masked else kpm).view(B, 1, 1, N)
        assert torch.equal(ops.unpack_mask(packed), allowed)
        with fastseg.use_backend("torch"):
            assert torch.equal(ops.pack_mask(am, kpm, batch=B, heads=H, num_queries=M, num_keys=N,
                                             masked=masked).bits, packed.bits)
    shared = ops.pack_mask(am[:1].view(M, N), batch=B, heads=H, num_queries=M, num_keys=N)
    assert shared.bits.shape == (1, 1, M, 3)  # one copy for every batch and head
    expanded = am[:B].view(B, 1, M, N).expand(B, H, M, N).reshape(B * H, M, N)
    assert ops.pack_mask(expanded.view(B, H, M, N).expand(B, H, M, N), batch=B, heads=H, num_queries=M,
                         num_keys=N).bits.shape[:2] == (B, H)


def test_fused_pack_and_tile_lists_match_the_two_kernels(device, triton_launches):
    """The bool-mask forward packs and lists the non-empty tiles in one kernel: same words, same lists as
    pack + tile_lists (odd sizes, key padding, both conventions, a head-shared and a per-head mask)."""
    from fastseg.kernels import masked_attention as kern

    B, H, M, N = 2, 3, 37, 133
    kpm = torch.rand(B, N, device=device) < 0.3
    per_head = torch.rand(B, H, M, N, device=device) < 0.02  # sparse: some tiles empty
    per_head[:, :, :, 40:100] = False
    shared = torch.rand(1, 1, M, N, device=device) < 0.5
    for am, kp, masked in ((per_head, None, False), (shared, kpm, True), (None, kpm, False), (shared, None, True)):
        kw = dict(attn_masked=masked, kpm_masked=masked, batch=B, heads=H, n_q=M, n_k=N)
        triton_launches.clear()
        bits, (blocks, counts, flags) = kern.pack_with_tile_lists(am, kp, **kw)
        assert dict(triton_launches) == {"masked_attention_pack_tile_list": 1}
        want = kern.pack(am, kp, **kw)
        w_blocks, w_counts, w_flags = kern.tile_lists(want, M, N)
        assert torch.equal(bits, want) and torch.equal(counts, w_counts) and torch.equal(flags, w_flags)
        for c, got_row, want_row in zip(counts.flatten(), blocks.flatten(0, 2), w_blocks.flatten(0, 2)):
            assert torch.equal(got_row[:c], want_row[:c])


def test_packed_mask_input(device, triton_launches):
    q, k, v = _qkv(2, 2, 12, 40, 16, EXACT, device)
    allowed = torch.rand(2, 1, 12, 40, device=device) < 0.5
    packed = ops.pack_mask(allowed, batch=2, heads=2, num_queries=12, num_keys=40)
    assert packed.bits.shape == (2, 1, 12, 2)
    _check_op(q, k, v, allowed, triton_launches, packed=packed)


# --------------------------------------------------------------------------------- drop-in module


def _module_inputs(batch_first, B, M, L, E, kdim, vdim, device, dtype=EXACT):
    shp = lambda s, e: (B, s, e) if batch_first else (s, B, e)  # noqa: E731
    return (torch.randn(shp(M, E), device=device, dtype=dtype, requires_grad=True),
            torch.randn(shp(L, kdim), device=device, dtype=dtype, requires_grad=True),
            torch.randn(shp(L, vdim), device=device, dtype=dtype, requires_grad=True))


def _compare_with_mha(mha, mod, inputs, launches, **kwargs):
    """Output, weights (nn.MultiheadAttention's default need_weights=True) and every gradient."""
    launches.clear()
    out, weights = mod(*inputs, **kwargs)
    want, want_w = mha(*inputs, **kwargs)
    assert_close(out, want, TOL[out.dtype], "output")
    assert_close(weights, want_w, TOL[out.dtype], "attention weights")
    assert "masked_attention_weights" in launches
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(inputs) + list(mod.parameters()), grad)
    ref = torch.autograd.grad(want, list(inputs) + list(mha.parameters()), grad)
    names = ["query", "key", "value"] + [n for n, _ in mod.named_parameters()]
    for name, g, w in zip(names, got, ref):
        assert_close(g, w, TOL[out.dtype], f"grad {name}")
    assert KERNELS | BWD_KERNELS <= set(launches), f"Triton kernels did not run: {dict(launches)}"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["2d", "per_head", "float", "kpm_only"])
def test_module_matches_nn_multihead_attention(device, triton_launches, batch_first, mask_kind):
    E, H, B, M, L = 48, 3, 2, 11, 37
    mha = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, device=device, dtype=EXACT)
    mod = MaskedCrossAttention(E, H, batch_first=batch_first, device=device, dtype=EXACT)
    mod.load_state_dict(mha.state_dict())
    inputs = _module_inputs(batch_first, B, M, L, E, E, E, device)
    kpm = torch.rand(B, L, device=device) < 0.2
    kpm[:, 0] = False
    kwargs = {"key_padding_mask": kpm}
    if mask_kind == "2d":
        kwargs["attn_mask"] = torch.rand(M, L, device=device) < 0.5
    elif mask_kind == "per_head":
        kwargs["attn_mask"] = torch.rand(B * H, M, L, device=device) < 0.7
    elif mask_kind == "float":
        am = torch.zeros(B * H, M, L, device=device, dtype=EXACT)
        kwargs["attn_mask"] = am.masked_fill(torch.rand(B * H, M, L, device=device) < 0.5, float("-inf"))
        kwargs["key_padding_mask"] = torch.zeros(B, L, device=device, dtype=EXACT).masked_fill(kpm, float("-inf"))
    if mask_kind != "kpm_only":  # nn.MultiheadAttention gives NaN on empty rows: keep one key open
        am = kwargs["attn_mask"]
        if am.dtype == torch.bool:
            am[..., 0] = False
        else:
            am[..., 0] = 0.0
    _compare_with_mha(mha, mod, inputs, triton_launches, **kwargs)


def test_module_kdim_vdim_no_bias_unbatched(device, triton_launches):
    E, H, M, L = 32, 2, 9, 26
    mha = torch.nn.MultiheadAttention(E, H, bias=False, kdim=20, vdim=12, device=device, dtype=EXACT)
    mod = MaskedCrossAttention.from_mha(mha)
    assert set(mod.state_dict()) == set(mha.state_dict())
    inputs = _module_inputs(False, 2, M, L, E, 20, 12, device)
    mask = torch.rand(M, L, device=device) < 0.5
    mask[:, 3] = False
    _compare_with_mha(mha, mod, inputs, triton_launches, attn_mask=mask)
    unbatched = [t[:, 0].detach().requires_grad_() for t in inputs]  # (S, E)
    _compare_with_mha(mha, mod, unbatched, triton_launches, attn_mask=mask)


def test_module_positional_call_and_reference_module(device, triton_launches):
    """Positional arguments in nn.MultiheadAttention's order; the reference module agrees too."""
    E, H, B, M, L = 32, 4, 2, 7, 20
    ref = ReferenceMaskedCrossAttention(E, H, batch_first=True, device=device, dtype=EXACT)
    mod = MaskedCrossAttention.from_mha(ref)
    q, k, v = _module_inputs(True, B, M, L, E, E, E, device)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=device)
    am = torch.rand(B * H, M, L, device=device) < 0.5
    am[:, :, 0] = False
    out = mod(q, k, v, kpm, False, am)[0]
    assert_close(out, ref(q, k, v, kpm, False, am)[0], TOL[EXACT], "reference module")


def test_module_empty_rows_give_out_proj_bias(device, triton_launches):
    E, H = 16, 2
    mod = MaskedCrossAttention(E, H, device=device, dtype=EXACT)
    ref = ReferenceMaskedCrossAttention(E, H, empty_rows="zero", device=device, dtype=EXACT)
    ref.load_state_dict(mod.state_dict())
    q, k, v = _module_inputs(False, 2, 5, 12, E, E, E, device)
    mask = torch.rand(5, 12, device=device) < 0.5
    mask[2] = True  # query 2 masked everywhere
    out = mod(q, k, v, attn_mask=mask)[0]
    assert torch.isfinite(out).all()
    assert_close(out[2], mod.out_proj.bias.expand(2, E), 1e-12, "empty row")
    assert_close(out, ref(q, k, v, attn_mask=mask)[0], TOL[EXACT], "reference with empty_rows='zero'")


def test_torch_backend_matches(device):
    """The plain-PyTorch path (CPU without the interpreter) computes the same function."""
    E, H = 32, 4
    mod = MaskedCrossAttention(E, H, batch_first=True, device=device, dtype=EXACT)
    q, k, v = _module_inputs(True, 2, 6, 19, E, E, E, device)
    mask = torch.rand(2 * H, 6, 19, device=device) < 0.5
    mask[:, 1] = True
    out = mod(q, k, v, attn_mask=mask)[0]
    with fastseg.use_backend("torch"):
        fastseg.launches.clear()
        out_torch = mod(q, k, v, attn_mask=mask)[0]
        assert not fastseg.launches
    assert_close(out, out_torch, TOL[EXACT], "torch backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [None, 1])  # 1 element: one query row per SDPA call
def test_torch_path_sdpa_matches_reference(dtype, chunk, monkeypatch):
    """The plain-PyTorch path (SDPA in query chunks) vs the reference, forward and every gradient: empty
    rows give 0 and zero gradient, key padding, a head-shared 4-D mask, the unmasked case."""
    ma = pytest.importorskip("fastseg.ops.masked_attention")
    if chunk is not None:
        monkeypatch.setattr(ma, "_SDPA_CHUNK_ELEMS", chunk)
    B, H, M, N, D = 2, 3, 7, 13, 8
    am = torch.rand(B, 1, M, N) < 0.5
    am[0, 0, 2] = False  # empty from the attention mask alone
    am[1, 0, 4] = True
    kpm = torch.rand(B, N) < 0.5
    kpm[1, :] = False
    kpm[1, :3] = True  # with am: row 4 of batch 1 may attend only keys 0..2
    am[1, 0, 5, 3:] = True
    am[1, 0, 5, :3] = False  # empty only once key padding is applied
    cases = [(am, kpm, am & kpm.view(B, 1, 1, N)), (am, None, am), (None, kpm, kpm.view(B, 1, 1, N)), (None, None, None)]
    for attn_mask, key_padding, allowed in cases:
        q, k, v = _qkv(B, H, M, N, D, dtype, "cpu")
        with fastseg.use_backend("torch"):
            fastseg.launches.clear()
            out = ops.masked_attention(q, k, v, attn_mask, key_padding)
            assert not fastseg.launches
        ref = ref_attention(q, k, v, allowed, 1.0 / math.sqrt(D), empty_rows="zero")
        assert torch.isfinite(out).all()
        assert_close(out, ref, TOL[dtype], "out")
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for name, g, w in zip("qkv", got, want):
            assert torch.isfinite(g).all()
            assert_close(g, w, TOL[dtype], f"d{name}")
        if attn_mask is not None:
            assert (out[0, :, 2] == 0).all() and (got[0][0, :, 2] == 0).all()  # empty row: 0, zero gradient
            if key_padding is not None:
                assert (out[1, :, 5] == 0).all()
    # masked=True (nn.MultiheadAttention convention) reads the same masks inverted
    q, k, v = _qkv(B, H, M, N, D, dtype, "cpu")
    with fastseg.use_backend("torch"):
        out = ops.masked_attention(q, k, v, ~am, ~kpm, masked=True)
    assert_close(out, ref_attention(q, k, v, am & kpm.view(B, 1, 1, N), 1.0 / math.sqrt(D)), TOL[dtype], "masked")


def test_autocast(device, triton_launches):
    E, H = 32, 2
    mod = MaskedCrossAttention(E, H, batch_first=True, device=device)
    q, k, v = _module_inputs(True, 2, 8, 30, E, E, E, device, dtype=torch.float32)
    mask = torch.rand(8, 30, device=device) < 0.5
    mask[:, 0] = False
    want = mod(q, k, v, attn_mask=mask)[0]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = mod(q, k, v, attn_mask=mask)[0]
        q16 = q.detach().to(torch.bfloat16)
        assert ops.masked_attention(q16.view(2, 8, 2, 16).transpose(1, 2), q16.view(2, 8, 2, 16).transpose(1, 2),
                                    q16.view(2, 8, 2, 16).transpose(1, 2).float()).dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert_close(out, want, 3e-2, "autocast output")
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_torch_compile_no_graph_break(device, triton_launches):
    E, H = 32, 2
    mod = MaskedCrossAttention(E, H, batch_first=True, device=device, dtype=EXACT)
    q, k, v = _module_inputs(True, 2, 8, 30, E, E, E, device)
    mask = torch.rand(8, 30, device=device) < 0.5
    mask[:, 0] = False
    want = mod(q, k, v, attn_mask=mask)[0]
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    triton_launches.clear()
    out = compiled(q, k, v, attn_mask=mask)[0]
    assert_close(out, want, TOL[EXACT], "compiled")
    out.sum().backward()
    assert KERNELS | BWD_KERNELS <= set(triton_launches)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors(device):
    E, H = 32, 4
    mod = MaskedCrossAttention(E, H, device=device)
    q, k, v = (t.detach() for t in _module_inputs(False, 2, 5, 9, E, E, E, device, dtype=torch.float32))
    x = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mod(q, k, v, attn_mask=torch.zeros(5, 8, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mod(q, k, v, attn_mask=torch.zeros(3, 5, 9, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="bool or float"):
        mod(q, k, v, attn_mask=torch.zeros(5, 9, dtype=torch.int64, device=device))
    with pytest.raises(NotImplementedError, match="additive float mask"):
        mod(q, k, v, attn_mask=torch.randn(5, 9, device=device))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        mod(q, k, v, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="embed_dim"):
        mod(q[..., :16], k, v)
    with pytest.raises(ValueError, match="do not fit"):
        mod(q, k[:, :1], v)
    with pytest.raises(ValueError, match="one device"):
        mod(q, k, v, attn_mask=torch.zeros(5, 9, dtype=torch.bool, device="meta"))
    with pytest.raises(NotImplementedError, match="dropout=1.0"):
        MaskedCrossAttention(E, H, dropout=1.0, device=device)(q, k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.masked_attention(x, x, x, dropout_p=-0.1)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        MaskedCrossAttention(E, H, add_bias_kv=True)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.masked_attention(x, x.double(), x)
    with pytest.raises(ValueError, match="shape mismatch"):
        ops.masked_attention(x, x[..., :8], x)
    with pytest.raises(ValueError, match="4-D"):
        ops.masked_attention(x[0], x, x)


def test_tile_lists_skip_exactly_the_empty_tiles(device, triton_launches):
    from fastseg.kernels import masked_attention as K

    bm, bn = K.TILE
    M, N = 2 * bm + 3, 5 * bn + 7
    allowed = torch.zeros(2, 1, M, N, dtype=torch.bool, device=device)
    allowed[0, 0, 0, 3 * bn + 1] = True  # query block 0 sees key block 3 only
    allowed[0, 0, 2 * bm + 2, 5 * bn + 6] = True  # the ragged last query block sees the ragged last key block
    allowed[1, 0, bm:2 * bm, :] = True  # batch 1, query block 1: everything
    packed = ops.pack_mask(allowed, batch=2, heads=1, num_queries=M, num_keys=N)
    blocks, counts, flags = K.tile_lists(packed.bits, M, N)
    assert counts.tolist() == [[[1, 0, 1]], [[0, 6, 0]]]
    assert blocks[0, 0, 0, 0] == 3 and blocks[0, 0, 2, 0] == 5
    assert blocks[1, 0, 1].tolist() == list(range(6))
    assert flags[0, 0, 0].tolist() == [0, 0, 0, 1, 0, 0] and flags[1, 0, 1].tolist() == [1] * 6


# ------------------------------------------------------------------------- attention weights, dropout


@pytest.mark.parametrize("average", [True, False])
def test_weights_match_nn_multihead_attention(device, triton_launches, average):
    """need_weights: nn.MultiheadAttention's default (True) returns its weights, averaged or per head,
    batched and unbatched; need_weights=False builds none (the weights kernel does not run)."""
    E, H, B, M, L = 16, 2, 2, 9, 37
    mha = torch.nn.MultiheadAttention(E, H, device=device, dtype=EXACT)
    mod = MaskedCrossAttention.from_mha(mha)
    q, k, v = _module_inputs(False, B, M, L, E, E, E, device)
    mask = torch.rand(B * H, M, L, device=device) < 0.6
    mask[:, :, 5] = False
    for args in ((q, k, v), (q[:, 0], k[:, 0], v[:, 0])):
        am = mask if args[0].dim() == 3 else mask[:H]
        triton_launches.clear()
        out, w = mod(*args, attn_mask=am, average_attn_weights=average)
        want, want_w = mha(*args, attn_mask=am, average_attn_weights=average)
        assert w.shape == want_w.shape and w.dtype == want_w.dtype
        assert_close(w, want_w, TOL[EXACT], "weights")
        assert_close(out, want, TOL[EXACT], "output")
        assert triton_launches["masked_attention_weights"] == 1
    triton_launches.clear()
    out, w = mod(q, k, v, attn_mask=mask, need_weights=False)
    assert w is None and "masked_attention_weights" not in triton_launches and "masked_attention_fwd" in triton_launches
    mod.need_weights_default = False  # what fastseg.patch sets where the caller discards the weights
    assert mod(q, k, v, attn_mask=mask)[1] is None
    assert mod(q, k, v, attn_mask=mask, need_weights=True)[1] is not None  # an explicit request wins


@pytest.mark.parametrize("average,p", [(True, 0.0), (False, 0.3)])
def test_gradient_through_weights(device, triton_launches, average, p):
    """A loss on the output and on the returned weights: dq, dk, dv equal the reference's."""
    B, H, M, N, D = 2, 2, 17, 40, 16
    q, k, v = _qkv(B, H, M, N, D, EXACT, device)
    allowed = torch.rand(B, H, M, N, device=device) < 0.5
    allowed[1, 0, 4] = False  # an empty row
    seed = ops.dropout_seed(device)
    out, w = ops.masked_attention(q, k, v, allowed, dropout_p=p, dropout_seed=seed, return_weights=True,
                                  average_weights=average)
    keep = ops.dropout_keep_mask(seed, B, H, M, N, p)
    ref, ref_w = ref_attention(q, k, v, allowed, keep=keep, dropout_p=p, return_weights=True)
    ref_w = ref_w.mean(1) if average else ref_w
    assert_close(w, ref_w, TOL[EXACT], "weights")
    g_o, g_w = torch.randn_like(ref), torch.randn_like(ref_w)
    got = torch.autograd.grad((out, w), (q, k, v), (g_o, g_w))
    want = torch.autograd.grad((ref, ref_w), (q, k, v), (g_o, g_w))
    for name, g, r in zip("qkv", got, want):
        assert_close(g, r, TOL[EXACT], f"d{name}")
    assert {"masked_attention_weights_bwd_dq", "masked_attention_weights_bwd_dk"} <= set(triton_launches)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_matches_reference_with_kernel_keep_mask(device, triton_launches, p):
    """Fused attention dropout: output, weights and every gradient equal the reference computed with the
    kernels' own keep mask (p = 0: no dropout at all)."""
    B, H, M, N, D = 2, 2, 19, 50, 16
    q, k, v = _qkv(B, H, M, N, D, EXACT, device)
    allowed = torch.rand(B, 1, M, N, device=device) < 0.6
    seed = ops.dropout_seed(device)
    keep = ops.dropout_keep_mask(seed, B, H, M, N, p)
    if p == 0:
        assert keep.all()
    triton_launches.clear()
    out, w = ops.masked_attention(q, k, v, allowed, dropout_p=p, dropout_seed=seed, return_weights=True,
                                  average_weights=False, num_splits=2)
    ref, ref_w = ref_attention(q, k, v, allowed, keep=keep, dropout_p=p, return_weights=True)
    assert_close(out, ref, TOL[EXACT], "out")
    assert_close(w, ref_w, TOL[EXACT], "weights")
    grad = torch.randn_like(ref)
    for name, g, want in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(g, want, TOL[EXACT], f"d{name}")
    assert KERNELS | BWD_KERNELS <= set(triton_launches)
    if p > 0:  # the same seed gives the same mask; the reference without the mask differs
        assert torch.equal(ops.masked_attention(q, k, v, allowed, dropout_p=p, dropout_seed=seed, num_splits=2), out)
        assert rel_err(out, ref_attention(q, k, v, allowed)) > 0.1


def test_dropout_keep_mask_statistics(device):
    B, H, M, N = 1, 2, 16, 256
    for p in (0.1, 0.5):
        keep = ops.dropout_keep_mask(ops.dropout_seed(device), B, H, M, N, p)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
        other = ops.dropout_keep_mask(ops.dropout_seed(device), B, H, M, N, p)
        differ = (keep != other).float().mean().item()  # independent masks differ on 2p(1-p) of the entries
        assert abs(differ - 2 * p * (1 - p)) < 6 * math.sqrt(0.25 / n)
    seed = torch.tensor([12345], device=device)
    assert torch.equal(ops.dropout_keep_mask(seed, 1, 2, 3, 40, 0.3), ops.dropout_keep_mask(seed, 1, 2, 3, 40, 0.3))


def test_module_dropout_training_and_eval(device, triton_launches):
    """Training: the module draws its seed from torch's generator and matches the reference math with that
    seed's keep mask (output, weights, gradients). Eval: no dropout, equal to nn.MultiheadAttention."""
    E, H, B, M, L, p = 16, 2, 2, 7, 33, 0.25
    mha = torch.nn.MultiheadAttention(E, H, dropout=p, batch_first=True, device=device, dtype=EXACT)
    mod = MaskedCrossAttention.from_mha(mha)
    assert mod.training and mod.dropout == p
    query, key, value = _module_inputs(True, B, M, L, E, E, E, device)
    mask = torch.rand(B * H, M, L, device=device) < 0.5
    mask[..., 0] = False
    torch.manual_seed(7)
    seed = ops.dropout_seed(device)
    torch.manual_seed(7)
    out, w = mod(query, key, value, attn_mask=mask, average_attn_weights=False)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    heads = lambda x: x.unflatten(-1, (H, E // H)).transpose(1, 2)  # noqa: E731
    q, k, v = heads(query @ w_q.T + b_q), heads(key @ w_k.T + b_k), heads(value @ w_v.T + b_v)
    keep = ops.dropout_keep_mask(seed, B, H, M, L, p)
    o, ref_w = ref_attention(q, k, v, ~mask.view(B, H, M, L), keep=keep, dropout_p=p, return_weights=True)
    ref = mha.out_proj(o.transpose(1, 2).flatten(2))
    assert_close(out, ref, TOL[EXACT], "training output")
    assert_close(w, ref_w, TOL[EXACT], "training weights")
    grad = torch.randn_like(out)
    params = [query, key, value, mha.in_proj_weight, mha.out_proj.weight]
    got = torch.autograd.grad(out, [query, key, value, mod.in_proj_weight, mod.out_proj.weight], grad)
    for g, want in zip(got, torch.autograd.grad(ref, params, grad)):
        assert_close(g, want, TOL[EXACT], "training gradient")
    mha.eval(), mod.eval()
    _compare_with_mha(mha, mod, (query, key, value), triton_launches, attn_mask=mask)


# ------------------------------------------------------------- Hugging Face callers (default need_weights)


def _capture_weights(model):
    """Forward hooks recording the weights every patched attention returns."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
             for m in model.modules() if isinstance(m, MaskedCrossAttention)]
    return seen, hooks


def test_patched_hf_oneformer_weights_only_with_output_attentions(triton_launches):
    """HF OneFormer calls its cross-attention without need_weights: the patched model returns the original's
    cross-attention weights with output_attentions=True and computes none without (the weights kernel never
    runs). Its query transformer (attention dropout 0.1) is patched too and never computes weights."""
    import copy

    from hf_models import tiny_hf_oneformer

    model = tiny_hf_oneformer().eval()
    ref = copy.deepcopy(model)
    x, task = torch.randn(1, 3, 64, 64), torch.randint(0, 50, (1, 8))
    _, report = fastseg.patch(model)
    dec = "model.transformer_module.decoder"
    assert [r[0] for r in report.replaced] == [f"{dec}.query_transformer.decoder.layers.0.multihead_attn",
                                               f"{dec}.layers.0.cross_attn.multihead_attn",
                                               f"{dec}.layers.1.cross_attn.multihead_attn"]
    assert len([d for d in report.deeper if "output_attentions" in d[1]]) == 2  # (+ the packed-mask decoder)
    assert any("discards the attention weights" in n for n in report.notes)
    with torch.no_grad():
        want = ref(pixel_values=x, task_inputs=task, output_attentions=True)
        triton_launches.clear()
        got = model(pixel_values=x, task_inputs=task, output_attentions=True)
        if fastseg.interpreter_enabled():  # (CPU model: Triton only under the interpreter)
            assert triton_launches["masked_attention_weights"] == 2  # the decoder layers, not the query transformer
        for (_, w), (_, w_ref) in zip(got.attentions, want.attentions, strict=True):
            assert w.shape == w_ref.shape and w.shape[:2] == (1, 6)  # (B, Q, HW of the level)
            assert_close(w, w_ref, 1e-4, "cross-attention weights")
        assert_close(got.masks_queries_logits, want.masks_queries_logits, 1e-4, "mask logits")
        seen, hooks = _capture_weights(model)
        triton_launches.clear()
        model(pixel_values=x, task_inputs=task)
        for h in hooks:
            h.remove()
    assert len(seen) == 3 and all(w is None for w in seen)
    if fastseg.interpreter_enabled():
        assert "masked_attention_weights" not in triton_launches and triton_launches["masked_attention_fwd"] == 3
    _, again = fastseg.patch(model)  # idempotent: no second hook
    assert not again.replaced and not again.deeper


def test_patched_hf_mask2former_weights_only_with_output_attentions(triton_launches):
    import copy

    from hf_models import tiny_hf_mask2former

    model = tiny_hf_mask2former().eval()
    ref = copy.deepcopy(model)
    fastseg.patch(model)
    x = torch.randn(1, 3, 64, 64)
    layer_out = {}
    for name, m in (("got", model), ("want", ref)):
        layer_out[name] = []
        hooks = [layer.register_forward_hook(lambda mod, args, out, acc=layer_out[name]: acc.append(out[2]))
                 for layer in m.model.transformer_module.decoder.layers]
        with torch.no_grad():
            m(pixel_values=x, output_attentions=True)
        for h in hooks:
            h.remove()
    assert len(layer_out["got"]) == 2
    for w, w_ref in zip(layer_out["got"], layer_out["want"], strict=True):
        assert_close(w, w_ref, 1e-4, "cross-attention weights")
    seen, hooks = _capture_weights(model)
    triton_launches.clear()
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(w is None for w in seen) and "masked_attention_weights" not in triton_launches


# ------------------------------------------------------------------------------------ launch counts

_NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # allocations only


class _DeviceWork:
    """Counts what would run on the device: fastseg's Triton launches, plus every aten op outside them that
    is not a view / metadata op or a bare allocation (a TorchDispatchMode). The Triton interpreter's own
    tensor copies inside a launch are not counted."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime import interpreter

        self.aten, self.paused = [], False
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not (outer.paused or func.is_view or name in _NOT_KERNELS):
                    outer.aten.append(str(func))
                return func(*args, **(kwargs or {}))

        launch = interpreter.GridExecutor.__call__

        def quiet_launch(executor, *args, **kwargs):
            outer.paused = True
            try:
                return launch(executor, *args, **kwargs)
            finally:
                outer.paused = False

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", quiet_launch)
        self.mode = Mode()

    def count(self, fn):
        self.aten.clear()
        fastseg.launches.clear()
        with self.mode:
            out = fn()
        return sum(fastseg.launches.values()) + len(self.aten), dict(fastseg.launches), list(self.aten), out


def test_device_launch_counts(device, monkeypatch):
    """masked_attention: <= 3 device kernels forward (packed, bool or no mask) and <= 3 backward;
    mask_from_embeddings: <= 3. No host sync (aten._local_scalar_dense / item) anywhere."""
    if device != "cpu":
        pytest.skip("counts the interpreter's launches")
    work = _DeviceWork(monkeypatch)
    B, H, M, N, D = 1, 2, 20, 70, 16
    q, k, v = _qkv(B, H, M, N, D, torch.float32, device)
    packed = ops.pack_mask(torch.rand(B, 1, M, N, device=device) < 0.5, batch=B, heads=H, num_queries=M, num_keys=N)
    bool_mask = torch.rand(B, H, M, N, device=device) < 0.5
    kpm = torch.rand(B, N, device=device) < 0.2
    for mask, key_pad in ((packed, None), (None, None), (bool_mask, None), (bool_mask, kpm), (None, kpm)):
        n, launches, aten, out = work.count(lambda: ops.masked_attention(q, k, v, mask, key_pad, num_splits=2))
        assert n <= 3, (launches, aten)
        grad = torch.randn_like(out)
        n, launches, aten, _ = work.count(lambda: torch.autograd.grad(out, (q, k, v), grad))
        assert n <= 3 and set(launches) == BWD_KERNELS, (launches, aten)
    emb, feat = torch.randn(2, 5, 8, device=device), torch.randn(2, 8, 6, 7, device=device)
    n, launches, aten, _ = work.count(lambda: ops.mask_from_embeddings(emb, feat))
    assert n <= 3 and "attention_mask_reset_empty" in launches, (launches, aten)
    # the module's whole forward + backward (projections included): no host sync either
    mod = MaskedCrossAttention(32, 2, batch_first=True, dropout=0.1, device=device)
    x, mem = torch.randn(2, 5, 32, device=device), torch.randn(2, 40, 32, device=device)
    _, _, aten, out = work.count(lambda: mod(x, mem, mem, attn_mask=torch.rand(5, 40, device=device) < 0.5))
    _, _, aten_bwd, _ = work.count(lambda: out[0].sum().backward())
    assert not [op for op in aten + aten_bwd if "_local_scalar_dense" in op or "item" in op], aten + aten_bwd


def test_fp32_precision_follows_torch_matmul_setting():
    """fp32 dots: TF32 exactly when PyTorch's fp32 matmuls may use it; other dtypes unaffected."""
    from fastseg.kernels.masked_attention import _precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert _precision(torch.float32, interpreted=False) == "ieee"
        for mode in ("high", "medium"):
            torch.set_float32_matmul_precision(mode)
            assert _precision(torch.float32, interpreted=False) == "tf32"
            assert _precision(torch.bfloat16, interpreted=False) == _precision(torch.float16, interpreted=False) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = False  # the legacy switch is the same setting
        assert _precision(torch.float32, interpreted=False) == "ieee"
        assert _precision(torch.bfloat16, interpreted=True) == "upcast"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_dkdv_config_pruning():
    """The dk/dv configs measured to spill on sm_90 are never autotuned for fp32 (notes: masked_attention_resources)."""
    import triton

    from fastseg.kernels.masked_attention import _prune_dkdv

    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "SUB_M": s}) for s in (64, 32, 16)]
    subs = lambda dtype, dropout: [c.kwargs["SUB_M"] for c in _prune_dkdv(  # noqa: E731
        cfgs, {"Q": torch.empty(1, dtype=dtype)}, DROPOUT=dropout)]
    assert subs(torch.float32, False) == [32, 16] and subs(torch.float32, True) == [16]
    assert subs(torch.bfloat16, True) == subs(torch.float16, False) == [64, 32, 16]


def test_patched_project_models_compute_no_weights(triton_launches):
    """This project's Mask2Former / MaskFormer layers discard the weights (``multihead_attn(...)[0]``, as the
    official code): after patch their attentions compute none (need_weights_default=False)."""
    from fastseg.models import build_mask2former, build_maskformer

    m2f = build_mask2former("tiny", 5, hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=64, dec_layers=2,
                            mask_dim=32, conv_dim=32, enc_layers=1, enc_nheads=4, enc_dim_feedforward=64).eval()
    mf = build_maskformer("tiny", 4, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64, dec_layers=2,
                          conv_dim=32, mask_dim=32)
    for model in (m2f, mf):
        _, report = fastseg.patch(model)
        attns = [m for m in model.modules() if isinstance(m, MaskedCrossAttention)]
        assert len(attns) == 2 and not any(a.need_weights_default for a in attns)
    seen, hooks = _capture_weights(m2f)
    triton_launches.clear()
    with torch.no_grad():
        m2f(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(w is None for w in seen) and "masked_attention_weights" not in triton_launches
