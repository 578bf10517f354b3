"""The MSCAN encoder and SegNeXt: fused (Triton MSCA) vs reference, forward and backward."""
import pytest
import torch

from fastseg.models import MSCAN, LightHamHead, SegNeXt, mscan_t
from fastseg.models.mscan import Block
from fastseg.nn import MSCA, MSCANBlock, MSCANMlp
from fastseg.reference import AttentionModule

from helpers import EXACT, assert_close

# the most exact dtype the kernels run in: fp64 under the interpreter, fp32 on a GPU





def _tiny(fused):
    torch.manual_seed(0)
    return MSCAN(embed_dims=[8, 8, 16, 16], mlp_ratios=[8, 8, 4, 4], depths=[1, 1, 1, 1], drop_path_rate=0.1,
                 fused=fused)


def _randomize_bn_and_scales(model):
    """Non-trivial BatchNorm running statistics / affine parameters and layer scales (the defaults fold to
    the identity, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.running_mean, m.weight, m.bias):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _no_bn_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            for bn in (m.norm1, m.norm2):
                bn.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_mscan_fused_matches_reference(device, triton_launches):
    ref = _randomize_bn_and_scales(_tiny(False)).to(device=device, dtype=EXACT).eval()
    fused = _tiny("all").to(device=device, dtype=EXACT).eval()  # fused attention, MLP, BN folded in eval
    fused.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, MSCA) for m in fused.modules()) == 4
    assert sum(isinstance(m, MSCANMlp) for m in fused.modules()) == 4
    assert sum(isinstance(m, MSCANBlock) for m in fused.modules()) == 4
    bn_calls = _no_bn_calls(fused)
    assert not any(isinstance(m, MSCANMlp) for m in _tiny(True).modules())
    assert not any(isinstance(m, MSCA) for m in ref.modules())
    x = torch.randn(1, 3, 29, 35, device=device, dtype=EXACT)
    outs_ref, outs = ref(x), fused(x)
    assert [tuple(o.shape) for o in outs] == [(1, 8, 8, 9), (1, 8, 4, 5), (1, 16, 2, 3), (1, 16, 1, 2)]
    for a, b in zip(outs, outs_ref):
        assert_close(a, b, 1e-9 if EXACT == torch.float64 else 1e-4, "stage output")
    w = [torch.randn_like(o) for o in outs_ref]
    sum((o * wi).sum() for o, wi in zip(outs_ref, w)).backward()
    sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
    named = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, named[name].grad, 1e-8 if EXACT == torch.float64 else 1e-3, name)
    assert triton_launches["msca_fused_bwd"] + triton_launches["msca_dw_pw_bwd"] + triton_launches["msca_dw_bwd"] == 4 and triton_launches["dwconv3x3_gelu_bwd_dx"] == 4
    assert not bn_calls, "eval forward of MSCANBlock must fold its BatchNorms, not run them"


@pytest.mark.parametrize("train", [False, True])
def test_mscan_block_bn_fold(train):
    # MSCANBlock alone (reference attention/MLP inside, plain PyTorch): eval folds norm1/norm2 and the layer
    # scales and matches Block forward and every gradient; training mode is the reference forward
    torch.manual_seed(0)
    ref = _randomize_bn_and_scales(Block(8, mlp_ratio=4.0)).double().train(train)
    blk = MSCANBlock.from_block(ref.__class__(8, mlp_ratio=4.0)).double().train(train)
    blk.load_state_dict(ref.state_dict())
    assert list(blk.state_dict()) == list(ref.state_dict()) and blk.mlp.fc1.out_channels == 32
    calls = _no_bn_calls(blk)
    x = torch.randn(2, 7 * 5, 8, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_ref, y = ref(xs[0], 7, 5), blk(xs[1], 7, 5)
    assert_close(y, y_ref, 1e-12, "block output")
    assert bool(calls) == train
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert_close(xs[1].grad, xs[0].grad, 1e-12, "grad x")
    named = dict(ref.named_parameters())
    for name, p in blk.named_parameters():
        assert_close(p.grad, named[name].grad, 1e-12, name)


def test_mscan_bad_fused_flag():
    with pytest.raises(ValueError, match="fused"):
        MSCAN(embed_dims=[8, 8, 16, 16], depths=[1, 1, 1, 1], fused="mlp")


def test_mscan_sizes():
    m = mscan_t()
    assert [getattr(m, f"norm{i}").normalized_shape[0] for i in range(1, 5)] == [32, 64, 160, 256]
    assert [len(getattr(m, f"block{i}")) for i in range(1, 5)] == [3, 3, 5, 2]
    assert m.block1[0].mlp.fc1.out_channels == 256 and m.block3[0].mlp.fc1.out_channels == 640
    assert isinstance(m.block1[0].attn.spatial_gating_unit, AttentionModule)
    keys = set(m.state_dict())
    assert "block1.0.attn.spatial_gating_unit.conv2_2.weight" in keys and "patch_embed1.proj.0.weight" in keys


def test_segnext_forward_backward():
    # reference path only (plain PyTorch): the whole model with the light Hamburger head trains
    torch.manual_seed(0)
    backbone = MSCAN(embed_dims=[8, 16, 32, 32], mlp_ratios=[8, 8, 4, 4], depths=[1, 1, 1, 1])
    head = LightHamHead(in_channels=[16, 32, 32], channels=32, ham_channels=32, num_classes=5,
                        ham_kwargs=dict(MD_S=1, MD_R=4, train_steps=6, eval_steps=7, inv_t=100, rand_init=True))
    model = SegNeXt(backbone, head)
    x = torch.randn(2, 3, 32, 40)
    out = model(x)
    assert out.shape == (2, 5, 32, 40)
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 5, (2, 32, 40)))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decode_head.squeeze[0].weight.grad.abs().sum() > 0
    assert model.backbone.block1[0].attn.spatial_gating_unit.conv2_1.weight.grad.abs().sum() > 0
