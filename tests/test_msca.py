"""fastseg.nn.MSCA (fused Triton MSCA) against SegNeXt's AttentionModule: forward and all 17 gradients."""
import pytest
import torch

from fastseg import use_backend
from fastseg.kernels import msca as K
from fastseg.nn import MSCA
from fastseg.reference import AttentionModule

from helpers import EXACT, TOL, assert_close

# the most exact dtype the kernels run in: fp64 under the interpreter, fp32 on a GPU




def _kernels(x):
    """The Triton launches of one forward + backward of x (the dispatch rules of fastseg.ops.msca)."""
    fwd = {"msca_fused_fwd"} if K.use_fused_fwd(x) else {"msca_dw_fwd", "msca_pw_fwd"}
    if K.use_fused_bwd(x):
        bwd = {"msca_fused_bwd", "msca_w3_reduce", "msca_dw_reduce"}
    elif K.use_twopass_bwd(x):
        bwd = {"msca_pw_ds_bwd", "msca_dw_pw_bwd", "msca_bwd_reduce"}
    else:
        bwd = {"msca_dw_bwd", "msca_w3_reduce", "msca_dw_reduce"} | (
            {"msca_pw_w3_bwd"} if x.shape[1] <= K.PW_FUSED_MAX_C else {"msca_pw_bwd", "msca_w3_bwd"})
    return fwd | bwd


def _pair(C, dtype, device):
    ref = AttentionModule(C).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial biases and O(1) outputs
        for p in ref.parameters():
            p.normal_(0, 0.3)
    fused = MSCA(C).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _check(N, C, H, W, channels_last, dtype, device, launches, tol=None):
    tol = tol or TOL[dtype]
    launches.clear()
    ref, fused = _pair(C, EXACT if dtype in (torch.float16, torch.bfloat16) else dtype, device)
    fused.to(dtype)
    x = torch.randn(N, C, H, W, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x_ref = x.detach().to(ref.conv3.weight.dtype).requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    y = fused(x_fused)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, tol, "forward")
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.to(dtype))
    assert_close(x_fused.grad, x_ref.grad, tol, "grad x")
    named = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, named[name].grad, tol, f"grad {name}")
    assert _kernels(x) == set(launches), f"Triton kernels not all launched: {dict(launches)}"


@pytest.mark.parametrize("N,C,H,W,channels_last", [
    (2, 5, 9, 13, False),   # odd sizes smaller than the 21-tap strips
    (1, 3, 5, 4, True),     # tiny plane, channels_last
    (1, 6, 23, 1, False),   # one column
])
def test_msca_exact(N, C, H, W, channels_last, device, triton_launches):
    _check(N, C, H, W, channels_last, EXACT, device, triton_launches)


def test_msca_fp32_many_channels(device, triton_launches):
    # C = 37 > the GEMM blocks: several channel blocks in all three pointwise kernels
    _check(1, 37, 6, 7, True, torch.float32, device, triton_launches)


def test_msca_unfused_pointwise_backward(device, triton_launches, monkeypatch):
    # above FUSED_FWD_MAX_C / PW_FUSED_MAX_C channels the forward is the depthwise + pointwise kernels and the
    # pointwise backward and dW3 are two kernels: run those paths at a small C (and one fused, one not)
    monkeypatch.setattr(K, "TWOPASS_BWD_MAX_C", 0)
    monkeypatch.setattr(K, "PW_FUSED_MAX_C", 2)
    monkeypatch.setattr(K, "FUSED_FWD_MAX_C", 2)
    _check(1, 5, 9, 13, True, EXACT, device, triton_launches)
    _check(2, 3, 7, 6, False, torch.float32, device, triton_launches)
    monkeypatch.setattr(K, "FUSED_FWD_MAX_C", 8)
    _check(1, 5, 9, 13, False, EXACT, device, triton_launches)


def _small_blocks_if_wide(W, device, monkeypatch):
    """The W > 60 cases run 32-wide blocks (several tiles per plane) under the interpreter; skipped on a GPU."""
    if W > 60:
        if device != "cpu":
            pytest.skip("the small-block case is for the interpreter")
        monkeypatch.setattr(K, "BLOCK_CAP", 32)


