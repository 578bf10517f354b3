"""``fastseg memprof``: peak memory (and time) of eager vs fastseg over queries × resolution × batch.

CUDA: both paths measured (``max_memory_allocated``, ``do_bench``). CPU: the eager path's peak measured
through the CPU allocator (``torch.profiler``) plus its saved-for-backward bytes (``saved_tensors_hooks``),
and the fused path's memory computed exactly from the shapes (the Triton kernels' allocations cannot be
measured without a GPU); every column says which.
"""
from __future__ import annotations

import os

import torch

from .._backend import interpreter_enabled
from .measure import (Measurement, fmt_bytes, measure, saved_for_backward_bytes, tensor_bytes, Unavailable)
from .registry import DTYPE_NAMES, BenchError, OpSpec, all_ops

__all__ = ["memprof_spec", "run_memprof", "largest_within", "memprof_tables", "parse_resolution", "setting_label"]


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1024x2048"`` or ``"512"`` -> (H, W)."""
    t = text.strip().lower()
    try:
        if "x" in t:
            h, w = t.split("x")
            res = int(h), int(w)
        else:
            res = int(t), int(t)
    except ValueError:
        raise BenchError(f"bad resolution {text!r}: expected e.g. 512x512 or 1024x2048") from None
    if min(res) <= 0:
        raise BenchError(f"bad resolution {text!r}: must be positive")
    return res


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def memprof_spec(spec: OpSpec):
    """The op's :class:`MemprofSpec`; a :class:`BenchError` naming the ops that have one if it has none."""
    if spec.memprof is None:
        raise BenchError(f"op {spec.name!r} has no memory-profile sweep; ops with one: "
                         + ", ".join(n for n, s in all_ops().items() if s.memprof is not None))
    return spec.memprof


