"""`bash benchmarks/gpu_check.sh --dry-run` (the one-call GPU check) runs every step on the CPU at tiny shapes:
a broken step shows here before GPU time is spent. Checks the files it writes and that every step ran."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    from fastseg.bench.headline import STEPS, TARGETS

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert set(files) == {"headline.csv", "headline.json", "headline.png", "tests.log", "rows.jsonl",
                          "gpu_check.log"}, files
    doc = json.loads((tmp_path / "out" / "headline.json").read_text())
    assert doc["dry_run"] is True
    for key in ("device_name", "torch", "triton", "commit", "date", "source_sha256"):
        assert key in doc["environment"]
    # every step ran and finished (nothing timed out or failed)
    assert list(doc["steps"]) == [s.name for s in STEPS]
    bad = {n: r for n, r in doc["steps"].items() if r["status"] != "ok"}
    assert not bad, bad
    rows = doc["results"]
    with open(tmp_path / "out" / "headline.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for step in STEPS:
        if step.kind != "bench":
            continue
        mine = [r for r in rows if r["step"] == step.name]
        assert mine, f"no row from step {step.name}"
        # each case either ran, or is an honest non-result (GPU-only baseline, op not in this build)
        errors = [r for r in mine if r["status"] not in ("ok", "skipped", "unavailable")]
        assert not errors, errors
        if step.op in {r["op"] for r in rows if r["status"] == "ok"}:
            assert any(r["impl"] == step.row_impl("fastseg") and r["status"] == "ok" for r in mine), step.name
        if step.env:  # the step's process had its env (e.g. FASTSEG_MSCA_FUSED=0 for the MSCA A/B)
            assert all(r["env"] == " ".join(f"{k}={v}" for k, v in sorted(step.env.items()) if k != "PYTHONPATH")
                       for r in mine), step.name
    # a step joining another's group (an A/B under another env) is compared with that step's fastseg row
    for step in STEPS:
        if step.kind == "bench" and step.group:
            ab = [r for r in rows if r["step"] == step.name and r["status"] == "ok"]
            assert ab and all(r["group"] == step.group and not r["fastseg"] and r["vs"] == "fastseg" for r in ab), ab
    # the GPU tests ran (interpreted) and the kernel test files were collected
    log = (tmp_path / "out" / "tests.log").read_text()
    assert "passed" in log and "collected" in log
    assert len(doc["targets"]) >= len(TARGETS)
    # the summary table with the targets is printed last
    tail = proc.stdout.strip().splitlines()[-(len(doc["targets"]) + 10):]  # title, header, rules, a row each
    assert any("targets" in line for line in tail), "\n".join(tail)


RELOCATE_SCRIPT = r'''
import os, shutil, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fastseg.bench.triton_cache import compile_log, install_listener, relocate

@triton.jit
def k(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.exp(tl.load(X + i, mask=i < N)), mask=i < N)

def build():
    src = triton.compiler.ASTSource(k, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                                    constexprs={"BLOCK": 128})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return compile_log[-1][1]

install_listener("t", verbose_misses=False)
a, b = sys.argv[1], sys.argv[2]
os.environ["TRITON_CACHE_DIR"] = a
assert not build()  # fresh cache: compiled
assert build() is not None
shutil.move(a, b)
os.environ["TRITON_CACHE_DIR"] = b
print("moved:", "hit" if build() else "miss")
shutil.rmtree(b); os.environ["TRITON_CACHE_DIR"] = a; build(); shutil.move(a, b); os.environ["TRITON_CACHE_DIR"] = b
print("relocated:", relocate(b, strip=True), "hit" if build() else "miss")
'''


def test_moved_triton_cache_hits_only_after_relocate(tmp_path):
    """A Triton cache copied to another folder misses (its group files hold absolute paths) until
    fastseg.bench.triton_cache.relocate rewrites them; stripped to cubin + metadata it still hits."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    script = tmp_path / "relocate_check.py"  # @triton.jit needs its source in a file
    script.write_text(RELOCATE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "moved: miss" in proc.stdout and "hit" in proc.stdout.split("relocated:")[1], proc.stdout


def test_msca_ab_step_runs_the_unfused_kernels(tmp_path, monkeypatch):
    """The MSCA A/B: the msca-unfused step's process gets FASTSEG_MSCA_FUSED=0 (kernels/msca.py reads it at
    import), so its fastseg rows launch other kernels than the same step under =1 (the msca step's env); the
    rows' ``kernels`` column says which ran (kernels interpreted on the CPU here, tiny shape)."""
    import dataclasses

    from fastseg.bench.headline import STEPS, _load_rows, _run_child

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTSEG_MSCA_FUSED", raising=False)
    unfused = next(s for s in STEPS if s.name == "msca-unfused")
    fused_env = next(s for s in STEPS if s.name == unfused.group).env
    assert unfused.env == {"FASTSEG_MSCA_FUSED": "0"} and fused_env == {"FASTSEG_MSCA_FUSED": "1"}
    ran = {}
    for label, step in (("0", unfused), ("1", dataclasses.replace(unfused, env=fused_env))):
        rows_path = str(tmp_path / f"rows{label}.jsonl")
        res = _run_child(step, True, 300, str(tmp_path), rows_path, str(tmp_path / "tests.log"))
        assert res["status"] == "ok", res
        rows = _load_rows(rows_path)
        assert [r["status"] for r in rows] == ["ok"] * len(step.modes), rows
        assert all(r["env"] == f"FASTSEG_MSCA_FUSED={label}" and r["impl"] == "fastseg-unfused" for r in rows)
        ran[label] = {r["mode"]: set(r["kernels"].split()) for r in rows}
    for mode in unfused.modes:
        assert ran["0"][mode] and ran["1"][mode] and ran["0"][mode] != ran["1"][mode], ran
    assert {"msca_dw_fwd", "msca_pw_fwd"} <= ran["0"]["fwd"], ran  # the two-kernel forward
    assert "msca_dw_fwd" not in ran["1"]["fwd"], ran  # the one-kernel forward at C <= 64


def test_group_rows_get_ratios_and_verdicts():
    """Rows of a step that joins another's group (the MSCA A/B) are compared with that group's fastseg row:
    speedup = t_unfused / t_fused, and the A/B target reads it (synthetic rows, no timing involved)."""
    from fastseg.bench.headline import TARGETS, add_ratios, evaluate_targets

    def row(step, impl, t, peak, fastseg):
        return {"step": step, "group": "msca", "op": "msca", "shape": "B=16 C=32 128x128", "mode": "fwdbwd",
                "impl": impl, "fastseg": fastseg, "status": "ok", "time_ms": t, "peak_bytes": peak, "note": ""}
    rows = [row("msca", "fastseg", 2.0, 100, True), row("msca", "eager", 8.0, 400, False),
            row("msca-unfused", "fastseg-unfused", 3.0, 150, False)]
    add_ratios(rows)
    assert rows[2]["vs"] == "fastseg" and rows[2]["speedup"] == 1.5 and rows[2]["mem_ratio"] == 1.5
    ab = [t for t in TARGETS if t.baseline == "fastseg-unfused" and t.mode == "fwdbwd"]
    assert len(ab) == 1
    assert [v["verdict"] for v in evaluate_targets(rows, ab, dry=False)] == ["met"]
    rows[2]["time_ms"] = 1.0  # the unfused kernels faster: the target is missed
    add_ratios(rows)
    assert [v["verdict"] for v in evaluate_targets(rows, ab, dry=False)] == ["MISSED"]
