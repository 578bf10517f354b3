"""``fastseg check``: each available fused op against its reference on small random inputs.

Forward output and every gradient (inputs and parameters) are compared; the relative L2 error must be
below a per-dtype tolerance (:func:`fastseg.records.tolerance`). The checks themselves live in the op
records (:mod:`fastseg.records`). On CPU the Triton kernels run under the interpreter (the CLI sets
``TRITON_INTERPRET=1`` before importing fastseg); the number of kernel launches proves they ran.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastseg.records import RECORDS, tolerance

from .measure import Unavailable

__all__ = ["CHECKS", "run_checks", "tolerance", "compare"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    diff = (a - b).abs()
    den = b.norm().item()
    return diff.max().item() if diff.numel() else 0.0, (diff.norm().item() / den if den else diff.norm().item())


def compare(fused: torch.nn.Module, ref: torch.nn.Module, inputs: list[torch.Tensor],
            call: Callable, dtype: torch.dtype, device: torch.device, input_names=None) -> list[dict]:
    """Run ``call(module, *inputs)`` for both (fused in ``dtype`` on ``device``; reference in fp32/fp64 on the
    same inputs) and compare output and gradients of inputs and parameters."""
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fused = fused.to(device=device, dtype=dtype)
    ref = ref.to(device=device, dtype=ref_dtype)
    xs_f = [x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype).requires_grad_(x.is_floating_point())
            for x in inputs]
    xs_r = [x.detach().to(ref_dtype if x.is_floating_point() else x.dtype).requires_grad_(x.is_floating_point())
            for x in xs_f]
    out_f, out_r = call(fused, *xs_f), call(ref, *xs_r)
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1)).to(device)
    pf = dict(fused.named_parameters())
    pr = dict(ref.named_parameters())
    names = [n for n in pr if n in pf and pr[n].requires_grad]
    lf = [x for x in xs_f if x.requires_grad] + [pf[n] for n in names]
    lr = [x for x in xs_r if x.requires_grad] + [pr[n] for n in names]
    gf = torch.autograd.grad(out_f, lf, g.to(out_f.dtype), allow_unused=True)
    gr = torch.autograd.grad(out_r, lr, g.to(out_r.dtype), allow_unused=True)
    input_names = input_names or [f"input{i}" for i in range(len(xs_f))]
    labels = [f"grad {input_names[i]}" for i, x in enumerate(xs_f) if x.requires_grad] + [f"grad {n}" for n in names]
    tol = tolerance(dtype, device)
    results = [dict(zip(("max_abs", "rel"), _rel(out_f, out_r)), quantity="forward", tol=tol)]
    for lab, a, b in zip(labels, gf, gr):
        if b is None and a is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        results.append(dict(zip(("max_abs", "rel"), _rel(a, b)), quantity=lab, tol=tol))
    for r in results:
        r["ok"] = r["rel"] <= r["tol"]
    return results


#: ``fastseg check`` name -> check function, one per record (fastseg.records) that has a check
CHECKS: dict[str, Callable] = {r.check_name: r.check for r in RECORDS if r.check is not None}


def run_checks(names: list[str], device: torch.device, dtypes: list[torch.dtype]) -> list[dict]:
    """One dict per (op, dtype): status ("ok", "FAIL", "unavailable", "error"), backend, launches, results."""
    from fastseg import _backend

    out = []
    for name in names:
        for dtype in dtypes:
            before = sum(_backend.launches.values())
            entry = {"op": name, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                     "backend": _backend.select(name, device), "results": [], "note": ""}
            try:
                results = CHECKS[name](device, dtype)
                entry["results"] = results
                entry["status"] = "ok" if all(r["ok"] for r in results) else "FAIL"
            except Unavailable as exc:
                entry["status"], entry["note"] = "unavailable", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported, and makes the command fail
                entry["status"], entry["note"] = "error", f"{type(exc).__name__}: {exc}"
            entry["launches"] = sum(_backend.launches.values()) - before
            if entry["status"] == "ok" and entry["backend"] == "triton" and entry["launches"] == 0:
                entry["status"], entry["note"] = "FAIL", "no Triton kernel launch was recorded"
            out.append(entry)
    return out