def run_memprof(spec: OpSpec, queries: list[int], resolutions: list[tuple[int, int]], batches: list[int],
                dtype: torch.dtype, device: torch.device, *, mode: str = "fwdbwd", extra: dict | None = None,
                timing: bool = True, console=None, progress: bool = True, cpu_limit: int | None = None,
                on_rows=None) -> list[dict]:
    """One row per (batch, queries, resolution, path) with peak bytes, time and how each was obtained.
    ``on_rows(rows_so_far)`` is called after every row (partial results of a sweep cut short)."""
    from .runner import progress_bar

    mp = memprof_spec(spec)
    if not mp.queries:
        queries = [None]  # no object queries: the sweep is resolution x batch
    device = torch.device(device)
    cpu = device.type != "cuda"
    cpu_limit = cpu_limit if cpu_limit is not None else min(8 * 2**30, _ram_bytes() // 3)
    eager, fused = spec.impl(mp.eager), spec.impl(mp.fused)
    rows = []
    grid = [(b, q, r) for b in batches for r in resolutions for q in queries]
    unavailable = {}
    with progress_bar(console, progress) as bar:
        task = bar.add_task("memprof", total=len(grid) * 2)
        for b, q, (h, w) in grid:
            shape = mp.shape(q, h, w, b, extra or {})
            base = {"op": spec.name, "batch": b, "queries": q, "resolution": f"{h}x{w}", "height": h, "width": w,
                    "dtype": DTYPE_NAMES[dtype], "mode": mode, "shape": spec.shape_label(shape), "device": str(device)}
            for impl in (eager, fused):
                bar.update(task, description=f"memprof {impl.name} B={b}{'' if q is None else f' Q={q}'} {h}x{w}")
                row = dict(base, impl=impl.name, fastseg=impl.fastseg, saved_bytes=None)
                analytic = _analytic(mp, shape, dtype, mode) if cpu and impl.fastseg else None
                if analytic is not None and (analytic["status"] == "ok" or not interpreter_enabled()):
                    row.update(analytic)
                elif impl.name in unavailable:
                    row.update(status="unavailable", time_ms=None, peak_bytes=None, note=unavailable[impl.name],
                               method="-")
                elif cpu and mp.cpu_estimate(shape, dtype) > cpu_limit:
                    row.update(status="skipped", time_ms=None, peak_bytes=None, method="-",
                               note=f"too large to run on this CPU (rough estimate {fmt_bytes(mp.cpu_estimate(shape, dtype))})")
                else:
                    # no analytic model, CPU, TRITON_INTERPRET=1: the fused path runs its kernels (interpreted), its
                    # memory is measured like the eager path's; its time (the interpreter's) is meaningless
                    interp = cpu and impl.fastseg
                    m = measure(lambda: impl.prepare(shape, dtype, device, mode), device,
                                timing=timing and not interp, cpu_budget_s=0.3, cpu_min_reps=1)
                    if m.status == "unavailable":
                        unavailable[impl.name] = m.note
                    row.update(status=m.status, time_ms=m.time_ms, peak_bytes=m.peak_bytes, note=m.note,
                               method="measured (CUDA allocator)" if not cpu else
                               "measured (CPU allocator, Triton interpreter)" if interp else "measured (CPU allocator)")
                    if cpu and m.status == "ok" and mode == "fwdbwd":
                        row["saved_bytes"] = _saved_bytes(impl, shape, dtype, device)
                rows.append(row)
                if on_rows is not None:
                    on_rows(rows)
                bar.advance(task)
    return rows


def _saved_bytes(impl, shape, dtype, device) -> int | None:
    try:
        prepared = impl.prepare(shape, dtype, device, "fwdbwd")
        if prepared.forward is None:
            return None
        return saved_for_backward_bytes(prepared.forward, prepared.resident)
    except Exception:  # noqa: BLE001 - accounting extra, never fatal
        return None


def _analytic(mp, shape, dtype, mode: str = "fwdbwd") -> dict:
    try:
        parts = mp.analytic(shape, dtype)
    except Unavailable as exc:
        return dict(status="unavailable", time_ms=None, peak_bytes=None, method="-",
                    note=f"{exc}; rerun with TRITON_INTERPRET=1 to measure the fused path on this CPU through "
                         "its kernels (slow: minutes per setting)")
    if mode == "fwd":  # inference: no gradients, no backward buffers; what backward would keep is transient
        parts = {k: v for k, v in parts.items() if not k.startswith(("gradients", "backward"))}
    saved = sum(v for k, v in parts.items() if k.startswith("saved")) if mode == "fwdbwd" else None
    return dict(status="ok", time_ms=None, peak_bytes=sum(parts.values()), saved_bytes=saved,
                method="analytic (accounting from the shapes; not measured)",
                note="; ".join(f"{k}={v}" for k, v in parts.items()))


def largest_within(rows: list[dict], budget: int, impl: str, batch: int | None = None) -> dict | None:
    """The setting with the most queries × pixels × batch whose peak fits ``budget`` (None if none fits)."""
    ok = [r for r in rows if r["impl"] == impl and r["status"] == "ok" and r["peak_bytes"] is not None
          and r["peak_bytes"] <= budget and (batch is None or r["batch"] == batch)]
    if not ok:
        return None
    return max(ok, key=lambda r: ((r["queries"] or 1) * r["height"] * r["width"] * r["batch"], r["queries"] or 0,
                                  r["batch"]))


def setting_label(r: dict) -> str:
    """``Q=200 at 1024x2048`` (``batch 2 at 512x512`` for ops without queries)."""
    if r.get("queries") is None:
        return f"batch {r['batch']} at {r['resolution']}"
    return f"Q={r['queries']} at {r['resolution']}"


def _cell(key: str, r: dict | None, budget: int) -> str:
    if r is None:
        return "-"
    if r["status"] == "OOM":
        return "[bold red]OOM[/]"
    if r["status"] != "ok":
        return f"[yellow]{r['status']}[/]"
    if r.get(key) is None:
        return "-"
    text = fmt_bytes(r[key])
    if r[key] > budget:
        return f"[red]{text} >budget[/]"
    return text


def memprof_tables(rows: list[dict], budget: int, cpu: bool, key: str = "peak_bytes", what: str = "peak memory",
                   show_budget: bool = True):
    """A rich Table per batch: resolution rows × query columns, each cell eager | fastseg ``key`` bytes."""
    from rich.table import Table

    tables = []
    budget_text = f" (budget {fmt_bytes(budget)})" if show_budget else ""
    budget = budget if show_budget else 2**62
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    no_queries = all(r["queries"] is None for r in rows)
    # ops with queries: a table per batch, query columns; without: one table, batch columns
    groups = [(None, rows)] if no_queries else [(b, [r for r in rows if r["batch"] == b])
                                                  for b in sorted({r["batch"] for r in rows})]
    col_key, col_name = ("batch", "batch {}") if no_queries else ("queries", "Q={}")
    for b, sub in groups:
        cols = sorted({r[col_key] for r in sub})
        res = list(dict.fromkeys(r["resolution"] for r in sub))
        head = what if b is None else f"{what}, batch {b}"
        t = Table(title=f"{head}{budget_text}; cells: " + " | ".join(impls), title_justify="left")
        t.add_column("input H x W")
        for c in cols:
            t.add_column(col_name.format(c), justify="right")
        for rs in res:
            cells = []
            for c in cols:
                parts = [_cell(key, next((r for r in sub if r["resolution"] == rs and r[col_key] == c and r["impl"] == i),
                                    None), budget) for i in impls]
                cells.append(" | ".join(parts))
            t.add_row(rs, *cells)
        tables.append(t)
    return tables
