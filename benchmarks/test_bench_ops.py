"""pytest-benchmark cases: a representative shape per op, fastseg vs its eager baseline (fwd and fwd+bwd).

The full sweeps with every baseline, tables and plots are `fastseg bench` / `benchmarks/run_all.py`.
"""
import pytest

from conftest import run_case

CASES = {
    # Cityscapes stride-8 level, Q=200, batch 2, 30 % mask density
    "masked-attention": ({"B": 2, "Q": 200, "H": 128, "W": 256, "density": 0.3}, ["fastseg", "eager", "sdpa"]),
    # MSCAN-T stage 1 at 512x512, batch 16
    "msca": ({"B": 16, "C": 32, "H": 128, "W": 128}, ["fastseg", "eager", "eager-cl"]),
    # MSCAN-T stage 1 MLP (32 -> 256 channels) at 512x512, batch 16
    "mlp-dwconv": ({"B": 16, "C": 32, "hidden": 256, "H": 128, "W": 128}, ["fastseg", "eager", "eager-cl"]),
    # coc_tiny stage 1 at 224x224, batch 128
    "context-cluster": ({"B": 128, "dim": 32, "H": 56, "W": 56, "fold": 8, "heads": 4, "head_dim": 24},
                        ["fastseg", "eager"]),
    "mscan": ({"model": "t", "B": 16, "H": 512, "W": 512}, ["fastseg", "fastseg-all", "eager"]),
    "coc": ({"model": "tiny", "B": 128, "H": 224, "W": 224}, ["fastseg", "eager"]),
    "mask2former-decoder": ({"B": 2, "Q": 200, "H": 1024, "W": 2048}, ["fastseg", "reference"]),
    "mask2former": ({"B": 2, "Q": 200, "H": 1024, "W": 2048}, ["fastseg", "reference"]),
}
PARAMS = [pytest.param(op, impl, mode, id=f"{op}-{impl}-{mode}")
          for op, (_, impls) in CASES.items() for impl in impls for mode in ("fwd", "fwdbwd")]


@pytest.mark.parametrize("op, impl, mode", PARAMS)
def test_bench(benchmark, op, impl, mode):
    run_case(benchmark, op, impl, CASES[op][0], "bf16", mode)
