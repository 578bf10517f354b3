"""Registers, spills and shared memory of the masked-attention kernels compiled for sm_90 (no GPU needed).

    python benchmarks/masked_attention_resources.py [kernels-module-file] [kernel ...]

Compiles every autotune config (and the FASTSEG_AUTOTUNE=0 default) of the forward, dq and dk/dv kernels
for head dim 32 (Mask2Former; BLOCK_D = 32) in fp32 / bf16 / fp16 with Triton's bundled ptxas and prints
registers and spill bytes (ptxas -v) and ``metadata.shared`` per config (fp32 dots: ieee, or
FP32_PRECISION=tf32; DROPOUT=1 compiles the dropout
variant; DTYPES=fp32,bf16 restricts the dtypes). Run with TRITON_INTERPRET unset. The numbers do
not depend on Q / L / B·heads (runtime integers), only on the tile shape, warps, stages, dtype and flags.
An optional first argument loads the kernels from another file (e.g. an older version, for before/after).
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _load(path):
    if path is None:
        from fastseg.kernels import masked_attention
        return masked_attention
    spec = importlib.util.spec_from_file_location("masked_attention_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_sm90(kernel, pointers, constexprs, num_warps, num_stages):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = {a: "constexpr" if a in constexprs else ("*" + pointers[a] if a in pointers else
                                                   ("fp32" if "scale" in a else "i32")) for a in fn.arg_names}
    consts = {a: v for a, v in constexprs.items() if a in fn.arg_names}
    return triton.compile(triton.compiler.ASTSource(fn, sig, constexprs=consts), target=TARGET,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(ck):
    """(registers, spill store bytes, spill load bytes, shared bytes): ptxas -v on the kernel's PTX (CompiledKernel's
    n_regs / n_spills need a GPU driver; metadata.shared is Triton's own shared-memory allocation)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st, ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return regs, st, ld, ck.metadata.shared


def configs(kernel):
    """The kernel's autotune configs (this process: FASTSEG_AUTOTUNE unset -> the tuned space; =0 -> the default)."""
    return [(c.kwargs, c.num_warps, c.num_stages) for c in kernel.configs]


def main():
    args = sys.argv[1:]
    path = args.pop(0) if args and args[0].endswith(".py") else None
    K = _load(path)
    wanted = set(args) or {"_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_kernel"}
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        if name not in wanted:
            continue
        kernel = getattr(K, name)
        for dname, dt in DTYPES.items():
            if os.environ.get("DTYPES") and dname not in os.environ["DTYPES"].split(","):
                continue
            ptrs = {"Q": dt, "K": dt, "V": dt, "DO": dt, "DK": dt, "DV": dt, "Mask": "i32", "Seed": "i64",
                    "Blocks": "i32", "Counts": "i32", "Flags": "i8", "Acc": "fp32", "Mx": "fp32", "Lsum": "fp32",
                    "LSE": "fp32", "Delta": "fp32", "O": dt, "DQP": "fp32",
                    "DQ": dt if name == "_bwd_dkdv_kernel" else "fp32", "DL": "fp32"}
            for kw, w, st in configs(kernel):
                prec = os.environ.get("FP32_PRECISION", "ieee") if dname == "fp32" else "ieee"
                c = dict(HAS_MASK=True, DROPOUT=os.environ.get("DROPOUT", "0") == "1", PRECISION=prec,
                         ACC=tl.float32, BLOCK_D=32, **kw)
                if name != "_fwd_kernel":
                    c["LOGITS_GRAD"] = False
                t = time.time()
                regs, sp_st, sp_ld, shared = resources(compile_sm90(kernel, ptrs, c, w, st))
                sub = f" SUB_M={kw['SUB_M']}" if "SUB_M" in kw else ""
                print(f"{name} {dname} BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']}{sub} warps={w} stages={st}: "
                      f"regs={regs} spill stores={sp_st}B loads={sp_ld}B shared={shared}B ({time.time() - t:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
    main()
