"""Fused bilinear upsample + per-pixel cross-entropy vs F.interpolate + F.cross_entropy, forward and gradient."""
import pytest
import torch
import torch.nn.functional as F

from fastseg import _backend
from fastseg._backend import interpreter_enabled
from fastseg.ops.upsample_ce import upsampled_cross_entropy

from helpers import TOL, assert_close

EXACT = torch.float64 if interpreter_enabled() else torch.float32


def _ref(x, t, align_corners, ignore_index=255):
    up = F.interpolate(x, size=t.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, t, ignore_index=ignore_index, reduction="none")


def _target(B, K, H, W, device, ignore_frac=0.2, ignore_index=255, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, K, (B, H, W), generator=g)
    t[torch.rand((B, H, W), generator=g) < ignore_frac] = ignore_index
    return t.to(device)


@pytest.mark.parametrize("B,K,h,w,H,W,align_corners,dtype", [
    (2, 5, 3, 4, 7, 9, False, EXACT),     # upsampling by odd factors
    (2, 5, 3, 4, 7, 9, True, EXACT),
    (1, 70, 4, 6, 16, 24, False, EXACT),  # two class chunks, stride 4
    (1, 7, 5, 5, 5, 5, True, torch.float32),  # same size
    (2, 3, 6, 4, 2, 3, False, EXACT),     # downsampling
    (1, 4, 1, 3, 4, 1, True, EXACT),      # a 1-wide output (align_corners scale 0)
])
def test_upsampled_cross_entropy(B, K, h, w, H, W, align_corners, dtype, device, triton_launches):
    x = torch.randn(B, K, h, w, device=device, dtype=dtype) * 2
    t = _target(B, K, H, W, device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ref = _ref(xs[0], t, align_corners)
    out = upsampled_cross_entropy(xs[1], t, align_corners)
    assert out.dtype == dtype and out.shape == (B, H, W)
    assert_close(out, ref, TOL[dtype], "loss")
    assert (out[t == 255] == 0).all()
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert_close(xs[1].grad, xs[0].grad, TOL[dtype], "d logits")
    assert triton_launches["upsample_ce_fwd"] == 1 and triton_launches["upsample_ce_bwd"] == 1


def test_strided_logits_and_other_ignore_index(device, triton_launches):
    x = torch.randn(2, 6, 5, 4, device=device, dtype=EXACT).to(memory_format=torch.channels_last)
    x = x.requires_grad_()
    t = _target(2, 6, 9, 11, device, ignore_index=-1)[:, None]  # (B, 1, H, W) accepted
    out = upsampled_cross_entropy(x, t, False, ignore_index=-1)
    xr = x.detach().contiguous().requires_grad_()
    ref = _ref(xr, t[:, 0], False, ignore_index=-1)
    assert_close(out, ref, TOL[EXACT], "loss")
    out.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, xr.grad, TOL[EXACT], "d logits")
    assert triton_launches["upsample_ce_fwd"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype, device, triton_launches):
    x = (torch.randn(1, 9, 4, 5, device=device) * 3).to(dtype)
    t = _target(1, 9, 10, 13, device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out = upsampled_cross_entropy(xs[1], t, True)
    ref = _ref(xs[0].float(), t, True)  # the fused op accumulates in fp32 from the half inputs
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-5, "loss")
    g = torch.rand_like(ref)
    out.backward(g)
    ref.backward(g)
    assert xs[1].grad.dtype == dtype
    assert_close(xs[1].grad.float(), xs[0].grad.float(), TOL[dtype], "d logits")
    assert triton_launches["upsample_ce_bwd"] == 1


def test_torch_backend_matches():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = _target(2, 4, 6, 5, "cpu")
    with _backend.use_backend("torch"):
        out = upsampled_cross_entropy(x, t, False)
    assert_close(out, _ref(x, t, False), 1e-12)


@pytest.mark.parametrize("bad", [3, -2, 2 ** 32 + 1])  # the last one would wrap to 1 as an int32
def test_out_of_range_labels_are_nan(bad, device, triton_launches):
    # no host check on the Triton path (it would make every call wait for the GPU): NaN at those pixels only
    x = torch.randn(1, 3, 2, 2, device=device, requires_grad=True)
    t = torch.zeros(1, 4, 4, dtype=torch.long, device=device)
    t[0, 1, 2] = bad
    t[0, 0, 0] = 255
    loss = upsampled_cross_entropy(x, t)
    assert triton_launches["upsample_ce_fwd"] == 1
    nan = loss.isnan()
    assert nan[0, 1, 2] and nan.sum() == 1 and loss[0, 0, 0] == 0
    loss.nan_to_num(0.0).sum().backward()  # the NaN pixel's gradient is NaN even with a 0 upstream gradient
    assert x.grad.isnan().any()
    x2 = x.detach().clone().requires_grad_(True)
    t[0, 1, 2] = 0
    upsampled_cross_entropy(x2, t).sum().backward()
    assert x2.grad.isfinite().all()


def test_bad_input():
    x = torch.randn(1, 3, 2, 2)
    with _backend.use_backend("torch"):  # the plain path on CPU checks the labels on the host (free there)
        with pytest.raises(ValueError, match=r"in \[0, 3\)"):
            upsampled_cross_entropy(x, torch.full((1, 4, 4), 3))
        with pytest.raises(ValueError, match=r"in \[0, 3\)"):
            upsampled_cross_entropy(x, torch.full((1, 4, 4), -2))
    with pytest.raises(TypeError, match="integer"):
        upsampled_cross_entropy(x, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="target must be"):
        upsampled_cross_entropy(x, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        upsampled_cross_entropy(x[0], torch.zeros(1, 4, 4, dtype=torch.long))
