"""GPU micro-benchmark of the fused MSCA module (fastseg.nn.MSCA) against eager PyTorch (cuDNN).

    python benchmarks/bench_msca_kernel.py --out msca_bench.json [--dtype bf16] [--batch 8] [--formats nchw,cl]

For each real MSCAN stage shape it times forward and forward+backward (triton.testing.do_bench, median ms) of
fused vs eager (same weights, same memory format), peak memory of forward+backward, and the forward roofline:
bandwidth floor = 2 * numel * bytes (read x once, write y once) / HBM bandwidth, compute floor = 103
depthwise MACs per element on FP32 FMA + 2*C FLOPs per element (1x1) on tensor cores, and the fraction of
the larger floor the fused forward reaches. The first call compiles the kernels (the depthwise backward
takes about a minute per dtype and memory format).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

from fastseg.nn import MSCA
from fastseg.reference import AttentionModule

# (name, C, H, W): MSCAN-T/B stage shapes of 512x512 (ADE20K) and 1024x1024 (Cityscapes), and 512x683 (ADE20K
# test images keep their aspect ratio: stage 1 is 128x171).
SHAPES = [
    ("T.s1@512", 32, 128, 128), ("B.s1@512x683", 64, 128, 171), ("B.s2@512", 128, 64, 64),
    ("T.s3@512", 160, 32, 32), ("B.s3@1024", 320, 64, 64), ("B.s4@512", 512, 16, 16),
    ("tiny", 4, 9, 13),  # smoke test only (--shapes tiny --device cpu)
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TAP_MACS = 25 + 2 * (7 + 11 + 21)


def _peaks(name: str, dtype: torch.dtype):
    """(HBM bytes/s, FP32 FMA FLOP/s, tensor-core FLOP/s for the 1x1) of an H100 (SXM unless PCIe)."""
    if "H100" in name and "PCIe" in name:
        bw, fp32, tc = 2.0e12, 51e12, 756e12
    elif "H200" in name:
        bw, fp32, tc = 4.8e12, 67e12, 989e12
    else:
        bw, fp32, tc = 3.35e12, 67e12, 989e12
    if dtype == torch.float32:
        tc /= 2  # TF32
    return bw, fp32, tc


DEV = "cuda"


def _time(fn):
    if DEV != "cuda":  # smoke test on CPU (TRITON_INTERPRET=1): one timed call
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def _device_name():
    return torch.cuda.get_device_name() if DEV == "cuda" else DEV


def _peak_mem(fn):
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_one(name, N, C, H, W, dtype, channels_last):
    dev = DEV
    ref = AttentionModule(C).to(dev, dtype)
    fused = MSCA(C).to(dev, dtype)
    fused.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn_like(x)
    with torch.no_grad():
        err = ((fused(x).float() - ref(x).float()).norm() / ref(x).float().norm()).item()

    def fwd(m):
        with torch.no_grad():
            return m(x)

    def fwd_bwd(m):
        x.grad = None
        for p in m.parameters():
            p.grad = None
        m(x).backward(g)

    row = dict(shape=name, N=N, C=C, H=H, W=W, dtype=str(dtype).split(".")[-1],
               format="channels_last" if channels_last else "nchw", rel_err_fwd=err)
    for tag, m in (("fused", fused), ("eager", ref)):
        row[f"{tag}_fwd_ms"] = _time(lambda: fwd(m))
        row[f"{tag}_fwdbwd_ms"] = _time(lambda: fwd_bwd(m))
        row[f"{tag}_fwdbwd_peak_MiB"] = _peak_mem(lambda: fwd_bwd(m))
    bw, fp32, tc = _peaks(_device_name(), dtype)
    numel = N * C * H * W
    bw_floor = 2 * numel * x.element_size() / bw * 1e3
    compute_floor = (2 * TAP_MACS * numel / fp32 + 2 * C * numel / tc) * 1e3
    row.update(bw_floor_ms=bw_floor, compute_floor_ms=compute_floor,
               roofline_fraction=max(bw_floor, compute_floor) / row["fused_fwd_ms"],
               speedup_fwd=row["eager_fwd_ms"] / row["fused_fwd_ms"],
               speedup_fwdbwd=row["eager_fwdbwd_ms"] / row["fused_fwdbwd_ms"])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--formats", default="cl,nchw", help="comma list of cl, nchw (MSCAN feeds MSCA channels_last)")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    dtype = DTYPES[args.dtype]
    wanted = args.shapes.split(",") if args.shapes else [s[0] for s in SHAPES if s[0] != "tiny"]
    shapes = [s for s in SHAPES if s[0] in wanted]
    t0 = time.time()
    rows = []
    hdr = (f"{'shape':>14} {'fmt':>5} {'C':>4} {'HxW':>8} | {'fwd ms':>7} {'eager':>7} {'x':>5} | {'f+b ms':>7} "
           f"{'eager':>7} {'x':>5} | {'MiB':>6} {'eager':>6} | {'bw fl':>6} {'cmp fl':>6} {'roof%':>5} | err")
    print(_device_name(), args.dtype, f"batch {args.batch}")
    print(hdr)
    for fmt in args.formats.split(","):
        for name, C, H, W in shapes:
            r = bench_one(name, args.batch, C, H, W, dtype, fmt == "cl")
            rows.append(r)
            print(f"{name:>14} {fmt:>5} {C:>4} {f'{H}x{W}':>8} | {r['fused_fwd_ms']:7.3f} {r['eager_fwd_ms']:7.3f} "
                  f"{r['speedup_fwd']:5.2f} | {r['fused_fwdbwd_ms']:7.3f} {r['eager_fwdbwd_ms']:7.3f} "
                  f"{r['speedup_fwdbwd']:5.2f} | {r['fused_fwdbwd_peak_MiB']:6.0f} {r['eager_fwdbwd_peak_MiB']:6.0f} | "
                  f"{r['bw_floor_ms']:6.3f} {r['compute_floor_ms']:6.3f} {100 * r['roofline_fraction']:5.1f} | "
                  f"{r['rel_err_fwd']:.1e}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=_device_name(), dtype=args.dtype, batch=args.batch, rows=rows,
                       wall_s=time.time() - t0), f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
