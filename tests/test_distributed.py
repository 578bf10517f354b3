"""Patched models under DistributedDataParallel and FSDP: 2 CPU processes, gloo on 127.0.0.1.

Each rank trains its own synthetic batches (fastseg.bench.convergence) with SGD; the gradients of every
step must be synchronised (equal on both ranks) and equal to those of the unpatched model wrapped the same
way. The CPU torch path (TRITON_INTERPRET=0 in the workers) runs a few steps, the interpreter one.
"""
import pytest
import torch
import torch.distributed as dist

from distributed_worker import run

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _check(results, tol, steps):
    """Patched vs reference: every gradient (every step) and final parameter within ``tol`` relative, with an
    absolute floor of ``tol`` x the step's largest gradient (some gradients are rounding noise: e.g. a
    BatchNorm over 2 values at a 1x1 map passes ~1e-17 back)."""
    r0, r1 = results
    assert r0["replaced"] > 0
    for rank in results:
        ref, pat = rank["reference"], rank["patched"]
        assert len(ref["grads"]) == len(pat["grads"]) == steps
        for step, (g_ref, g_pat) in enumerate(zip(ref["grads"], pat["grads"])):
            assert g_ref.keys() == g_pat.keys() and len(g_ref) > 0
            scale = max(g.abs().max().item() for g in g_ref.values())
            for n in g_ref:
                torch.testing.assert_close(g_pat[n], g_ref[n], rtol=tol, atol=tol * scale,
                                           msg=lambda m: f"step {step} grad {n}: {m}")
        for n in ref["params"]:
            torch.testing.assert_close(pat["params"][n], ref["params"][n], rtol=tol, atol=tol,
                                       msg=lambda m: f"param {n}: {m}")
    for which in ("reference", "patched"):  # synchronised: every rank holds the same averaged gradients
        for g0, g1 in zip(r0[which]["grads"], r1[which]["grads"]):
            for n in g0:
                torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0)
    assert r0["reference"]["losses"] != r1["reference"]["losses"]  # the ranks saw different data


@pytest.mark.parametrize("wrap,model", [("ddp", "mask2former"), ("ddp", "segnext"), ("fsdp", "coc")])
def test_torch_path(tmp_path, wrap, model):
    results = run(dict(model=model, wrap=wrap, steps=3, dtype="float64", interpret=False), str(tmp_path))
    assert not results[0]["interpreter"]
    _check(results, 1e-7, steps=3)


def test_ddp_interpreter_one_step(tmp_path):
    """One DDP step with the Triton kernels under the interpreter (fp32), the launches counted."""
    results = run(dict(model="mask2former", wrap="ddp", steps=1, dtype="float32", interpret=True), str(tmp_path))
    assert results[0]["interpreter"] and results[0]["patched"]["launches"] > 0
    assert results[0]["reference"]["launches"] == 0
    _check(results, 1e-4, steps=1)
