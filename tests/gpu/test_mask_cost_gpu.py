"""MaskFormer's fused matcher costs on the GPU, compiled: (Q, T) focal / dice costs against the official
formulas in float64 on the same rounded inputs, at the ADE20K 512² shape (Q=100, T=30, 128x128 logits), from
logits and from embeddings x features, fp32 (exact and TF32) / bf16 / fp16; the fused matcher's assignment
is optimal for the float64 costs. Dry run (FASTSEG_GPU_DRYRUN=1, interpreter): tiny shapes, fp32."""
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastseg import ops
from fastseg.models.maskformer import MaskFormerMatcher, batch_sigmoid_focal_loss
from fastseg.models.matcher import batch_dice_loss

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEV = "cuda" if CUDA else "cpu"
CASES = [("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False),
         ("fp16", torch.float16, False)] if CUDA else [("fp32", torch.float32, False)]
# max abs error of the costs (O(1) values) against float64
ATOL = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 1e-4, "fp16": 1e-4}
# per matched pair: 2 x (20·focal + dice + class) errors; the class cost is a 16-bit softmax in both paths
SLACK = {"fp32": 1e-3, "tf32": 0.1, "bf16": 0.02, "fp16": 0.01}


def _gen(*key):
    return torch.Generator(device=DEV).manual_seed(zlib.crc32(repr(key).encode()))


def _official(x, target, padded):
    Hp, Wp = padded
    t = F.pad(target.double(), (0, Wp - target.shape[2], 0, Hp - target.shape[1]))
    t = F.interpolate(t[:, None], size=x.shape[-2:], mode="nearest")[:, 0].flatten(1)
    return batch_sigmoid_focal_loss(x.double().flatten(1), t), batch_dice_loss(x.double().flatten(1), t)


@pytest.fixture
def tf32_switch():
    old = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name,dtype,tf32", CASES, ids=[c[0] for c in CASES])
def test_mask_costs(name, dtype, tf32, tf32_switch, triton_launches):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    Q, T, C, h, w, H, W = (100, 30, 256, 128, 128, 509, 511) if CUDA else (9, 5, 16, 7, 6, 27, 25)
    padded = (H + 3, W + 1)
    g = _gen("mask_cost", name)
    x = (torch.randn(Q, h, w, generator=g, device=DEV) * 4).to(dtype)
    e = (torch.randn(Q, C, generator=g, device=DEV) / C ** 0.5 * 4).to(dtype)
    feats = torch.randn(C, h, w, generator=g, device=DEV).to(dtype)
    tgt = torch.rand(T, H, W, generator=g, device=DEV) > 0.7
    tgt[1] = False
    tgt[2] = True
    runs = [(ops.matcher_mask_costs(x, tgt, padded), _official(x, tgt, padded)),
            (ops.matcher_mask_costs_from_embeddings(e, feats, tgt, padded),
             _official(torch.einsum("qc,chw->qhw", e.double(), feats.double()), tgt, padded))]
    for (focal, dice), (rf, rd) in runs:
        for a, b, what in ((focal, rf, "focal"), (dice, rd, "dice")):
            assert a.dtype == torch.float32 and torch.isfinite(a).all(), what
            err = (a.double() - b).abs().max().item()
            assert err < ATOL[name], f"{what}: max abs error {err:.2e}"
    assert triton_launches["mask_cost"] == 2 and triton_launches["mask_cost_finalize"] == 2


@pytest.mark.parametrize("name,dtype,tf32", CASES, ids=[c[0] for c in CASES])
def test_fused_matcher_assignment_is_optimal(name, dtype, tf32, tf32_switch, triton_launches):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    B, Q, h, w = (4, 100, 128, 128) if CUDA else (2, 9, 7, 6)
    g = _gen("matcher", name)
    sizes = [(512, 512, 30), (500, 480, 0), (480, 512, 55), (512, 300, 7)] if CUDA else \
        [(27, 25, 4), (20, 28, 3)]
    targets = [{"labels": torch.randint(0, 150, (T,), generator=g, device=DEV),
                "masks": torch.rand(T, H, W, generator=g, device=DEV) > 0.6} for H, W, T in sizes[:B]]
    outputs = {"pred_logits": torch.randn(B, Q, 151, generator=g, device=DEV).to(dtype),
               "pred_masks": (torch.randn(B, Q, h, w, generator=g, device=DEV) * 3).to(dtype)}
    ref = MaskFormerMatcher(1, 20, 1)
    exact = ref.cost_matrices({k: v.double() for k, v in outputs.items()}, targets)
    fused = MaskFormerMatcher(1, 20, 1, fused=True)
    for (i, j), (ri, rj), C in zip(fused(outputs, targets), ref({k: v.double() for k, v in outputs.items()},
                                                                 targets), exact):
        C = C.cpu()
        assert len(i) == len(ri) == min(C.shape)
        got, best = C[i, j].sum().item(), C[ri, rj].sum().item()
        assert got <= best + SLACK[name] * len(i), (got, best)
    assert triton_launches["mask_cost"] == 1  # the whole batch in one launch
