"""``fastseg inspect``: launch capture + sm_90 compile on a CPU, and the MSCA / MLP dwconv resource rules.

The rules (issue 12), at a benchmark shape: every config an autotuner can pick and every default spills 0 B
in bf16 (<= 256 B in fp32), fits 227 KB of shared memory, and every bf16 GEMM kernel uses tensor cores
(wgmma / mma). Compiled in a child process (TRITON_INTERPRET must be off to build for the GPU)."""
import json
import os
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
            "_dwgelu_fwd_kernel",
            "_dwgelu_bwd_dz_kernel", "_dwgelu_bwd_dx_kernel", "_sum_rows_kernel"} <= names, names
    assert I.violations(rows) == []
    for r in rows:  # every bf16 GEMM on tensor cores
        if r["kernel"] in ("_msca_pw_fwd_kernel", "_msca_pw_bwd_kernel", "_msca_w3_bwd_kernel",
                           "_msca_fused_fwd_kernel", "_msca_pw_w3_bwd_kernel", "_msca_fused_bwd_kernel"):
            assert r["wgmma"] + r["mma"] > 0, r
