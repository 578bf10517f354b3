"""Shared assertions for the kernel tests."""
import json
import os
import subprocess
import sys

import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """Shape equal, no NaN/Inf in ``actual``, and relative L2 error below ``tol``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"


TOL = {torch.float64: 1e-8, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# The most exact dtype the kernels run in: fp64 under the interpreter, fp32 on a GPU (fp64 kernels are an
# interpreter-only feature: they exist so the CPU tests can hold the kernels to ~1e-12).
from fastseg._backend import interpreter_enabled  # noqa: E402

EXACT = torch.float64 if (interpreter_enabled() or not torch.cuda.is_available()) else torch.float32
DTYPES_EXACT = [torch.float32] + ([torch.float64] if EXACT == torch.float64 else [])


def sm90_child(args: list[str], timeout: int = 900) -> str:
    """stdout of ``python *args`` run in a child process with TRITON_INTERPRET unset, so that Triton's GPU
    compiler builds for sm_90 with its bundled ptxas (no GPU needed); asserts exit status 0. Skips the test
    where this Triton build has no NVIDIA backend."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def sm90_rows(code: str, timeout: int = 900) -> list:
    """The JSON that ``code`` (a snippet printing it as its last line, e.g. the rows of
    ``fastseg.bench.inspect.inspect_kernels``) prints, run by :func:`sm90_child`."""
    return json.loads(sm90_child(["-c", code], timeout).strip().splitlines()[-1])
