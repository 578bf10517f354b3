"""Wall time of ``fastseg.patch`` on a whole Mask2Former (MSCAN-T backbone, official decoder sizes: 9
cross-attention layers) with ``verify=True`` (probe on the model's device and dtype), ``verify="cpu"`` and
``verify=False``, each on a fresh model, twice in one process: the first ``verify=True`` call on a GPU
includes compiling / autotuning the kernels for the probe shapes, the second reuses them. Prints one line per
call and the time of every probe (``ProbeResult.seconds``).

    python3 benchmarks/patch_probe_time.py --device cuda --dtype bf16 [--train]
"""
from __future__ import annotations

import argparse
import time

import torch

import fastseg
from fastseg.models import build_mask2former

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backbone", default="mscan_t")
    p.add_argument("--train", action="store_true", help="model in training mode (probes compare gradients too)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"fastseg.patch on build_mask2former({args.backbone!r}, 150), {device}, {args.dtype}, "
          f"{'train' if args.train else 'eval'}")
    for verify in (True, True, "cpu", False):
        torch.manual_seed(0)
        model = build_mask2former(args.backbone, 150).to(device=device, dtype=dtype).train(args.train)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, report = fastseg.patch(model, verify=verify)
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        print(f"verify={verify!r}: {took:.3f} s; replaced {len(report.replaced)}, verified {len(report.verified)}, "
              f"skipped {len(report.skipped)}")
        for pr in report.probes:
            print(f"   {pr.module} x{len(pr.paths)} [{pr.op}]: {pr.seconds:.3f} s, ok={pr.ok}, {pr.summary()}")
        for s in report.skipped:
            print(f"   skipped {s[0]}: {s[2]}")


if __name__ == "__main__":
    main()
