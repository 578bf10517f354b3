"""Masked cross-attention at Mask2Former's shapes: fastseg vs nn.MultiheadAttention eager, SDPA with the
boolean mask, FlexAttention (create_block_mask counted: the mask changes every layer) and torch.compile.

    python benchmarks/bench_masked_attention.py --quick --out benchmarks/results/masked_attention.json

Needs a CUDA GPU. Times are medians of ``triton.testing.do_bench`` (ms); memory is the peak allocated
during one call beyond the inputs (MiB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from fastseg.nn import MaskedCrossAttention

LEVELS = {"512x512": [(16, 16), (32, 32), (64, 64)], "1024x1024": [(32, 32), (64, 64), (128, 128)],
          "1024x2048": [(32, 64), (64, 128), (128, 256)]}


def coherent_mask(B, Q, h, w, density, device, gen):
    """bool (B, Q, h·w), True = allowed: smooth random blobs thresholded per query at the density."""
    noise = torch.rand(B * Q, 1, max(h // 8, 2), max(w // 8, 2), device=device, generator=gen)
    field = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False).view(B, Q, h * w)
    if density >= 1.0:
        return torch.ones_like(field, dtype=torch.bool)
    thr = torch.quantile(field.float(), 1.0 - density, dim=-1, keepdim=True)
    return field >= thr


def env_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:
        commit = "unknown"
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": sys.version.split()[0], "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def make_impls(E, H, dtype, device):
    mha = torch.nn.MultiheadAttention(E, H, device=device, dtype=dtype)
    fused = MaskedCrossAttention.from_mha(mha)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def split(x):  # (S, B, E) -> (B, H, S, D)
        return x.unflatten(-1, (H, E // H)).permute(1, 2, 0, 3)

    def eager(tgt, mem, pos, masked):  # as Mask2Former calls it (need_weights defaults to True)
        return mha(query=tgt, key=mem + pos, value=mem, attn_mask=masked.flatten(0, 1))[0]

    def sdpa(tgt, mem, pos, masked):
        q, k, v = split(F.linear(tgt, w_q, b_q)), split(F.linear(mem + pos, w_k, b_k)), split(F.linear(mem, w_v, b_v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)
        return F.linear(o.permute(2, 0, 1, 3).flatten(-2), mha.out_proj.weight, mha.out_proj.bias)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex_c = torch.compile(flex_attention)

    def flex(tgt, mem, pos, masked):
        allowed = ~masked
        B, Hh, Q, L = allowed.shape
        bm = create_block_mask(lambda b, h, qi, kv: allowed[b, h, qi, kv], B, Hh, Q, L, device=device, _compile=True)
        q, k, v = split(F.linear(tgt, w_q, b_q)), split(F.linear(mem + pos, w_k, b_k)), split(F.linear(mem, w_v, b_v))
        o = flex_c(q, k, v, block_mask=bm)
        return F.linear(o.permute(2, 0, 1, 3).flatten(-2), mha.out_proj.weight, mha.out_proj.bias)

    def fastseg_fn(tgt, mem, pos, masked):
        return fused(query=tgt, key=mem + pos, value=mem, attn_mask=masked.flatten(0, 1))[0]

    compiled = torch.compile(eager)
    params = list(mha.parameters()) + list(fused.parameters())
    return {"fastseg": fastseg_fn, "eager": eager, "sdpa": sdpa, "flex": flex, "compile": compiled}, params


def measure(fn, args, mode, params):
    from triton.testing import do_bench

    def step():
        out = fn(*args)
        if mode == "fwdbwd":
            out.backward(torch.ones_like(out))
        return out

    try:
        step()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        for p in params + list(args):
            p.grad = None
        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        return ms, peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few representative shapes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--impls", default="fastseg,eager,sdpa,flex,compile")
    args = ap.parse_args(argv)
    device = "cuda"
    E, H = 256, 8
    if args.quick:
        cases = [(2, 100, "1024x2048", 2, 0.3, torch.float16), (2, 200, "1024x2048", 2, 0.3, torch.bfloat16),
                 (8, 100, "512x512", 2, 0.3, torch.float16), (2, 200, "1024x2048", 2, 0.05, torch.float16),
                 (2, 200, "1024x2048", 2, 1.0, torch.float16), (2, 100, "1024x2048", 1, 0.3, torch.float32)]
    else:
        cases = [(B, Q, res, lvl, dens, dt) for dt in (torch.float16, torch.bfloat16, torch.float32)
                 for res in LEVELS for lvl in (0, 1, 2) for Q in (100, 200) for B in (2, 8)
                 for dens in (0.05, 0.3, 1.0)]
    impls_wanted = args.impls.split(",")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for B, Q, res, lvl, dens, dtype in cases:
        h, w = LEVELS[res][lvl]
        L = h * w
        impls, params = make_impls(E, H, dtype, device)
        tgt = torch.randn(Q, B, E, device=device, dtype=dtype, requires_grad=True)
        mem = torch.randn(L, B, E, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(L, B, E, device=device, dtype=dtype)
        allowed = coherent_mask(B, Q, h, w, dens, device, gen)
        masked = (~allowed).unsqueeze(1).expand(B, H, Q, L).contiguous()  # Mask2Former repeats over heads
        for mode in ("fwd", "fwdbwd"):
            row = {"B": B, "Q": Q, "input": res, "level": f"{h}x{w}", "L": L, "density": dens,
                   "dtype": str(dtype).replace("torch.", ""), "mode": mode}
            for name in impls_wanted:
                ms, mib = measure(impls[name], (tgt, mem, pos, masked), mode, params)
                row[f"{name}_ms"], row[f"{name}_MiB"] = round(ms, 4), round(mib, 1)
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del impls, params, tgt, mem, pos, masked
        torch.cuda.empty_cache()
    result = {"env": env_info(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
