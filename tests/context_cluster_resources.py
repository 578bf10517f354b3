"""Registers, spills and shared memory of the context-cluster kernels, compiled for sm_90 without a GPU.

Every config the autotuner may pick (after its pruning) for fp32 / fp16 / bf16 at coc_tiny's stage-1 shape
(224x224 images, batch 128: a 56x56 map, 4 heads of 24 channels, folds 8x8 -> 7x7 regions, 2x2 proposals; the
packed f/v conv output as input), specialised as a launch would be (16-aligned pointers, divisible-by-16 and
==1 integer arguments). Spills and registers come from the bundled ptxas (``-v``) on the PTX, shared memory
from the compiled kernel's metadata. Run with TRITON_INTERPRET unset; prints one JSON line per kernel build:
    python tests/context_cluster_resources.py [stage ...]     # stages 1-4 (default 1)
    python tests/context_cluster_resources.py tf32            # tl.dot path (M = 16), TF32 off / on
(tests/test_context_cluster_resources.py runs it in a subprocess and checks the limits.)
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

from fastseg.kernels import context_cluster as K

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# coc_tiny at 224x224: map, heads, fold per stage (head_dim 24, proposals 2x2 everywhere)
STAGES = {1: (56, 4, 8), 2: (28, 4, 4), 3: (14, 8, 2), 4: (7, 8, 1)}
IO = ("x_ptr", "v_ptr", "out_ptr", "g_ptr", "dx_ptr", "dv_ptr")


def stage_ints(stage: int, batch: int = 128, head_dim: int = 24) -> dict:
    d, e, f = STAGES[stage]
    r = d // f
    return dict(SB_IN=2 * e * head_dim * d * d, SB_OUT=e * head_dim * d * d, E=e, C=head_dim, D2=d, D3=d, F2=f, F3=f,
                R2=r, R3=r, P2=2, P3=2, N=r * r, M=4)


def ptxas_resources(ptx: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) from ``ptxas -v``."""
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, st, ld


def compile_kernel(kernel, ints: dict, dtype: str, meta: dict, num_warps: int, num_stages: int, maxnreg=None):
    fn = kernel.fn
    sig, attrs, consts = {}, {}, dict(meta)
    for i, a in enumerate(fn.arg_names):
        if a in meta:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*" + (dtype if a in IO else ("i32" if a == "assign_ptr" else "fp32"))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[a] == 1:  # launches specialise integer 1 to a constant
            sig[a], consts[a] = "constexpr", 1
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(triton.compiler.ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                          options=options)


def measure(stage: int = 1, dtypes=("fp32", "fp16", "bf16"), allow_tf32: bool = False, proposals: int = 2,
            kernels=("fwd", "bwd")):
    """Yield one dict per (dtype, kernel, autotune config). ``proposals`` > 2 (M = proposals**2 > 8 centers)
    measures the tl.dot path instead of the loops over the centers; ``allow_tf32`` is torch's switch during
    the launch-parameter choice."""
    ints = stage_ints(stage)
    ints.update(P2=proposals, P3=proposals, M=proposals * proposals)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        for dt in dtypes:
            meta = K.launch_meta(DTYPES[dt], ints["C"], ints["M"], return_center=False)
            for name, kernel in (("fwd", K._coc_fwd_kernel), ("bwd", K._coc_bwd_kernel)):
                if name not in kernels:
                    continue
                configs = kernel.configs
                if kernel.early_config_prune is not None:
                    configs = kernel.early_config_prune(configs, {"x_ptr": torch.empty(0, dtype=DTYPES[dt])}, **meta)
                for cfg in configs:
                    t = time.time()
                    ck = compile_kernel(kernel, ints, dt, {**meta, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                                        cfg.maxnreg)
                    ptx = ck.asm["ptx"]
                    regs, st, ld = ptxas_resources(ptx)
                    yield dict(kernel=name, stage=stage, dtype=dt, **cfg.kwargs, num_warps=cfg.num_warps,
                               maxnreg=cfg.maxnreg, regs=regs, spill_store=st, spill_load=ld, smem=ck.metadata.shared,
                               mma=ptx.count("mma.sync") + ptx.count("wgmma"), tf32=".tf32" in ptx,
                               precision=meta["PRECISION"], seconds=round(time.time() - t, 1))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "tf32":  # the tl.dot path (4x4 proposals, M = 16) with TF32 off and on, fp32 backward
        for allow in (False, True):
            for row in measure(1, ("fp32",), allow_tf32=allow, proposals=4, kernels=("bwd",)):
                print(json.dumps(dict(row, allow_tf32=allow)), flush=True)
    else:
        for st in [int(a) for a in args] or [1]:
            for row in measure(st):
                print(json.dumps(row), flush=True)
