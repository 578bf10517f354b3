"""Fused depthwise 3x3 + bias + GELU (MSCAN's MLP middle) and the MSCANMlp drop-in vs the reference Mlp."""
import pytest
import torch
import torch.nn.functional as F

from fastseg._backend import interpreter_enabled
from fastseg.models.mscan import Mlp
from fastseg.nn import MSCANMlp
from fastseg.ops import dwconv3x3_gelu

from helpers import TOL, assert_close

EXACT = torch.float64 if interpreter_enabled() else torch.float32


KERNELS = {"dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd_dz", "dwconv3x3_gelu_bwd_dx"}


@pytest.mark.parametrize("N,C,H,W,channels_last,dtype", [
    (2, 5, 7, 9, False, EXACT),
    (1, 70, 5, 3, True, EXACT),      # two channel blocks, channels_last
    (1, 3, 1, 17, False, torch.float32),
    (1, 6, 23, 25, True, EXACT),     # 3 pixel blocks under the interpreter: groups of 2 (the second partial)
    (2, 3, 17, 20, False, torch.float32),  # 2 pixel blocks per image, one group
])
def test_dwconv3x3_gelu(N, C, H, W, channels_last, dtype, device, triton_launches):
    x = torch.randn(N, C, H, W, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, 3, 3, device=device, dtype=dtype) * 0.5
    b = torch.randn(C, device=device, dtype=dtype) * 0.5
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    bs = [b.clone().requires_grad_() for _ in range(2)]
    y_ref = F.gelu(F.conv2d(xs[0], ws[0], bs[0], padding=1, groups=C))
    y = dwconv3x3_gelu(xs[1], ws[1], bs[1])
    assert_close(y, y_ref, TOL[dtype], "forward")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    for a, r, name in zip((xs[1], ws[1], bs[1]), (xs[0], ws[0], bs[0]), ("x", "weight", "bias")):
        assert_close(a.grad, r.grad, TOL[dtype], f"grad {name}")
    assert KERNELS <= set(triton_launches)


def test_dwconv3x3_gelu_half(device, triton_launches):
    # fp16: dz is kept in fp16 between the two backward kernels; against the fp64 reference of the same inputs
    N, C, H, W = 1, 6, 9, 11
    x = torch.randn(N, C, H, W, device=device, dtype=torch.float16)
    w = (torch.randn(C, 1, 3, 3, device=device) * 0.5).half()
    b = (torch.randn(C, device=device) * 0.5).half()
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    half = [t.clone().requires_grad_() for t in (x, w, b)]
    y_ref = F.gelu(F.conv2d(ref[0], ref[1], ref[2], padding=1, groups=C))
    y = dwconv3x3_gelu(*half)
    assert y.dtype == torch.float16
    assert_close(y, y_ref, TOL[torch.float16], "forward")
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.half())
    for a, r, name in zip(half, ref, ("x", "weight", "bias")):
        assert_close(a.grad, r.grad, TOL[torch.float16], f"grad {name}")
    assert KERNELS <= set(triton_launches)


def test_mscan_mlp_dropin(device, triton_launches):
    ref = Mlp(4, 12).to(device=device, dtype=EXACT)
    fused = MSCANMlp(4, 12).to(device=device, dtype=EXACT)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 6, 5, device=device, dtype=EXACT, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), fused(x2)
    assert_close(y, y_ref, TOL[EXACT], "forward")
    y_ref.sum().backward()
    y.sum().backward()
    assert_close(x2.grad, x.grad, TOL[EXACT], "grad x")
    named = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, named[name].grad, TOL[EXACT], name)
    assert "dwconv3x3_gelu_fwd" in triton_launches


def test_dwconv3x3_gelu_bad_input(device):
    w, b = torch.randn(4, 1, 3, 3, device=device), torch.randn(4, device=device)
    with pytest.raises(ValueError, match="4-D"):
        dwconv3x3_gelu(torch.randn(4, 5, 5, device=device), w, b)
    with pytest.raises(ValueError, match="channel mismatch"):
        dwconv3x3_gelu(torch.randn(1, 3, 5, 5, device=device), w, b)
