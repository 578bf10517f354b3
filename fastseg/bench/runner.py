"""Run benchmark cases over ops × shapes × dtypes × modes × implementations; rows for the table/CSV/JSON."""
from __future__ import annotations

import json
from typing import Iterable

import torch

from .measure import Measurement, measure
from .registry import DTYPE_NAMES, OpSpec

__all__ = ["run_bench", "fastseg_backend", "progress_bar"]


def fastseg_backend(device: torch.device) -> str:
    """How fastseg's fused ops run on ``device``: compiled Triton, the interpreter, or the PyTorch path."""
    from fastseg import _backend

    if device.type == "cuda":
        return "triton"
    if _backend.interpreter_enabled():
        return "triton-interpreter (correctness only, not speed)"
    return "torch path (CPU, no Triton kernels)"


def progress_bar(console, enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not enabled)


def run_bench(work: list[tuple[OpSpec, list[dict]]], dtypes: list[torch.dtype], modes: list[str],
              device: torch.device, *, impls: Iterable[str] | None = None, console=None, progress: bool = True,
              timing: bool = True, cpu_budget_s: float = 0.5, on_rows=None) -> tuple[list[dict], list[str]]:
    """Measure every case. Returns (rows, notes). Never raises for a failing/unavailable/OOM case.

    ``on_rows(rows)``, if given, is called with the rows so far after every case (partial results)."""
    device = torch.device(device)
    impls = set(impls) if impls else None
    rows, notes = [], []
    plan = []
    for spec, shapes in work:
        chosen = [i for i in spec.impls if impls is None or i.name in impls]
        if device.type != "cuda" and spec.cpu_note:
            notes.append(f"{spec.name} (CPU path): {spec.cpu_note}")
        if device.type != "cuda":
            skipped = [i.name for i in chosen if i.gpu_only]
            if skipped:
                notes.append(f"{spec.name}: {', '.join(skipped)} skipped on CPU (compiled baselines: GPU only)")
            chosen = [i for i in chosen if not i.gpu_only]
        for shape in shapes:
            for dtype in dtypes:
                for mode in modes:
                    plan.append((spec, shape, dtype, mode, chosen))
    total = sum(len(p[4]) for p in plan)
    unavailable: dict[tuple[str, str], str] = {}
    backend = fastseg_backend(device)
    with progress_bar(console, progress) as bar:
        task = bar.add_task("bench", total=total)
        for spec, shape, dtype, mode, chosen in plan:
            group = []
            for impl in chosen:
                label = spec.shape_label(shape)
                bar.update(task, description=f"{spec.name} {label} {DTYPE_NAMES[dtype]} {mode} {impl.name}")
                key = (spec.name, impl.name)
                if key in unavailable:
                    m = Measurement("unavailable", note=unavailable[key])
                else:
                    m = measure(lambda: impl.prepare(shape, dtype, device, mode), device, timing=timing,
                                cpu_budget_s=cpu_budget_s)
                    if m.status == "unavailable":
                        unavailable[key] = m.note
                group.append({
                    "op": spec.name, "shape": label, "params": json.dumps(shape, sort_keys=True),
                    "dtype": DTYPE_NAMES[dtype], "mode": mode, "impl": impl.name, "fastseg": impl.fastseg,
                    # fastseg variants (e.g. fastseg-cl, fastseg-all) run fastseg's kernels too
                    "backend": backend if impl.fastseg or impl.name.startswith("fastseg") else "pytorch",
                    "status": m.status,
                    "time_ms": m.time_ms, "peak_bytes": m.peak_bytes,
                    "peak_mib": None if m.peak_bytes is None else round(m.peak_bytes / 2**20, 3),
                    "note": m.note, "device": str(device),
                })
                bar.advance(task)
            _add_ratios(group)
            rows.extend(group)
            if on_rows is not None:
                on_rows(rows)
    by_note: dict[tuple[str, str], list[str]] = {}
    for (op, impl), note in unavailable.items():
        by_note.setdefault((op, note), []).append(impl)
    for (op, note), names in by_note.items():
        notes.append(f"{op}: {', '.join(names)} unavailable: {note}")
    return rows, notes


def _add_ratios(group: list[dict]) -> None:
    """speedup = t_impl / t_fastseg (how many times faster fastseg is); mem_ratio = peak_impl / peak_fastseg.

    A channels_last baseline (``*-cl``) is compared with fastseg's channels_last row (``fastseg-cl``) when there
    is one, so each memory format is compared with itself; ``vs`` names the row compared with."""
    ok = {r["impl"]: r for r in group if r["status"] == "ok"}
    fast = next((r for r in group if r["fastseg"] and r["status"] == "ok"), None)
    for r in group:
        r["speedup"] = r["mem_ratio"] = r["vs"] = None
        ref = fast
        if r["impl"].endswith("-cl") and r["impl"] != "fastseg-cl" and "fastseg-cl" in ok:
            ref = ok["fastseg-cl"]
        if ref is None or r["status"] != "ok":
            continue
        r["vs"] = ref["impl"]
        if r["time_ms"] and ref["time_ms"]:
            r["speedup"] = float(f"{r['time_ms'] / ref['time_ms']:.4g}")  # 4 significant digits
        if r["peak_bytes"] and ref["peak_bytes"]:
            r["mem_ratio"] = float(f"{r['peak_bytes'] / ref['peak_bytes']:.4g}")
