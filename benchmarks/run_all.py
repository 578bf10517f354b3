#!/usr/bin/env python
"""The full GPU sweep: `fastseg bench` per op and `fastseg memprof`, results into benchmarks/results/.

    python benchmarks/run_all.py                      # every op, default presets (each step: --timeout)
    python benchmarks/run_all.py --ops masked-attention,msca   # a subset (split the sweep per op)
    python benchmarks/run_all.py --preset full --dtypes bf16,fp16,fp32 --timeout 1800

Each op runs in its own process (fresh CUDA state, its own time limit); a failing or timed-out op is
reported and the others go on. Writes bench_<op>.{csv,json,png}, memprof_<op>.{csv,json,png} and
run_all.log. Exit status: non-zero if any step failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_OPS = ["masked-attention", "msca", "mlp-dwconv", "context-cluster", "mscan", "coc", "mask2former-decoder",
             "mask2former"]
MEMPROF_OPS = ["masked-attention", "mask2former-decoder", "mask2former", "msca", "context-cluster"]
# whole-model torch.compile baselines compile for minutes: opt in with --model-compile. Without it, only these
# implementations run (`fastseg bench --impl` rejects names an op does not have).
MODEL_OPS = {"mscan": "fastseg,fastseg-all,eager", "coc": "fastseg,eager", "mask2former-decoder": "fastseg,reference",
             "mask2former": "fastseg,reference"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(BENCH_OPS), help="comma-separated ops (default: all)")
    p.add_argument("--preset", default="default")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--timeout", type=int, default=300, help="seconds per step (default 300)")
    p.add_argument("--quick", action="store_true", help="smoke run: --quick shapes, tiny memprof grid")
    p.add_argument("--no-memprof", action="store_true")
    p.add_argument("--budget", default="24GB", help="memprof budget (default 24GB)")
    p.add_argument("--model-compile", action="store_true", help="include torch.compile of whole models")
    args = p.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "run_all.log"), "a")
    cmds = []
    for op in ops:
        cmd = ["bench", op, *(["--quick"] if args.quick else ["--preset", args.preset]), "--dtype", args.dtypes, "--no-progress",
               "--out", os.path.join(args.out_dir, f"bench_{op}"),
               "--plot", os.path.join(args.out_dir, f"bench_{op}.png")]
        if op in MODEL_OPS and not args.model_compile:
            cmd += ["--impl", MODEL_OPS[op]]
        cmds.append((f"bench {op}", cmd))
        if op in MEMPROF_OPS and not args.no_memprof:
            grid = {"masked-attention": ["--batch", "2,8"],
                    "mask2former-decoder": ["--batch", "2", "--queries", "100,200,400"],
                    "mask2former": ["--batch", "2", "--queries", "100,200"]}.get(op, ["--batch", "2,8,16"])
            if args.quick:
                grid = ["--quick"]
            cmds.append((f"memprof {op}", ["memprof", "--op", op, "--budget", args.budget, *grid,
                                           "--dtype", args.dtypes.split(",")[0], "--no-progress",
                                           "--out", os.path.join(args.out_dir, f"memprof_{op}"),
                                           "--plot", os.path.join(args.out_dir, f"memprof_{op}.png")]))
    failed = []
    t_all = time.time()
    for name, cmd in cmds:
        t0 = time.time()
        full = [sys.executable, "-m", "fastseg", *cmd]
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, COLUMNS="200"))
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            out, rc = out + f"\nTIMEOUT after {args.timeout}s", "timeout"
        print(out, flush=True)
        log.write(out + f"\n--- {name}: rc={rc}, {time.time() - t0:.0f}s\n")
        print(f"--- {name}: rc={rc}, {time.time() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(f"{name} ({rc})")
    print(f"total {time.time() - t_all:.0f}s; results in {args.out_dir}")
    if failed:
        print("failed: " + ", ".join(failed))
    log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
