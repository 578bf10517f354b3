"""Mask2Former's attention mask packed straight from query embeddings (sign-and-pack GEMM kernel)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES_EXACT, EXACT

import fastseg
from fastseg import ops


def mask2former_reference_mask(emb, feat_full, size):
    """The official recipe: full-res logits, bilinear resize, sigmoid < 0.5, empty rows reset. True = allowed."""
    logits = torch.einsum("bqc,bchw->bqhw", emb, feat_full)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    masked = (logits.sigmoid().flatten(2) < 0.5)
    masked[torch.where(masked.sum(-1) == masked.shape[-1])] = False
    return ~masked


@pytest.mark.parametrize("dtype", DTYPES_EXACT)
def test_packed_mask_matches_mask2former_recipe(device, triton_launches, dtype):
    B, Q, C, H4, W4, size = 2, 19, 24, 26, 22, (13, 11)  # 143 pixels: not a multiple of 32
    emb = torch.randn(B, Q, C, device=device, dtype=dtype)
    feat = torch.randn(B, C, H4, W4, device=device, dtype=dtype).abs() + 0.05
    emb[0, 4] = -emb[0, 4].abs()  # every logit negative: must be reset to "attend everywhere"
    emb[1, 7] = emb[1, 7].abs()  # every logit positive
    want = mask2former_reference_mask(emb, feat, size)
    level = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)  # resized once per level
    packed = ops.mask_from_embeddings(emb, level)
    assert "attention_mask_sign_pack" in triton_launches
    assert packed.bits.shape == (B, 1, Q, 5)
    got = ops.unpack_mask(packed)[:, 0]
    if dtype == torch.float64:
        assert torch.equal(got, want)
    else:  # fp32: a logit within rounding of 0 may flip; allow a handful of bits
        assert (got != want).sum() <= 2
    assert got[0, 4].all() and got[1, 7].all()
    with fastseg.use_backend("torch"):
        assert torch.equal(ops.mask_from_embeddings(emb, level).bits, packed.bits)


def test_packed_mask_mixed_dtypes(device, triton_launches):
    # fp32 level features with lower-precision embeddings (Mask2Former under autocast): the kernel rounds the
    # features to the embeddings' dtype itself, bit for bit as feat.to(emb.dtype), and launches no cast
    from fastseg.bench.opcount import count

    B, Q, C, h, w = 2, 9, 24, 5, 13
    emb = torch.randn(B, Q, C, device=device, dtype=torch.float16)
    level = torch.randn(B, C, h, w, device=device, dtype=torch.float32)
    packed = ops.mask_from_embeddings(emb, level)
    cast = ops.mask_from_embeddings(emb, level.to(torch.float16))
    assert torch.equal(packed.bits, cast.bits)
    res = count(lambda: ops.mask_from_embeddings(emb, level).bits, [], grad=False)
    assert res["forward"]["aten"].get("_to_copy", 0) == 0, res["forward"]
    assert res["forward"]["launches"] + sum(res["forward"]["aten"].values()) <= 3, res["forward"]  # issue 12
    with fastseg.use_backend("torch"):
        assert torch.equal(ops.mask_from_embeddings(emb, level).bits, packed.bits)


def test_packed_mask_feeds_attention(device, triton_launches):
    B, Q, C, h, w, E, H = 2, 10, 8, 7, 9, 16, 2
    emb = torch.randn(B, Q, C, device=device, dtype=EXACT)
    level = torch.randn(B, C, h, w, device=device, dtype=EXACT)
    packed = ops.mask_from_embeddings(emb, level)
    mod = fastseg.nn.MaskedCrossAttention(E, H, device=device, dtype=EXACT)
    q = torch.randn(Q, B, E, device=device, dtype=EXACT)
    kv = torch.randn(h * w, B, E, device=device, dtype=EXACT)
    allowed = ops.unpack_mask(packed)  # (B, 1, Q, hw)
    bool_mask = (~allowed).expand(B, H, Q, h * w).reshape(B * H, Q, h * w)
    out_packed = mod(q, kv, kv, attn_mask=packed)[0]
    out_bool = torch.nn.MultiheadAttention.forward(mod, q, kv, kv, attn_mask=bool_mask, need_weights=False)[0]
    torch.testing.assert_close(out_packed, out_bool)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, Q, C\)"):
        ops.mask_from_embeddings(torch.randn(2, 3, 4), torch.randn(2, 5, 6, 6))
