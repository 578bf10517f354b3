"""Compile-only resource limits of the context-cluster kernels for the H100/H200 (sm_90), without a GPU.

At coc_tiny's stage-1 shape (224x224, batch 128), for every autotune config that survives the pruning:
no register spills in fp16/bf16, at most 256 B in fp32, shared memory within sm_90's 227 KB, and no tensor-core
(mma) instructions in the loops over <= 8 centers (so nothing runs in TF32). On the tl.dot path (> 8 centers)
the fp32 backward's dots are IEEE fp32 unless torch allows TF32. Runs tests/context_cluster_resources.py in a
fresh process (TRITON_INTERPRET unset)."""
import json
from pathlib import Path

from helpers import sm90_child

SCRIPT = Path(__file__).with_name("context_cluster_resources.py")
SMEM_LIMIT = 227 * 1024


def _run(*args):
    stdout = sm90_child([str(SCRIPT), *args], timeout=600)
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_stage1_configs_do_not_spill():
    rows = _run("1")
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in ("fwd", "bwd")
                                                         for d in ("fp32", "fp16", "bf16")}
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} BLOCK_N={r['BLOCK_N']} num_warps={r['num_warps']}: {r}"
        limit = 256 if r["dtype"] == "fp32" else 0
        assert r["spill_store"] <= limit and r["spill_load"] <= limit, what
        assert r["smem"] <= SMEM_LIMIT, what
        assert r["mma"] == 0 and not r["tf32"], what


def test_dot_path_precision_follows_torch():
    rows = _run("tf32")
    off = [r for r in rows if not r["allow_tf32"]]
    on = [r for r in rows if r["allow_tf32"]]
    assert off and on
    for r in off:
        assert r["precision"] == "ieee" and not r["tf32"], r
    for r in on:
        assert r["precision"] == "tf32" and r["tf32"], r
    for r in rows:
        assert r["spill_store"] <= 256 and r["smem"] <= SMEM_LIMIT, r