@pytest.mark.parametrize("N,C,H,W,channels_last,dtype", [
    (2, 5, 9, 13, False, EXACT),
    (1, 3, 5, 4, True, EXACT),
    (1, 6, 23, 1, False, torch.float32),
    (1, 3, 17, 70, True, EXACT),   # 32-wide blocks below: several tiles, two programs per ds scratch band
    (1, 2, 19, 66, False, torch.float32),
])
def test_msca_fused_backward(N, C, H, W, channels_last, dtype, device, triton_launches, monkeypatch):
    # the opt-in one-kernel backward (FASTSEG_MSCA_FUSED_BWD=1); its ds scratch poisoned with NaN first: the
    # rows it never writes this call must reach no output or gradient
    monkeypatch.setattr(K, "FUSED_BWD_MAX_C", 64)
    _small_blocks_if_wide(W, device, monkeypatch)
    for key, buf in K._SCRATCH.items():
        if key[2] == "flat":
            buf.fill_(float("nan"))
    _check(N, C, H, W, channels_last, dtype, device, triton_launches)
    assert triton_launches["msca_fused_bwd"] == 1


@pytest.mark.parametrize("N,C,H,W,channels_last,dtype", [
    (1, 5, 9, 13, True, EXACT),
    (2, 3, 7, 6, False, torch.float32),
    (1, 2, 17, 70, False, EXACT),  # 32-wide blocks below: several tiles
])
def test_msca_split_backward(N, C, H, W, channels_last, dtype, device, triton_launches, monkeypatch):
    # FASTSEG_MSCA_TWOPASS=0: the pointwise + W3 kernel, then the per-plane depthwise backward
    monkeypatch.setattr(K, "TWOPASS_BWD_MAX_C", 0)
    _small_blocks_if_wide(W, device, monkeypatch)
    _check(N, C, H, W, channels_last, dtype, device, triton_launches)
    assert triton_launches["msca_dw_bwd"] == 1 and "msca_dw_pw_bwd" not in triton_launches


def test_msca_twopass_chunks_and_tiles(device, triton_launches, monkeypatch):
    # the default backward's second pass: 16-channel chunks (C = 20: a full and a partial one; C = 37 in
    # test_msca_fp32_many_channels: three) over several tiles, each chunk writing its own rows of the partials
    if device == "cpu":
        monkeypatch.setattr(K, "BLOCK_CAP", 32)
        _check(1, 20, 17, 30, True, EXACT, device, triton_launches)
        _check(2, 18, 15, 13, False, torch.float32, device, triton_launches)
    else:
        _check(2, 20, 70, 90, True, torch.float32, device, triton_launches)
    assert triton_launches["msca_dw_pw_bwd"] == 1 and triton_launches["msca_bwd_reduce"] == 1


def test_msca_fused_forward_dispatch():
    # on a GPU the one-kernel forward needs a spatial tile per SM (132 on an H100): not at batch 1
    assert K.fused_fwd_tiles(16, 128, 128) == 144 and K.fused_fwd_tiles(1, 128, 128) == 9
    assert K.use_fused_fwd(torch.empty(1, 64, 8, 8, device="meta"))  # no GPU: C decides
    assert not K.use_fused_fwd(torch.empty(1, 65, 8, 8, device="meta"))
    # the two-pass backward's second pass: (tile, 16-channel chunk) items, one per SM at least on a GPU
    assert K.twopass_bwd_items(16, 32, 128, 128) == 384 and K.twopass_bwd_items(2, 32, 128, 128) == 48
    assert K.use_twopass_bwd(torch.empty(1, 64, 8, 8, device="meta"))
    assert not K.use_twopass_bwd(torch.empty(1, 65, 8, 8, device="meta"))
    assert not K.use_twopass_bwd(torch.empty(1, 8, 8, 8, device="meta").permute(0, 1, 3, 2))  # no dense layout


def test_msca_several_tiles(device, triton_launches, monkeypatch):
    # several tiles per plane: the tile + halo logic and the cross-tile weight-grad reduction
    if device == "cpu":  # smaller blocks keep the interpreter fast
        monkeypatch.setattr(K, "BLOCK_CAP", 32)
        _check(1, 3, 17, 19, True, EXACT, device, triton_launches)
        _check(1, 2, 15, 13, False, EXACT, device, triton_launches)
    else:  # the real block size (no extra compile on the GPU)
        _check(1, 3, 70, 90, True, EXACT, device, triton_launches)
        _check(2, 2, 50, 47, False, EXACT, device, triton_launches)


