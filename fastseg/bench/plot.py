"""Heat maps (matplotlib, PNG) of peak memory and time over the queries × resolution grid."""
from __future__ import annotations

import math

__all__ = ["memprof_heatmaps"]


def memprof_heatmaps(rows: list[dict], path: str, budget: int | None = None, title: str = "") -> str:
    """One row of panels per batch size: peak memory of each path, then time of each path (when measured).
    Cells over ``budget`` are marked with a red frame; OOM / unavailable cells are grey and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    no_queries = all(r["queries"] is None for r in rows)
    # ops with queries: a row of panels per batch, queries on the x axis; without: one row, batch on x
    xkey, xlabel = ("batch", "batch") if no_queries else ("queries", "queries")
    batches = [None] if no_queries else sorted({r["batch"] for r in rows})
    queries = sorted({r[xkey] for r in rows})
    res = list(dict.fromkeys(r["resolution"] for r in rows))
    panels = [("peak_bytes", i) for i in impls]
    panels += [("time_ms", i) for i in impls if any(r["impl"] == i and r.get("time_ms") for r in rows)]
    fig, axes = plt.subplots(len(batches), len(panels), figsize=(3.6 * len(panels), 2.9 * len(batches) + 0.6),
                             squeeze=False)
    for bi, b in enumerate(batches):
        for pi, (key, impl) in enumerate(panels):
            ax = axes[bi][pi]
            grid = np.full((len(res), len(queries)), np.nan)
            labels = [["" for _ in queries] for _ in res]
            for r in rows:
                if (b is not None and r["batch"] != b) or r["impl"] != impl:
                    continue
                y, x = res.index(r["resolution"]), queries.index(r[xkey])
                v = r.get(key)
                if r["status"] == "ok" and v:
                    grid[y, x] = v / 2**20 if key == "peak_bytes" else v
                    labels[y][x] = (f"{v / 2**30:.2f}G" if v >= 2**30 else f"{v / 2**20:.0f}M") if key == "peak_bytes" \
                        else f"{v:.3g}"
                    if key == "peak_bytes" and budget is not None and v > budget:
                        ax.add_patch(matplotlib.patches.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False,
                                                                  edgecolor="red", linewidth=2))
                else:
                    labels[y][x] = r["status"] if r["status"] != "ok" else "-"
            finite = grid[np.isfinite(grid)]
            # one colour scale for all panels of a quantity in this row, so the paths compare at a glance
            same = [r[key] for r in rows if (b is None or r["batch"] == b) and r["status"] == "ok" and r.get(key)]
            same = np.array([v / 2**20 if key == "peak_bytes" else v for v in same]) if same else finite
            norm = None
            if same.size:
                lo, hi = float(same.min()), float(same.max())
                norm = (matplotlib.colors.LogNorm(vmin=lo, vmax=hi) if lo > 0 and hi / lo > 20
                        else matplotlib.colors.Normalize(vmin=lo, vmax=hi))
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
            im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
            for y in range(len(res)):
                for x in range(len(queries)):
                    ax.text(x, y, labels[y][x], ha="center", va="center", fontsize=7,
                            color="white" if math.isfinite(grid[y, x]) else "black")
            ax.set_xticks(range(len(queries)), [str(q) for q in queries])
            ax.set_yticks(range(len(res)), res)
            ax.set_xlabel(xlabel)
            if pi == 0:
                ax.set_ylabel("input H x W" if b is None else f"batch {b}\ninput H x W")
            method = next((r.get("method", "") for r in rows if r["impl"] == impl and r["status"] == "ok"), "")
            what = "peak memory (MiB)" if key == "peak_bytes" else "time (ms)"
            sub = " [analytic]" if key == "peak_bytes" and method.startswith("analytic") else ""
            ax.set_title(f"{impl}: {what}{sub}", fontsize=9)
            if finite.size:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_speedup_plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Bar chart per op and mode: fastseg's speed-up over each baseline for every shape (1.0 = parity).
    Returns None (and writes nothing) when no row has a speed-up (e.g. fastseg unavailable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = {}
    for r in rows:
        if r.get("speedup") and not r["fastseg"]:
            groups.setdefault((r["op"], r["mode"]), []).append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for ax, ((op, mode), rs) in zip(axes[:, 0], sorted(groups.items())):
        cases = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in rs))
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            vals = [next((r["speedup"] for r in rs if r["impl"] == impl and f"{r['shape']} {r['dtype']}" == c),
                         np.nan) for c in cases]
            ax.bar(np.arange(len(cases)) + i * width, vals, width, label=f"vs {impl}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases, rotation=20, ha="right", fontsize=6)
        ax.set_ylabel("fastseg speed-up (x)")
        ax.set_title(f"{op}, {mode}", fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
