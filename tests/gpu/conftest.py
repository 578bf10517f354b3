"""GPU correctness tests (``pytest tests/gpu``): run on CUDA; skipped without one unless FASTSEG_GPU_DRYRUN=1,
where they run at tiny shapes in fp32 under the Triton interpreter (the dry run of benchmarks/gpu_check.sh)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from poison import _poisoned_cuda_memory  # noqa: E402,F401  (autouse: every test starts poisoned)

DRY = os.environ.get("FASTSEG_GPU_DRYRUN") == "1"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    if torch.cuda.is_available() or DRY:
        return
    skip = pytest.mark.skip(reason="GPU tests: need CUDA (or FASTSEG_GPU_DRYRUN=1 with TRITON_INTERPRET=1)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
