"""The `fastseg` command on CPU: parsing, errors, tables, CSV/JSON, heat-map PNG, OOM and budget handling.

Op-independent: a tiny dummy op is registered for the sweeps; the only real op used is the eager baseline
side of masked attention (nn.MultiheadAttention / SDPA), which exists in every build.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fastseg import cli
from fastseg.bench import check as check_mod
from fastseg.bench import memprof as memprof_mod
from fastseg.bench.measure import (Prepared, Unavailable, cpu_peak_bytes, measure, parse_bytes,
                                   saved_for_backward_bytes)
from fastseg.bench.ops.common import module_step
from fastseg.bench.ops.masked_attention import blob_mask
from fastseg.bench.registry import BenchError, Impl, MemprofSpec, OpSpec, parse_shape, register, unregister


def _mm(k):
    """k chained (N, N) matmuls: fastseg = 1, eager = 3, so both time and memory differ."""
    def prepare(shape, dtype, device, mode):
        x = torch.randn(shape["N"], shape["N"], dtype=dtype, device=device, requires_grad=mode == "fwdbwd")

        def fwd():
            y = x
            for _ in range(k):
                y = y @ x
            return y
        return module_step(fwd, [x], [], mode)
    return prepare


def _oom_above(limit):
    def prepare(shape, dtype, device, mode):
        if shape["N"] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return _mm(2)(shape, dtype, device, mode)
    return prepare


def _missing(shape, dtype, device, mode):
    raise Unavailable("dummy op not built")


@pytest.fixture
def dummy():
    spec = OpSpec(
        name="dummy", summary="chained matmuls", shape_keys={"N": 8},
        presets={"tiny": [{"N": 8}, {"N": 32}], "quick": [{"N": 8}], "cpu": [{"N": 8}]},
        impls=[Impl("fastseg", _mm(1), fastseg=True), Impl("eager", _mm(3)), Impl("big", _oom_above(16)),
               Impl("missing", _missing), Impl("compiled", _mm(1), gpu_only=True)],
        label=lambda s: f"N={s['N']}",
        memprof=MemprofSpec(
            shape=lambda q, h, w, b, extra: {"N": q * b + h // 32},
            eager="eager", fused="fastseg",
            analytic=lambda s, dt: {"inputs": s["N"] ** 2 * 4, "saved: x": s["N"] ** 2 * 4},
            cpu_estimate=lambda s, dt: s["N"] ** 2 * 16),
    )
    register(spec)
    yield spec
    unregister("dummy")


def test_parser_defaults_and_choices():
    p = cli.build_parser()
    a = p.parse_args(["bench", "masked-attention", "msca", "--dtype", "fp16,bf16", "--mode", "fwd", "--quick"])
    assert a.ops == ["masked-attention", "msca"] and a.dtype == ["fp16,bf16"] and a.mode == "fwd" and a.quick
    a = p.parse_args(["memprof", "--budget", "24GB", "--queries", "100,200", "--resolutions", "512x512"])
    assert a.budget == "24GB" and a.op == "masked-attention" and a.mode == "fwdbwd"
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--mode", "sideways"])
    with pytest.raises(SystemExit):
        p.parse_args([])


@pytest.mark.parametrize("argv, msg", [
    (["bench", "no-such-op"], "unknown op 'no-such-op'"),
    (["bench", "masked-attention", "--preset", "nope"], "unknown preset 'nope'"),
    (["bench", "masked-attention", "--shape", "B=2,Z=3"], "unknown shape key 'Z'"),
    (["bench", "masked-attention", "--shape", "B=two"], "bad value 'two'"),
    (["bench", "masked-attention", "--shape", "B=0"], "must be positive"),
    (["bench", "--shape", "B=2"], "needs an explicit op"),
    (["bench", "masked-attention", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["bench", "masked-attention", "--impl", "warp-drive"], "unknown implementation"),
    (["memprof", "--op", "coc"], "no memory-profile sweep"),
    (["memprof", "--op", "msca", "--queries", "100"], "has no object queries"),
    (["memprof", "--op", "context-cluster", "--resolutions", "100x100"], "must be a multiple of 32"),
    (["memprof", "--budget", "lots"], "cannot parse memory size"),
    (["memprof", "--resolutions", "12xx"], "bad resolution"),
    (["check", "no-such-op"], "unknown op(s) for check"),
])
def test_clean_errors(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_parse_shape_and_bytes(dummy):
    assert parse_shape(dummy, "N=5") == {"N": 5}
    from fastseg.bench.registry import get_op
    s = parse_shape(get_op("masked-attention"), "B=3,HxW=4x6,density=25%")
    assert (s["B"], s["H"], s["W"], s["density"], s["E"]) == (3, 4, 6, 0.25, 256)
    assert parse_bytes("24GB") == 24 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("100") == 100
    with pytest.raises(ValueError):
        parse_bytes("24 parsecs")


def test_measure_records_oom_and_unavailable():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert measure(oom, "cpu").status == "OOM"
    assert measure(lambda: (_ for _ in ()).throw(MemoryError()), "cpu").status == "OOM"
    m = measure(lambda: (_ for _ in ()).throw(Unavailable("not here")), "cpu")
    assert (m.status, m.note) == ("unavailable", "not here")
    m = measure(lambda: (_ for _ in ()).throw(ValueError("boom")), "cpu")
    assert m.status == "error" and "boom" in m.note


def test_cpu_peak_and_saved_bytes_are_measured():
    def fn():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB, both alive
        del a
        c = torch.ones(500_000)  # 2 MB, after a was freed
        return float(b[0] + c[0])
    peak = cpu_peak_bytes(fn)
    assert 12_000_000 <= peak < 12_500_000
    x = torch.randn(100, 100, requires_grad=True)
    w = torch.randn(100, 100, requires_grad=True)
    # x @ w saves x and w (excluded as inputs); exp saves its 40 kB output; sum saves nothing
    saved = saved_for_backward_bytes(lambda: (x @ w).exp().sum(), [x, w])
    assert saved == 100 * 100 * 4


def test_bench_table_csv_json(dummy, tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["bench", "dummy", "--preset", "tiny", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NOT kernel timings" in text and "dummy" in text
    assert "OOM" in text  # the 'big' impl at N=32
    assert "compiled skipped on CPU" in text and "missing unavailable: dummy op not built" in text
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 4  # 2 shapes x 2 modes x 4 impls (the GPU-only one is skipped)
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    assert by[("N=32", "fwdbwd", "big")]["status"] == "OOM"
    assert by[("N=8", "fwdbwd", "big")]["status"] == "ok"
    assert by[("N=8", "fwd", "missing")]["status"] == "unavailable"
    eager, fast = by[("N=32", "fwdbwd", "eager")], by[("N=32", "fwdbwd", "fastseg")]
    assert float(eager["time_ms"]) > 0 and int(eager["peak_bytes"]) > int(fast["peak_bytes"]) > 0
    assert float(eager["speedup"]) == pytest.approx(float(eager["time_ms"]) / float(fast["time_ms"]), rel=1e-3)
    assert float(eager["mem_ratio"]) > 1
    assert all(r["torch"] == torch.__version__ and r["date"] and r["device_name"] for r in rows)
    doc = json.loads(open(f"{out}.json").read())
    env = doc["environment"]
    assert {"device_name", "torch", "triton", "commit", "date"} <= set(env) and env["device"] == "cpu"
    assert len(doc["results"]) == len(rows) and doc["command"][:3] == ["fastseg", "bench", "dummy"]


def test_bench_real_baselines_tiny_shape(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "masked-attention", "--shape", "B=1,Q=5,H=3,W=4,E=32,heads=4,density=0.5",
                   "--impl", "eager,sdpa,fastseg", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} == {"eager", "sdpa", "fastseg"}
    for r in rows:
        if r["impl"] != "fastseg":
            assert r["status"] == "ok" and r["time_ms"] > 0 and r["peak_bytes"] > 0
        else:
            assert r["status"] in ("ok", "unavailable")


def test_blob_masks_density_and_no_empty_rows():
    g = torch.Generator().manual_seed(0)
    for d in (0.05, 0.3, 1.0):
        m = blob_mask(2, 7, 20, 30, d, g, torch.device("cpu"))
        assert m.shape == (2, 7, 600) and m.dtype == torch.bool
        assert m.any(-1).all()
        assert abs(m.float().mean().item() - d) < 0.01
    m = blob_mask(1, 3, 2, 2, 0.01, g, torch.device("cpu"))
    assert (m.sum(-1) == 1).all()  # at least one allowed pixel per query


def test_memprof_tiny_budget_plot_and_outputs(dummy, tmp_path, capsys):
    png, out = tmp_path / "heat.png", tmp_path / "mp"
    rc = cli.main(["memprof", "--op", "dummy", "--queries", "4,8", "--resolutions", "32x32,64x64", "--batch", "1,2",
                   "--budget", "64B", "--no-progress", "--plot", str(png), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "none of the settings fits" in text and ">budget" in text
    assert "ANALYTIC" in text and "MEASURED" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    doc = json.loads(open(f"{out}.json").read())
    assert doc["budget_bytes"] == 64 and all(v is None for v in doc["largest_within_budget"].values())
    rows = doc["results"]
    assert len(rows) == 2 * 2 * 2 * 2
    fused = [r for r in rows if r["impl"] == "fastseg"]
    for r in fused:  # inputs + saved = 2 * N^2 fp32, N = Q*B + H//32 in the dummy's memprof shape
        assert r["method"].startswith("analytic") and r["status"] == "ok"
        assert r["peak_bytes"] == 8 * (r["queries"] * r["batch"] + r["height"] // 32) ** 2
    assert all(r["method"].startswith("measured") and r["peak_bytes"] > 0 for r in rows if r["impl"] == "eager")


def test_memprof_largest_within_budget_and_oom(dummy, tmp_path, capsys, monkeypatch):
    # the eager side runs out of memory above N=16: recorded as OOM, the sweep goes on
    monkeypatch.setattr(dummy.memprof, "eager", "big")
    out = tmp_path / "mp.json"
    rc = cli.main(["memprof", "--op", "dummy", "--queries", "4,8,16", "--resolutions", "32x32", "--batch", "1,2",
                   "--budget", "1GB", "--no-progress", "--no-time", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "OOM" in text and "ran out of memory" in text
    doc = json.loads(out.read_text())
    best = doc["largest_within_budget"]
    assert best["big batch 1"]["queries"] == 8 and best["big batch 2"]["queries"] == 4  # N = Q*B + 1 <= 16
    assert best["fastseg batch 2"]["queries"] == 16


def test_memprof_real_masked_attention_eager(tmp_path, capsys):
    rc = cli.main(["memprof", "--queries", "4,8", "--resolutions", "64x64", "--batch", "1", "--no-progress",
                   "--no-time", "--out", str(tmp_path / "m.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "m.json").read_text())["results"]
    eager = [r for r in rows if r["impl"] == "eager"]
    fused = [r for r in rows if r["impl"] == "fastseg"]
    assert all(r["status"] == "ok" and r["saved_bytes"] > 0 for r in eager)
    # stride-8 level of 64x64: L = 64; the eager path saves the (B*heads, Q, L) fp32 probabilities at least
    assert all(r["saved_bytes"] >= 8 * r["queries"] * 64 * 4 for r in eager)
    assert all(r["status"] == "ok" and "bit-packed mask" in r["note"] for r in fused)


def test_check_pass_fail_unavailable(monkeypatch, capsys):
    def good(device, dtype):
        from fastseg import _backend
        _backend.record_launch("dummy_kernel")  # a real fused op's kernels record their launches
        return check_mod.compare(_copy_linear(), _copy_linear(), [torch.randn(4, 3)], lambda m, x: m(x),
                                 dtype, device)

    def bad(device, dtype):
        lin = _copy_linear()
        wrong = torch.nn.Linear(3, 2)
        with torch.no_grad():
            wrong.weight.copy_(lin.weight * 1.5)
            wrong.bias.copy_(lin.bias)
        return check_mod.compare(wrong, lin, [torch.randn(4, 3)], lambda m, x: m(x), dtype, device)

    def missing(device, dtype):
        raise Unavailable("not built yet")

    monkeypatch.setattr(check_mod, "CHECKS", {"good": good, "missing": missing})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no re-exec inside the test process
    assert cli.main(["check"]) == 0
    text = capsys.readouterr().out
    assert "good" in text and "grad input0" in text and "unavailable" in text
    monkeypatch.setattr(check_mod, "CHECKS", {"good": good, "bad": bad})
    assert cli.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # a check that passes without any Triton launch on the Triton backend did not test the kernels: failure
    monkeypatch.setattr(check_mod, "CHECKS", {"nolaunch": lambda d, t: check_mod.compare(_copy_linear(), _copy_linear(), [torch.randn(4, 3)],
                                                                lambda m, x: m(x), t, d)})
    assert cli.main(["check"]) == 1
    assert "no Triton kernel launch was recorded" in capsys.readouterr().out


def _copy_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_check_reexecs_under_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = cli.build_parser().parse_args(["check", "--device", "cpu"])
    assert cli._needs_interpreter(args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # an explicit setting is respected
    assert not cli._needs_interpreter(args)
    assert not cli._needs_interpreter(cli.build_parser().parse_args(["bench"]))


def test_module_entry_point_check_subprocess():
    """`python -m fastseg check` without TRITON_INTERPRET re-runs itself with the interpreter on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    p = subprocess.run([sys.executable, "-m", "fastseg", "check", "masked-attention"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "under the interpreter" in p.stdout


def test_masked_attention_baselines_compute_the_same():
    """The baselines are timed on the same math: SDPA (and fastseg where built) agree with nn.MHA eager."""
    from fastseg.bench.ops import masked_attention as ma
    from fastseg.bench.registry import get_op

    spec = get_op("masked-attention")
    s = spec.full_shape({"B": 2, "Q": 5, "H": 3, "W": 7, "E": 32, "heads": 4, "density": 0.2})
    ref = ma.prep_eager(s, torch.float32, torch.device("cpu"), "fwd")
    with torch.no_grad():
        expected = ref.forward()
        for impl in ("sdpa", "fastseg"):
            try:
                got = spec.impl(impl).prepare(s, torch.float32, torch.device("cpu"), "fwd").forward()
            except Unavailable:
                continue
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cpu_default_bench_skips_whole_models(dummy, monkeypatch, capsys):
    from fastseg.bench import registry

    ops = registry.all_ops()
    monkeypatch.setattr(registry, "all_ops", lambda: {"dummy": dummy, "mscan": ops["mscan"]})
    assert cli.main(["bench", "--no-progress", "--impl", "fastseg,eager"]) == 0
    text = capsys.readouterr().out
    assert "whole-model ops (mscan) are not run by default on a CPU" in text


@pytest.mark.parametrize("op, shape", [
    ("masked-attention", {"B": 2, "Q": 5, "H": 6, "W": 7, "E": 32, "heads": 4, "density": 0.5}),
    ("msca", {"B": 2, "C": 8, "H": 13, "W": 11}),
    ("context-cluster", {"B": 2, "dim": 16, "H": 8, "W": 12, "fold": 2, "heads": 2, "head_dim": 8, "proposal": 2}),
    ("context-cluster", {"B": 1, "dim": 16, "H": 8, "W": 12, "fold": 1, "heads": 2, "head_dim": 8, "proposal": 3}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memprof_analytic_saved_bytes_match_autograd(op, shape, dtype):
    """memprof's CPU accounting of the fused path: its 'saved' parts are exactly what autograd keeps for
    backward when the Triton kernels run (here under the interpreter), beyond the inputs and weights."""
    from fastseg import _backend
    from fastseg.bench.registry import get_op

    if not _backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the fused path must run its kernels)")
    if op == "msca" and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter's bf16 GEMM is wrong, so MSCA refuses bf16 on the CPU; same bytes
    spec = get_op(op)
    s = spec.full_shape(shape)
    prepared = spec.impl("fastseg").prepare(s, dtype, torch.device("cpu"), "fwdbwd")
    measured = saved_for_backward_bytes(prepared.forward, prepared.resident)
    parts = spec.memprof.analytic(s, dtype)
    assert sum(v for k, v in parts.items() if k.startswith("saved")) == measured


def test_memprof_op_without_queries(tmp_path, capsys):
    """MSCA has no object queries: the sweep is resolution x batch, a column per batch, one summary per path."""
    png, out = tmp_path / "msca.png", tmp_path / "msca.json"
    rc = cli.main(["memprof", "--op", "msca", "--resolutions", "32x32,64x64", "--batch", "1,2", "--budget", "600KB",
                   "--no-progress", "--no-time", "--plot", str(png), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batch 1" in text and "batch 2" in text and "Q=" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 2 * 2 * 2 and all(r["queries"] is None for r in rows)
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in rows)
    # fused: 8x8 and 16x16 maps (stride 4) of 64 channels; within 600 KB is the largest setting that fits
    best = doc["largest_within_budget"]
    assert set(best) == {"eager", "fastseg"}
    for impl in ("eager", "fastseg"):
        fits = [r for r in rows if r["impl"] == impl and r["peak_bytes"] <= 600 * 1024]
        want = max(fits, key=lambda r: r["height"] * r["width"] * r["batch"]) if fits else None
        got = best[impl]
        assert (got is None) == (want is None)
        if want:
            assert (got["resolution"], got["batch"]) == (want["resolution"], want["batch"])


def test_memprof_unavailable_path_is_not_reported_as_not_fitting(dummy, tmp_path, capsys, monkeypatch):
    def missing(s, dt):
        raise Unavailable("accounting lands with issue 99")
    monkeypatch.setattr(dummy.memprof, "analytic", missing)
    monkeypatch.setattr(memprof_mod, "interpreter_enabled", lambda: False)
    rc = cli.main(["memprof", "--op", "dummy", "--queries", "4", "--resolutions", "32x32", "--batch", "1",
                   "--no-progress", "--no-time"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fastseg batch 1: not known: no setting was measured (unavailable: accounting lands with issue 99" in text
    assert "none of the settings fits" not in text


def test_memprof_without_analytic_model_measures_through_interpreter(dummy, tmp_path, capsys, monkeypatch):
    """No analytic model + TRITON_INTERPRET=1 (as for the Mask2Former decoder): the fused path is measured
    on the CPU allocator like the eager one, labelled, without a time."""
    def missing(s, dt):
        raise Unavailable("no analytic model")
    monkeypatch.setattr(dummy.memprof, "analytic", missing)
    monkeypatch.setattr(memprof_mod, "interpreter_enabled", lambda: True)
    out = tmp_path / "mp.json"
    rc = cli.main(["memprof", "--op", "dummy", "--queries", "4", "--resolutions", "32x32", "--batch", "1",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    fused = rows[dummy.memprof.fused]
    assert fused["status"] == "ok" and fused["peak_bytes"] > 0 and fused["time_ms"] is None
    assert fused["method"] == "measured (CPU allocator, Triton interpreter)"
    assert rows[dummy.memprof.eager]["method"] == "measured (CPU allocator)"


def test_check_covers_every_fused_op():
    """`fastseg check` has an entry per fused op, and the newer ones pass with their kernels launched."""
    from fastseg import _backend

    assert set(check_mod.CHECKS) == {"masked-attention", "mask-from-embeddings", "msca", "mlp-dwconv",
                                     "context-cluster", "upsample-ce", "ms-deform-attn", "mask-loss", "cac",
                                     "atm-attention"}
    if not _backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 to run the kernels on CPU")
    entries = check_mod.run_checks(["mask-from-embeddings", "mlp-dwconv", "atm-attention"], torch.device("cpu"),
                                   [torch.float32])
    for e in entries:
        assert e["status"] == "ok" and e["backend"] == "triton" and e["launches"] > 0, e


def test_fastseg_variants_are_labelled_with_fastseg_backend():
    """fastseg-cl / fastseg-all rows run fastseg's ops: their backend is fastseg's, not 'pytorch'."""
    from fastseg.bench.runner import fastseg_backend, run_bench

    spec = OpSpec(name="variants", summary="", shape_keys={"N": 4}, presets={"quick": [{"N": 4}]},
                  impls=[Impl("fastseg", _mm(1), fastseg=True), Impl("fastseg-cl", _mm(1)), Impl("eager", _mm(2))])
    rows, _ = run_bench([(spec, [{"N": 4}])], [torch.float32], ["fwd"], torch.device("cpu"), progress=False,
                        timing=False)
    backend = {r["impl"]: r["backend"] for r in rows}
    assert backend == {"fastseg": fastseg_backend(torch.device("cpu")),
                       "fastseg-cl": fastseg_backend(torch.device("cpu")), "eager": "pytorch"}


def test_memprof_fwd_mode_analytic_leaves_out_backward(dummy, tmp_path, monkeypatch):
    monkeypatch.setattr(dummy.memprof, "analytic", lambda s, dt: {"inputs": 100, "saved: x": 10, "gradients": 1000,
                                                                  "backward buffers": 5000})
    out = tmp_path / "m.json"
    for mode, want in (("fwd", 110), ("fwdbwd", 6110)):
        assert cli.main(["memprof", "--op", "dummy", "--queries", "4", "--resolutions", "32x32", "--batch", "1",
                         "--mode", mode, "--no-progress", "--no-time", "--out", str(out)]) == 0
        fused = [r for r in json.loads(out.read_text())["results"] if r["impl"] == "fastseg"]
        assert [r["peak_bytes"] for r in fused] == [want]


def test_channels_last_baselines_are_compared_with_fastseg_channels_last():
    from fastseg.bench.runner import _add_ratios

    def row(impl, t, peak, fastseg=False):
        return {"impl": impl, "fastseg": fastseg, "status": "ok", "time_ms": t, "peak_bytes": peak}
    group = [row("fastseg", 2.0, 100, True), row("fastseg-cl", 1.0, 50), row("eager", 4.0, 400), row("eager-cl", 3.0, 200)]
    _add_ratios(group)
    by = {r["impl"]: r for r in group}
    assert (by["eager"]["speedup"], by["eager"]["mem_ratio"], by["eager"]["vs"]) == (2.0, 4.0, "fastseg")
    assert (by["eager-cl"]["speedup"], by["eager-cl"]["mem_ratio"], by["eager-cl"]["vs"]) == (3.0, 4.0, "fastseg-cl")
    assert (by["fastseg-cl"]["speedup"], by["fastseg-cl"]["vs"]) == (0.5, "fastseg")