def test_msca_half(device, triton_launches):
    if device == "cpu":
        pytest.skip("fp16 needs a GPU (the interpreter's numpy has no bf16 and slow fp16)")
    # each (dtype, memory format) compiles its own depthwise backward (~1 min): two combinations only
    _check(2, 64, 50, 70, True, torch.bfloat16, device, triton_launches)
    _check(2, 64, 50, 70, False, torch.float16, device, triton_launches)


def test_msca_deterministic(device, triton_launches):
    _, fused = _pair(4, torch.float32, device)
    x = torch.randn(1, 4, 7, 9, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        fused.zero_grad()
        x.grad = None
        fused(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in fused.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_msca_torch_backend_matches(device):
    ref, fused = _pair(3, torch.float32, "cpu")
    x = torch.randn(2, 3, 6, 5)
    with use_backend("torch"):
        torch.testing.assert_close(fused(x), ref(x))


def test_msca_state_dict_keys():
    assert list(MSCA(8).state_dict()) == list(AttentionModule(8).state_dict())


@pytest.mark.parametrize("twopass", [True, False])
def test_msca_mixed_parameter_dtypes(twopass, device, triton_launches, monkeypatch):
    # conv3 in another dtype than the depthwise convs: each gradient comes back in its parameter's dtype (the
    # two-pass backward reduces both gradients in one launch, then casts when their dtypes differ)
    if device != "cpu":
        pytest.skip("fp64 parameters with fp32 x: an interpreter case")
    from fastseg.ops import msca
    from fastseg.ops.msca import _torch_msca

    monkeypatch.setattr(K, "TWOPASS_BWD_MAX_C", 64 if twopass else 0)
    ref, _ = _pair(5, torch.float64, device)
    convs = [getattr(ref, n) for n in ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2")]
    dw = [c.weight.detach().float().requires_grad_() for c in convs]
    db = [c.bias.detach().float().requires_grad_() for c in convs]
    w3 = ref.conv3.weight.detach().clone().requires_grad_()  # fp64
    b3 = ref.conv3.bias.detach().clone().requires_grad_()
    x = torch.randn(1, 5, 9, 13, device=device, requires_grad=True)
    triton_launches.clear()
    y = msca(x, dw, db, w3, b3)
    g = torch.randn_like(y)
    y.backward(g)
    assert triton_launches["msca_dw_pw_bwd" if twopass else "msca_dw_bwd"] == 1
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *dw, *db, w3, b3)]
    x64, w3_64, b3_64 = leaves64[0], leaves64[-2], leaves64[-1]
    _torch_msca(x64, leaves64[1:8], leaves64[8:15], w3_64, b3_64).backward(g.double())
    for t, r in zip((x, *dw, *db, w3, b3), leaves64):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, r.grad, TOL[torch.float32], "grad")


def test_msca_block_without_own_pixels(device, monkeypatch):
    # a depthwise block no larger than its halo (FASTSEG_MSCA_DW_BLOCK=16,16,..., or BLOCK_CAP) would leave every
    # output unwritten: a clear error instead
    monkeypatch.setattr(K, "BLOCK_CAP", 16)
    with pytest.raises(ValueError, match="leaves no pixels inside"):
        K._dw_config(40, 40, 10, 10)
    monkeypatch.setattr(K, "BLOCK_CAP", 32)
    assert K._dw_config(40, 40, 10, 12)[:2] == (32, 32)


def test_msca_bad_input(device):
    m = MSCA(4).to(device)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(4, 8, 8, device=device))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 5, 8, 8, device=device))
    with pytest.raises(TypeError, match="floating"):
        from fastseg.ops import msca
        convs = [getattr(m, n) for n in ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2")]
        msca(torch.ones(1, 4, 3, 3, dtype=torch.int32, device=device), [c.weight for c in convs],
             [c.bias for c in convs], m.conv3.weight, m.conv3.bias)
    if device == "cpu":  # the interpreter's bf16 tl.dot is wrong: a clear error instead of garbage
        with pytest.raises(TypeError, match="bfloat16"):
            m.to(torch.bfloat16)(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16))


