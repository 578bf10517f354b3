"""SegViT's ATM attention on the GPU, compiled: fp32 / bf16 / fp16 at the ViT-B 512² shape (150 classes, 32×32
tokens, 12 heads of 32), output, head-mean logits and every gradient (from both outputs) against the float64
reference on the same rounded inputs, with and without dropout (the kernels' keep mask given to the reference).
Without CUDA (``FASTSEG_GPU_DRYRUN=1``, under TRITON_INTERPRET=1): tiny shapes, fp32 only."""
import os
import zlib

import pytest
import torch

from fastseg import ops
from fastseg.reference import atm_attention as ref_atm
from helpers import assert_close

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ids = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["eval", "dropout"])
def test_atm_attention_op(dtype, p, triton_launches):
    B, H, M, N, D = (2, 12, 150, 1024, 32) if CUDA else (1, 3, 7, 37, 16)
    g = torch.Generator(device=DEV).manual_seed(zlib.crc32(repr(("atm", dtype, p)).encode()))
    q, k, v = (torch.randn((B, H, n, D), generator=g, device=DEV).to(dtype) for n in (M, N, N))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    seed = ops.dropout_seed(DEV)
    out, logits = ops.atm_attention(*leaves, D ** -0.5, p, dropout_seed=seed)
    keep = ops.dropout_keep_mask(seed, B, H, M, N, p) if p > 0 else None
    r_out, r_logits = ref_atm(*ref_leaves, D ** -0.5, keep, p)
    assert out.dtype == dtype and logits.dtype == torch.float32
    assert_close(out, r_out, TOL[dtype], "out")
    assert_close(logits, r_logits, TOL[dtype], "logits")
    go = torch.randn(r_out.shape, generator=g, device=DEV).to(dtype)
    gl = torch.randn(r_logits.shape, generator=g, device=DEV)
    got = torch.autograd.grad((out, logits), leaves, (go, gl))
    want = torch.autograd.grad((r_out, r_logits), ref_leaves, (go.double(), gl.double()))
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, TOL[dtype], f"d{name}")
    assert {"masked_attention_fwd", "masked_attention_combine", "atm_attention_logits", "masked_attention_bwd_dq",
            "masked_attention_bwd_dkdv"} <= set(triton_launches)
