"""GPU benchmark of the fused MSCA module (fastseg.nn.MSCA) against eager PyTorch (cuDNN) and torch.compile.

    python benchmarks/bench_msca_kernel.py --sweep full --out msca_module.json      # the whole issue-4 sweep
    python benchmarks/bench_msca_kernel.py --sweep quick --out q.json               # a few stages, bf16, no compile
    python benchmarks/bench_msca_kernel.py --shapes T.s1@512 --dtypes bf16 --formats cl --out one.json
    TRITON_INTERPRET=1 python benchmarks/bench_msca_kernel.py --device cpu --shapes tiny --out smoke.json

Shapes are the real MSCAN stage shapes: MSCAN-T (channels 32/64/160/256) and MSCAN-B (64/128/320/512) at
strides 4/8/16/32 of 512x512 ADE20K crops (batch 16), 1024x1024 Cityscapes crops (batch 8) and 512x683 ADE20K
test images (aspect ratio kept: stage 1 is 128x171; batch 16). ``--batch`` overrides the batch.

Per (shape, dtype, memory format) it times forward and forward+backward (``triton.testing.do_bench`` median
ms) of fused vs the reference module eager in the same memory format (NCHW rows: eager NCHW = cuDNN; cl rows:
channels_last eager) and ``torch.compile`` of the reference, the peak memory of forward+backward, and the
forward roofline: bandwidth floor = 2 * numel * bytes (read x once, write y once) / HBM bandwidth; compute
floor = 103 depthwise MACs per element on FP32 FMA + 2*C FLOPs per element (the 1x1) on tensor cores (TF32
for fp32); ``roofline_fraction`` = the larger floor / fused forward time. Every case is guarded: an error or
out-of-memory becomes a row with ``status`` and ``error`` and the sweep goes on; the JSON is rewritten after
every case (partial results survive a time limit). The first call per dtype and format compiles the
kernels (the depthwise backward takes about a minute).
"""
from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import torch

from fastseg.bench.measure import is_oom
from fastseg.nn import MSCA
from fastseg.reference import AttentionModule

MSCAN_DIMS = {"T": [32, 64, 160, 256], "B": [64, 128, 320, 512]}
IMAGES = {"512": ((512, 512), 16), "1024": ((1024, 1024), 8), "512x683": ((512, 683), 16)}


def _stage_shapes():
    """{name: (C, H, W, default batch)} for every MSCAN-T/B stage at every image size."""
    out = {}
    for img, ((ih, iw), batch) in IMAGES.items():
        for model, dims in MSCAN_DIMS.items():
            for i, c in enumerate(dims):
                s = 4 * 2 ** i
                out[f"{model}.s{i + 1}@{img}"] = (c, math.ceil(ih / s), math.ceil(iw / s), batch)
    out["tiny"] = (4, 9, 13, 2)  # smoke test only (--shapes tiny --device cpu)
    return out


