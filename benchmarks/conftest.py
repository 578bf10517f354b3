"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only` on a GPU; skipped cleanly without one."""
import pytest
import torch

from fastseg.bench.measure import Unavailable
from fastseg.bench.registry import DTYPES, get_op


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA GPU (on CPU use `fastseg bench`)")
        for item in items:
            item.add_marker(skip)


def run_case(benchmark, op: str, impl: str, shape: dict, dtype: str, mode: str):
    """Benchmark one registered case (see fastseg/bench/ops) with pytest-benchmark; skips if unavailable."""
    spec = get_op(op)
    device = torch.device("cuda")
    try:
        prepared = spec.impl(impl).prepare(spec.full_shape(shape), DTYPES[dtype], device, mode)
    except Unavailable as exc:
        pytest.skip(str(exc))
    prepared.run()  # warm-up / compile
    torch.cuda.synchronize()

    def step():
        prepared.run()
        torch.cuda.synchronize()
    benchmark.extra_info.update(op=op, impl=impl, dtype=dtype, mode=mode, **{k: str(v) for k, v in shape.items()})
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
