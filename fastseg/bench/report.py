"""Rich tables and CSV/JSON writers for benchmark and memory-profile results."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

from .measure import fmt_bytes

__all__ = ["bench_tables", "write_results", "ENV_COLUMNS"]

ENV_COLUMNS = ["device_name", "torch", "triton", "commit", "date"]


def _status_cell(r: dict) -> str:
    if r["status"] == "ok":
        return ""
    if r["status"] == "OOM":
        return "[bold red]OOM[/]"
    from rich.markup import escape

    return f"[yellow]{r['status']}[/]" + (f": {escape(r['note'][:60])}" if r["status"] == "error" else "")


def bench_tables(rows: list[dict], title_suffix: str = ""):
    """One rich Table per op: a row per (shape, dtype, mode, impl) with time, speed-up, peak memory."""
    from rich.table import Table

    by_op = defaultdict(list)
    for r in rows:
        if r["status"] == "unavailable":
            continue
        by_op[r["op"]].append(r)
    tables = []
    for op, op_rows in by_op.items():
        t = Table(title=f"{op}{title_suffix}", title_justify="left", show_lines=False)
        for col, just in (("shape", "left"), ("dtype", "left"), ("mode", "left"), ("impl", "left"),
                          ("time ms", "right"), ("fastseg speed-up", "right"), ("peak mem", "right"),
                          ("mem / fastseg", "right"), ("status", "left")):
            t.add_column(col, justify=just, no_wrap=col in ("impl", "time ms"))
        prev = None
        for r in op_rows:
            key = (r["shape"], r["dtype"], r["mode"])
            if prev is not None and key != prev:
                t.add_section()
            first = key != prev
            prev = key
            tag, backend = "", r.get("backend", "pytorch")
            if backend.startswith("torch path"):
                tag = " (torch path)"
            elif "interpreter" in backend:
                tag = " (interpreter)"
            impl = f"[bold green]{r['impl']}[/]{tag}" if r["fastseg"] else f"{r['impl']}{tag}"
            time = "-" if r["time_ms"] is None else f"{r['time_ms']:.3f}"
            vs = "" if r.get("vs") in (None, "fastseg") else f" vs {r['vs']}"
            speed = "" if r["speedup"] is None or r["fastseg"] else f"{r['speedup']:.2f}x{vs}"
            mem = "OOM" if r["status"] == "OOM" else fmt_bytes(r["peak_bytes"])
            ratio = "" if r["mem_ratio"] is None or r["fastseg"] else f"{r['mem_ratio']:.2f}x"
            t.add_row(r["shape"] if first else "", r["dtype"] if first else "", r["mode"] if first else "", impl,
                      time, speed, mem, ratio, _status_cell(r))
        tables.append(t)
    return tables


def _out_paths(out: str) -> list[str]:
    root, ext = os.path.splitext(out)
    if ext.lower() in (".csv", ".json"):
        return [out]
    return [out + ".csv", out + ".json"]


def write_results(out: str, rows: list[dict], env: dict, *, command: list[str] | None = None,
                  notes: list[str] | None = None, extra: dict | None = None) -> list[str]:
    """Write ``rows`` to ``out`` (.csv or .json by extension; both ``out.csv`` and ``out.json`` otherwise).

    CSV: one line per row, with the environment (device, versions, commit, date) repeated as columns.
    JSON: ``{"environment", "command", "notes", "results", ...extra}``. Returns the paths written.
    """
    written = []
    for path in _out_paths(out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.lower().endswith(".csv"):
            cols = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            cols += [c for c in ENV_COLUMNS if c not in cols]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                for r in rows:
                    w.writerow({**{c: env.get(c) for c in ENV_COLUMNS}, **{k: ("" if v is None else v) for k, v in r.items()}})
        else:
            doc = {"environment": env, "command": command, "notes": notes or [], "results": rows}
            doc.update(extra or {})
            with open(path, "w") as f:
                json.dump(doc, f, indent=1, default=str)
        written.append(path)
    return written