SHAPES = _stage_shapes()
SWEEPS = {
    "full": dict(shapes=[k for k in SHAPES if k != "tiny"], dtypes="fp32,fp16,bf16", formats="cl,nchw",
                 impls="fused,eager,compile"),
    "default": dict(shapes=["T.s1@512", "B.s1@512x683", "B.s2@512", "T.s3@512", "B.s3@1024", "B.s4@512"],
                    dtypes="bf16", formats="cl,nchw", impls="fused,eager,compile"),
    "quick": dict(shapes=["T.s1@512", "B.s1@512x683", "T.s3@512"], dtypes="bf16", formats="cl",
                  impls="fused,eager"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
TAP_MACS = 25 + 2 * (7 + 11 + 21)  # 103 depthwise taps per output element


def _peaks(name: str, dtype: torch.dtype):
    """(HBM bytes/s, FP32 FMA FLOP/s, dense tensor-core FLOP/s for the 1x1, source) of the GPU."""
    if "H100" in name and "PCIe" in name:
        bw, fp32, tc, src = 2.0e12, 51e12, 756e12, "H100 PCIe datasheet"
    elif "H200" in name:
        bw, fp32, tc, src = 4.8e12, 67e12, 989e12, "H200 datasheet"
    elif "H100" in name or "H800" in name:
        bw, fp32, tc, src = 3.35e12, 67e12, 989e12, "H100 SXM datasheet"
    elif "A100" in name:
        bw, fp32, tc, src = 2.0e12, 19.5e12, 312e12, "A100 80GB SXM datasheet"
    else:
        bw, fp32, tc, src = 3.35e12, 67e12, 989e12, f"unknown GPU {name!r}: H100 SXM peaks assumed"
    if dtype == torch.float32:
        tc /= 2  # TF32
    return bw, fp32, tc, src


DEV = "cuda"


def _time(fn):
    if DEV != "cuda":  # smoke test on CPU (TRITON_INTERPRET=1): one timed call
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


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


def _cleanup():
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def bench_one(name, N, C, H, W, dtype, channels_last, impls):
    """One row; each implementation's failure (OOM, compile error, ...) is recorded in the row."""
    dev = DEV
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    row = dict(shape=name, N=N, C=C, H=H, W=W, dtype=str(dtype).split(".")[-1],
               format="channels_last" if channels_last else "nchw", status="ok", errors={})
    torch.manual_seed(0)
    ref = AttentionModule(C).to(dev, dtype).to(memory_format=fmt)
    fused = MSCA(C).to(dev, dtype).to(memory_format=fmt)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(N, C, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn_like(x)
    mods = {"fused": fused, "eager": ref}
    if "compile" in impls:
        mods["compile"] = torch.compile(ref)

    def fwd(m):
        with torch.no_grad():
            return m(x)

    def fwd_bwd(m):
        m(x).backward(g)

    def clear(m):
        x.grad = None
        for p in m.parameters():
            p.grad = None

    for tag in ("fused", "eager", "compile"):
        if tag not in impls:
            continue
        m = mods[tag]
        try:
            if tag == "fused":
                with torch.no_grad():
                    y, y_ref = fused(x).float(), ref(x).float()
                    row["rel_err_fwd"] = ((y - y_ref).norm() / y_ref.norm()).item()
                del y, y_ref
            row[f"{tag}_fwd_ms"] = _time(lambda: fwd(m))
            row[f"{tag}_fwdbwd_ms"] = _time(lambda: (clear(m), fwd_bwd(m)))
            clear(m)
            row[f"{tag}_fwdbwd_peak_MiB"] = _peak_mem(lambda: fwd_bwd(m))
            clear(m)
        except Exception as exc:  # noqa: BLE001 - a failing case is a row, not the end of the sweep
            row["errors"][tag] = ("OOM: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:400]
            if not is_oom(exc):
                row["errors"][tag] += "\n" + traceback.format_exc(limit=3)[-800:]
            clear(m)
            _cleanup()
    if row["errors"]:
        row["status"] = "partial" if "fused_fwd_ms" in row else "error"
    bw, fp32, tc, src = _peaks(_device_name(), dtype)
    numel = N * C * H * W
    row.update(bw_floor_ms=2 * numel * x.element_size() / bw * 1e3,
               compute_floor_ms=(2 * TAP_MACS * numel / fp32 + 2 * C * numel / tc) * 1e3, peaks=src)
    if "fused_fwd_ms" in row:
        row["roofline_fraction"] = max(row["bw_floor_ms"], row["compute_floor_ms"]) / row["fused_fwd_ms"]
        for base in ("eager", "compile"):
            for mode in ("fwd", "fwdbwd"):
                if f"{base}_{mode}_ms" in row and f"fused_{mode}_ms" in row:
                    row[f"speedup_{mode}_vs_{base}"] = row[f"{base}_{mode}_ms"] / row[f"fused_{mode}_ms"]
    del mods, fused, ref, x, g
    _cleanup()
    return row


def _fmt(v, spec):
    if isinstance(v, (int, float)):
        return format(v, spec)
    width = spec.split(".")[0]
    return format("-", f">{width}") if width.isdigit() else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path (rewritten after every case)")
    ap.add_argument("--sweep", default="default", choices=sorted(SWEEPS),
                    help="preset of shapes/dtypes/formats/impls; the options below override its parts")
    ap.add_argument("--shapes", default="", help=f"comma list of shape names (all: {','.join(SHAPES)})")
    ap.add_argument("--dtypes", "--dtype", default="", help="comma list of fp32, fp16, bf16")
    ap.add_argument("--formats", default="", help="comma list of cl, nchw (MSCAN feeds MSCA channels_last)")
    ap.add_argument("--impls", default="", help="comma list of fused, eager, compile (fused is always run)")
    ap.add_argument("--batch", type=int, default=0, help="override the batch (default: 16 at 512, 8 at 1024)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    preset = SWEEPS[args.sweep]
    shapes = args.shapes.split(",") if args.shapes else preset["shapes"]
    dtypes = (args.dtypes or preset["dtypes"]).split(",")
    formats = (args.formats or preset["formats"]).split(",")
    impls = set((args.impls or preset["impls"]).split(",")) | {"fused"}
    bad = [s for s in shapes if s not in SHAPES] + [d for d in dtypes if d not in DTYPES] \
        + [f for f in formats if f not in ("cl", "nchw")] + [i for i in impls if i not in ("fused", "eager", "compile")]
    if bad:
        ap.error(f"unknown shape/dtype/format/impl: {', '.join(bad)}")
    if DEV != "cuda":
        impls.discard("compile")  # minutes per shape on a CPU
    if "compile" in impls:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 512)
    t0 = time.time()
    rows = []
    print(_device_name(), f"dtypes {dtypes} formats {formats} impls {sorted(impls)}")
    print(f"{'shape':>15} {'dt':>5} {'fmt':>4} {'N':>3} {'C':>4} {'HxW':>8} | {'fwd ms':>7} {'eager':>7} {'comp':>7} | "
          f"{'f+b ms':>7} {'eager':>7} {'comp':>7} | {'MiB':>6} {'eager':>6} {'comp':>6} | {'bw fl':>6} "
          f"{'cmp fl':>6} {'roof%':>5} | err")
    for fmt in formats:
        for dt in dtypes:
            for name in shapes:
                C, H, W, batch = SHAPES[name]
                N = args.batch or batch
                try:
                    r = bench_one(name, N, C, H, W, DTYPES[dt], fmt == "cl", impls)
                except Exception as exc:  # noqa: BLE001 - e.g. OOM while building the case
                    r = dict(shape=name, N=N, C=C, H=H, W=W, dtype=dt, format=fmt, status="error",
                             errors={"setup": f"{type(exc).__name__}: {exc}"[:400]})
                    _cleanup()
                rows.append(r)
                g = r.get
                print(f"{name:>15} {dt:>5} {fmt:>4} {N:>3} {C:>4} {f'{H}x{W}':>8} | {_fmt(g('fused_fwd_ms'), '7.3f')} "
                      f"{_fmt(g('eager_fwd_ms'), '7.3f')} {_fmt(g('compile_fwd_ms'), '7.3f')} | "
                      f"{_fmt(g('fused_fwdbwd_ms'), '7.3f')} {_fmt(g('eager_fwdbwd_ms'), '7.3f')} "
                      f"{_fmt(g('compile_fwdbwd_ms'), '7.3f')} | {_fmt(g('fused_fwdbwd_peak_MiB'), '6.0f')} "
                      f"{_fmt(g('eager_fwdbwd_peak_MiB'), '6.0f')} {_fmt(g('compile_fwdbwd_peak_MiB'), '6.0f')} | "
                      f"{_fmt(g('bw_floor_ms'), '6.3f')} {_fmt(g('compute_floor_ms'), '6.3f')} "
                      f"{_fmt(100 * g('roofline_fraction', float('nan')), '5.1f')} | {_fmt(g('rel_err_fwd'), '.1e')}"
                      + (f"  {r['status']}: {'; '.join(k + ' ' + v.splitlines()[0] for k, v in r['errors'].items())}"
                         if r["status"] != "ok" else ""), flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(device=_device_name(), torch=torch.__version__, sweep=args.sweep, rows=rows,
                                   wall_s=time.time() - t0, complete=False), f, indent=1)
    with open(args.out, "w") as f:
        json.dump(dict(device=_device_name(), torch=torch.__version__, sweep=args.sweep, rows=rows,
                       wall_s=time.time() - t0, complete=True), f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s; {sum(r['status'] != 'ok' for r in rows)} rows with errors)")


if __name__ == "__main__":
    main()