def test_msca_empty_and_double_backward(device):
    ref, fused = _pair(3, torch.float32, device)
    x0 = torch.randn(0, 3, 5, 6, device=device)
    assert fused(x0).shape == ref(x0).shape == x0.shape  # an empty batch is valid, as for the reference
    x = torch.randn(1, 3, 4, 5, device=device, requires_grad=True)
    gx, = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()  # second order is not implemented: an error, never silently missing terms


def test_msca_weights_changed_in_place(device, triton_launches):
    # the packed / cast weights are cached per weight version: an optimizer step (in-place) must be seen
    ref, fused = _pair(5, torch.float32, device)
    opt = torch.optim.SGD(fused.parameters(), lr=0.05)
    x = torch.randn(1, 5, 6, 7, device=device)
    for step in range(2):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4, msg=f"step {step}")
        opt.zero_grad()
        fused(x).square().mean().backward()
        before = fused.conv0.weight.detach().clone()
        opt.step()
        assert not torch.equal(before, fused.conv0.weight)
        ref.load_state_dict(fused.state_dict())
    with torch.no_grad():  # copy_ into one strip weight only
        fused.conv2_2.weight.copy_(torch.randn_like(fused.conv2_2.weight))
        ref.conv2_2.weight.copy_(fused.conv2_2.weight)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    fused.load_state_dict(AttentionModule(5).to(device).state_dict())  # fresh weights via load_state_dict
    ref.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


def test_msca_launches_per_step(device, triton_launches):
    # one forward + backward: 1 + 4 Triton launches and no other torch op (weights packed once per version)
    from fastseg.bench.opcount import count

    _, fused = _pair(4, torch.float32, device)
    x = torch.randn(1, 4, 5, 6, device=device, requires_grad=True)
    res = count(lambda: fused(x), [x, *fused.parameters()])
    fwd, bwd = res["forward"], res["backward"]
    assert set(fwd["kernels"]) | set(bwd["kernels"]) == _kernels(x), (fwd, bwd)
    assert fwd["kernels"] == ({"msca_fused_fwd": 1} if K.use_fused_fwd(x) else {"msca_dw_fwd": 1, "msca_pw_fwd": 1})
    assert fwd["aten"] == {} and bwd["aten"] == {}, (fwd["aten"], bwd["aten"])
    assert fwd["launches"] + bwd["launches"] <= 8


def _nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors: an output or partial element a kernel never
    writes shows up as NaN instead of passing by luck as a fresh (often zero) allocation."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.device.type != "meta" else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("N,C,H,W,channels_last,dtype,bc", [
    (3, 17, 1, 19, False, EXACT, None),         # one row, 3 tiles across (the last 3 wide), a 1-channel chunk
    (1, 33, 47, 3, True, EXACT, None),          # 4 tiles down, 3 chunks (the last: 1 channel)
    (2, 17, 5, 1, True, torch.float32, None),   # one column, channels_last
    (1, 20, 9, 11, False, EXACT, 4),            # 4 channel blocks per chunk (the GPU runs 16 of BC = 1)
    (2, 5, 6, 7, True, torch.float32, 2),       # C < 16: 3 blocks of 2, the last half masked
    (1, 17, 1, 1, True, EXACT, None),           # 1x1 planes in channels_last: g gets x's exact strides
])
def test_msca_twopass_edges(N, C, H, W, channels_last, dtype, bc, device, triton_launches, monkeypatch):
    # the default backward's second pass at odd shapes: (tile, chunk) decoding, partial chunks and channel
    # blocks, planes thinner than a tile; every output and partial starts as NaN (nothing may stay unwritten)
    if device != "cpu":
        pytest.skip("interpreter shapes (the GPU cases run at the real block size above)")
    monkeypatch.setattr(K, "BLOCK_CAP", 32)
    if bc is not None:
        cb = K._channel_block
        monkeypatch.setattr(K, "_channel_block", lambda C_, RH, RW: min(cb(C_, RH, RW), bc))
    _nan_empty(monkeypatch)
    _check(N, C, H, W, channels_last, dtype, device, triton_launches)
    assert triton_launches["msca_dw_pw_bwd"] == 1
