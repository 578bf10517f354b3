"""``fastseg inspect``: launch capture + sm_90 compile on a CPU, every kernel covered by an inspect case, and
the MSCA / MLP dwconv resource rules.

The rules (issue 12), at a benchmark shape: every config an autotuner can pick and every default spills 0 B
in bf16 (<= 256 B in fp32), fits 227 KB of shared memory, and every bf16 GEMM kernel uses tensor cores
(wgmma / mma). Compiled in a child process (TRITON_INTERPRET must be off to build for the GPU)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastseg.bench import inspect as I

_RULES = r"""
import json, sys
from fastseg.bench import inspect as I
# MSCA: the first 3 default shapes (C = 32, 64: the fused forward / pointwise-backward kernels; C = 160: the
# depthwise + pointwise kernels the op dispatches to above 64 channels)
rows = I.inspect_kernels(["msca"], "default", dtypes=["bf16"], layouts=sys.argv[1].split(","),
                         sass=False, max_shapes=3, kernel=None)
rows += I.inspect_kernels(["mlp_dwconv"], "default", dtypes=["bf16"], layouts=sys.argv[1].split(","),
                          sass=False, max_shapes=1, kernel=None)
print(json.dumps(rows))
"""


#: Kernels no inspect case launches, each with the reason (so the report cannot silently lose one). Empty:
#: every ``*_kernel`` of fastseg.kernels is launched at the default preset.
NOT_IN_REPORT: dict[str, str] = {}

_COVERAGE = r"""
import importlib, json, pkgutil
import fastseg.kernels as KP
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction
from fastseg.bench import inspect as I

def jit_of(v):  # a JITFunction, or an autotune / heuristics wrapper around one -> the JITFunction
    while isinstance(v, (Autotuner, Heuristics)):
        v = v.fn
    return v if isinstance(v, JITFunction) else None

kernels, files = {}, {}
for m in pkgutil.iter_modules(KP.__path__):
    mod = importlib.import_module("fastseg.kernels." + m.name)
    files[mod.__name__] = mod.__file__
    for v in vars(mod).values():
        f = jit_of(v)
        if f is not None and f.__module__ == mod.__name__ and f.__name__.endswith("_kernel"):
            kernels[f"{mod.__name__}.{f.__name__}"] = mod.__name__
launched, errors = {}, []
for fam, gen in I.CASES.items():
    for case in gen("default"):
        if case is None:
            continue
        try:
            with I.capture() as launches:
                case.run()
        except Exception as e:
            errors.append(f"{fam} {case.shape} {case.dtype} {case.layout}: {type(e).__name__}: {e}")
            continue
        for l in launches:
            launched.setdefault(f"{l.jit_fn.__module__}.{l.name}", []).append(fam)
print(json.dumps({"kernels": kernels, "files": files, "launched": launched, "errors": errors}))
"""


def test_every_kernel_is_in_the_report():
    # every @triton.jit *_kernel of fastseg.kernels is launched by some inspect case (capture only, no
    # compiling), with the launchers' GPU paths (TRITON_INTERPRET off, as `fastseg inspect` runs them)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COVERAGE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["errors"] == []  # a launcher an inspect case cannot call would be an error row of the report
    # the introspection finds what the sources define: each `@triton.jit...` + `def *_kernel(` of each module
    in_source = set()
    for mod, path in got["files"].items():
        with open(path) as f:
            src = f.read()
        in_source |= {f"{mod}.{n}" for n in re.findall(r"@triton\.jit\b[^\n]*\ndef (\w+_kernel)\(", src)}
    kernels = set(got["kernels"])
    assert kernels == in_source and "fastseg.kernels.masked_attention._weights_bwd_dq_kernel" in kernels, \
        (kernels ^ in_source)
    launched = set(got["launched"])
    assert launched <= kernels, launched - kernels  # only module-level *_kernel objects are launched
    allowed = {f"fastseg.kernels.{k}" for k in NOT_IN_REPORT}
    assert allowed <= kernels - launched, allowed - (kernels - launched)  # no stale allow-list entry
    missing = kernels - launched - allowed
    assert not missing, f"kernels no fastseg.bench.inspect case launches (add a case): {sorted(missing)}"


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")


def test_capture_reads_the_launchers_arguments():
    # the launcher's own grid / constexprs / specialisation reach the report, without a GPU or a launch
    from fastseg.kernels import msca as K

    x = torch.empty(2, 8, 40, 48, device="meta")
    with I.capture() as launches:
        K.msca_dw_fwd(x, torch.empty(8, K.WPACK, device="meta"))
    (launch,) = launches
    assert launch.name == "_msca_dw_fwd_kernel"
    assert launch.kwargs["RH"] == 64 and launch.kwargs["num_warps"] == 16


def test_rules_msca_mlp_bf16():
    _nvidia_backend()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _RULES, "nchw"], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {r["kernel"] for r in rows}
    assert {"_msca_dw_fwd_kernel", "_msca_pw_fwd_kernel", "_msca_pw_bwd_kernel", "_msca_w3_bwd_kernel",
            "_msca_fused_fwd_kernel", "_msca_pw_w3_bwd_kernel", "_msca_dw_bwd_kernel", "_msca_fused_bwd_kernel",
            "_msca_dw_pw_bwd_kernel", "_dwgelu_fwd_kernel",
            "_dwgelu_bwd_dz_kernel", "_dwgelu_bwd_dx_kernel", "_sum_rows_kernel"} <= names, names
    assert I.violations(rows) == []
    for r in rows:  # every bf16 GEMM on tensor cores
        if r["kernel"] in ("_msca_pw_fwd_kernel", "_msca_pw_bwd_kernel", "_msca_w3_bwd_kernel",
                           "_msca_fused_fwd_kernel", "_msca_pw_w3_bwd_kernel", "_msca_fused_bwd_kernel",
                           "_msca_dw_pw_bwd_kernel"):
            assert r["wgmma"] + r["mma"] > 0, r


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_rules_every_family(dtype, tmp_path):
    """Every kernel family, one benchmark shape each, both layouts, every config an autotuner can pick and every
    default, compiled for sm_90 (child process): 0 B spills in bf16 (<= 256 B in fp32), <= 227 KB shared memory,
    and every bf16 dot on tensor cores (its tt.dot ops counted in the Triton IR). About 1.5 min (bf16) and 3 min
    (fp32) on 2 cores; fp16 builds, which lower like bf16, are in the committed full report
    (benchmarks/results/sm90-static-2026-12-02/all_families.json)."""
    _nvidia_backend()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "fastseg.bench.inspect", "--dtype", dtype, "--max-shapes", "1",
                           "--no-sass", "--json", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["family"] for r in rows} == set(I.CASES), {r["family"] for r in rows}
    assert {r["dtype"] for r in rows} == {dtype}
    assert I.violations(rows) == []
    if dtype == "bf16":
        assert sum(r.get("half_dots", 0) for r in rows) > 0  # the dot count itself works
