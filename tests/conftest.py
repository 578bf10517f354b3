"""Test setup: kernels run under Triton's interpreter on CPU unless a CUDA device is present.

``TRITON_INTERPRET`` must be set before Triton decorates the kernels, hence before importing fastseg.
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import fastseg  # noqa: E402
from fastseg import _backend  # noqa: E402

DEVICE = "cpu" if _backend.interpreter_enabled() or not torch.cuda.is_available() else "cuda"


@pytest.fixture
def device() -> str:
    """The device the kernels are tested on: CPU under the interpreter, else CUDA."""
    if DEVICE == "cpu" and not _backend.interpreter_enabled():
        pytest.skip("no CUDA device and TRITON_INTERPRET is off: the Triton kernels cannot run")
    return DEVICE


@pytest.fixture
def triton_launches():
    """The launch counter, cleared; assert on it to prove the Triton path ran."""
    _backend.launches.clear()
    yield _backend.launches


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons in true fp32: cuDNN convolutions and cuBLAS matmuls default to (or may use) TF32 on
    CUDA, and fastseg's fp32 kernels follow those switches."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
