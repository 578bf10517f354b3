"""The ``fastseg`` command: ``bench``, ``memprof`` and ``check`` (see ``fastseg --help``).

Everything runs on a CPU-only machine too, and says what it measured: ``bench`` times the CPU paths (not
kernel timings: those need a GPU), ``memprof`` measures the eager path's CPU peak and computes the fused
path's memory from the shapes, ``check`` runs the Triton kernels under the interpreter.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

__all__ = ["main", "build_parser"]

CPU_BANNER = ("No CUDA device: timing the CPU paths (eager PyTorch baselines and fastseg's plain-PyTorch path). "
              "These are NOT kernel timings; kernel timings need a GPU. Compiled baselines (torch.compile, "
              "FlexAttention) are skipped on CPU.")


def escape(text: str) -> str:
    """``text`` with rich markup escaped (notes quote shapes such as ``[B, C, H, W]``)."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def _csv_list(text: str, conv=str) -> list:
    from fastseg.bench.registry import BenchError

    try:
        return [conv(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"bad list {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastseg", description="fastseg: benchmark, memory-profile and check the fused "
                                "Triton ops against their PyTorch baselines.")
    sub = p.add_subparsers(dest="command", metavar="{bench,memprof,check,list}")
    sub.required = True

    def common(sp):
        sp.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where to run (default: cuda if available, else cpu)")
        sp.add_argument("--dtype", action="append", default=None,
                        help="fp32, fp16, bf16 (comma-separated or repeated; default bf16 on GPU, fp32 on CPU)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="time forward and forward+backward of fastseg vs every baseline")
    b.add_argument("ops", nargs="*", metavar="OP", help="ops to benchmark (default: all; see `fastseg list`)")
    b.add_argument("--preset", help="named shape set (default: 'default' on GPU, 'cpu' on CPU; see `fastseg list`)")
    b.add_argument("--shape", action="append", default=[], metavar="K=V,...",
                   help="explicit shape, e.g. 'B=2,Q=100,H=64,W=64,density=0.3' (repeatable)")
    b.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both",
                   help="fwd = inference forward (no autograd), fwdbwd = forward + all gradients (default both)")
    b.add_argument("--impl", help="only these implementations (comma-separated, e.g. fastseg,eager)")
    b.add_argument("--quick", action="store_true", help="a few small shapes per op (smoke run)")
    b.add_argument("--out", help="write results: FILE.csv, FILE.json, or both for a name without extension")
    b.add_argument("--plot", help="write a bar chart of fastseg's speed-ups to this PNG")
    common(b)

    m = sub.add_parser("memprof", help="peak memory (and time) over queries x resolution x batch, eager vs fastseg")
    m.add_argument("--op", default="masked-attention", help="op to sweep (default masked-attention; also "
                   "mask2former-decoder, mask2former, msca, context-cluster; see `fastseg list`)")
    m.add_argument("--budget", default="24GB", help="memory budget, e.g. 24GB, 80GB, 512MB (default 24GB)")
    m.add_argument("--queries", default=None, help="comma-separated query counts (default 50,100,200,400 on GPU; "
                   "ops with queries only)")
    m.add_argument("--resolutions", default=None, help="comma-separated input sizes HxW "
                   "(default 512x512,1024x1024,1024x2048 on GPU; on a CPU a small grid per op)")
    m.add_argument("--batch", default=None, help="comma-separated batch sizes (default 2 on GPU; on a CPU a small "
                   "grid per op)")
    m.add_argument("--density", type=float, default=0.5, help="attention-mask density (default 0.5)")
    m.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd", help="default fwdbwd (training)")
    m.add_argument("--no-time", action="store_true", help="measure memory only")
    m.add_argument("--quick", action="store_true", help="a tiny grid (smoke run)")
    m.add_argument("--plot", help="write heat maps of memory and time to this PNG")
    m.add_argument("--out", help="write results: FILE.csv, FILE.json, or both")
    common(m)

    c = sub.add_parser("check", help="each fused op vs its reference on small random inputs (max errors)")
    c.add_argument("ops", nargs="*", metavar="OP", help="ops to check (default: all)")
    common(c)

    sub.add_parser("list", help="list ops, their implementations and presets")
    return p


def _device(name: str):
    import torch

    from fastseg.bench.registry import BenchError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _dtypes(args, device, gpu_default=("bf16",), cpu_default=("fp32",)):
    from fastseg.bench.registry import parse_dtypes

    return parse_dtypes(args.dtype or list(gpu_default if device.type == "cuda" else cpu_default))


def _console():
    from rich.console import Console

    out = Console()
    if not out.is_terminal:  # piped / redirected: do not squeeze the tables into 80 columns
        out = Console(width=200)
    return out, Console(stderr=True)


def _env_line(env: dict) -> str:
    return (f"fastseg {env['fastseg']} | {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
            f"commit {(env['commit'] or 'n/a')[:12]} | {env['date']}")


def cmd_list(args) -> int:
    from rich.table import Table

    from fastseg.bench.check import CHECKS
    from fastseg.bench.registry import all_ops

    out, _ = _console()
    t = Table(title="fastseg ops", title_justify="left")
    for col in ("op", "what", "implementations", "presets", "memprof", "check"):
        t.add_column(col)
    for name, spec in all_ops().items():
        t.add_row(name, spec.summary, ", ".join(i.name + ("*" if i.gpu_only else "") for i in spec.impls),
                  ", ".join(spec.presets), "yes" if spec.memprof else "", "yes" if name in CHECKS else "")
    out.print(t)
    out.print("* GPU only. Shape keys: " + "; ".join(f"{n}: {', '.join(s.shape_keys)}" for n, s in all_ops().items()))
    from fastseg.records import RECORDS

    r = Table(title="fused op records (fastseg.records): what check, patch and bench read", title_justify="left")
    for col in ("fused op", "what", "drop-in", "fastseg.patch", "fastseg check", "bench ops"):
        r.add_column(col)
    for rec in RECORDS:
        r.add_row(rec.name, rec.summary, f"fastseg.nn.{rec.nn_class}" if rec.nn_class else "",
                  "yes" if rec.patchable else "", rec.check_name if rec.check_name in CHECKS else "",
                  ", ".join(rec.bench))
    out.print(r)
    return 0


def _select_work(args, device):
    from fastseg.bench.registry import BenchError, all_ops, get_op, parse_shape

    named = bool(args.ops)
    specs = [get_op(n) for n in args.ops] if named else list(all_ops().values())
    notes, work = [], []
    if not named and device.type != "cuda":
        heavy = [s.name for s in specs if s.heavy]
        specs = [s for s in specs if not s.heavy]
        if heavy:
            notes.append(f"whole-model ops ({', '.join(heavy)}) are not run by default on a CPU (a training step "
                         "takes many seconds there); name them to run them, e.g. `fastseg bench mscan`")
    preset = "quick" if args.quick else args.preset
    if args.shape and preset:
        raise BenchError("give either --shape or --preset/--quick, not both")
    if args.shape:
        if not named:
            raise BenchError("--shape needs an explicit op (shape keys differ per op), e.g. "
                             "`fastseg bench masked-attention --shape B=2,Q=100,H=64,W=64`")
        for spec in specs:
            work.append((spec, [parse_shape(spec, s) for s in args.shape]))
        return work, notes
    preset = preset or ("default" if device.type == "cuda" else "cpu")
    for spec in specs:
        if preset in spec.presets:
            work.append((spec, spec.preset(preset)))
        elif named:
            spec.preset(preset)  # raises a clean BenchError listing the op's presets
        else:
            notes.append(f"{spec.name}: no preset {preset!r} (it has: {', '.join(spec.presets)}); skipped")
    if not work:
        raise BenchError(f"unknown preset {preset!r}: no op has it")
    return work, notes


def cmd_bench(args) -> int:
    from fastseg.bench.env import environment
    from fastseg.bench.measure import MEMORY_METHOD
    from fastseg.bench.registry import BenchError
    from fastseg.bench.report import bench_tables, write_results
    from fastseg.bench.runner import fastseg_backend, run_bench

    device = _device(args.device)
    dtypes = _dtypes(args, device)
    modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]
    work, notes = _select_work(args, device)
    impls = _csv_list(args.impl) if args.impl else None
    if impls:
        known = {i.name for spec, _ in work for i in spec.impls}
        bad = [i for i in impls if i not in known]
        if bad:
            raise BenchError(f"unknown implementation(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    out, err = _console()
    env = environment(device)
    out.print(_env_line(env))
    if device.type != "cuda":
        out.print(f"[bold yellow]{CPU_BANNER}[/]")
        from fastseg import _backend
        if _backend.interpreter_enabled():
            out.print("[bold yellow]TRITON_INTERPRET=1: fastseg rows run the Triton interpreter (slow, for "
                      "correctness only); unset it for the CPU path timings.[/]")
    out.print(f"fastseg ops run as: {fastseg_backend(device)}; peak memory: {MEMORY_METHOD[device.type]}; "
              "time: " + ("triton.testing.do_bench median" if device.type == "cuda" else "wall-clock median after warm-up"))
    partial = None
    if args.out:  # a sweep cut short (time limit, crash) keeps the cases it measured
        def partial(rows_so_far):
            write_results(args.out, rows_so_far, env, command=args.argv, notes=notes + ["partial: run in progress"])
    rows, run_notes = run_bench(work, dtypes, modes, device, impls=impls, console=err,
                                progress=not args.no_progress, on_rows=partial)
    notes += run_notes
    suffix = f"  [{'GPU' if device.type == 'cuda' else 'CPU paths, not kernel timings'}]"
    for table in bench_tables(rows, suffix):
        out.print(table)
    out.print("fastseg speed-up = baseline time / fastseg time; mem / fastseg = baseline peak / fastseg peak.")
    for n in notes:
        out.print(f"[dim]note:[/] {escape(n)}")
    if args.out:
        paths = write_results(args.out, rows, env, command=args.argv, notes=notes)
        out.print("wrote " + ", ".join(paths))
    if args.plot:
        from fastseg.bench.plot import bench_speedup_plot

        title = f"fastseg bench ({env['device_name']}, torch {env['torch']}, {env['date']})"
        if bench_speedup_plot(rows, args.plot, title):
            out.print(f"wrote {args.plot}")
        else:
            out.print("no speed-up to plot (fastseg rows unavailable or failed): no PNG written")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        err.print(f"[bold red]{len(errors)} case(s) failed with an error[/] (see the status column)")
        return 1
    return 0


def cmd_memprof(args) -> int:
    from fastseg.bench.env import environment
    from fastseg.bench.measure import fmt_bytes, parse_bytes
    from fastseg.bench.memprof import (largest_within, memprof_spec, memprof_tables, parse_resolution, run_memprof,
                                       setting_label)
    from fastseg.bench.plot import memprof_heatmaps
    from fastseg.bench.registry import BenchError, DTYPE_NAMES, get_op
    from fastseg.bench.report import write_results

    device = _device(args.device)
    cpu = device.type != "cuda"
    spec = get_op(args.op)
    mp = memprof_spec(spec)
    try:
        budget = parse_bytes(args.budget)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    dtypes = _dtypes(args, device)
    if len(dtypes) != 1:
        raise BenchError("memprof takes one --dtype")
    dtype = dtypes[0]
    if args.queries and not mp.queries:
        raise BenchError(f"op {spec.name!r} has no object queries: its sweep is --resolutions x --batch")
    if args.quick:
        dq, dr, db = mp.quick_grid or ("50,100", "256x256,512x512", "1")
    elif cpu:
        dq, dr, db = mp.cpu_grid or ("50,100,200", "256x256,512x512", "1")
    else:
        dq, dr, db = "50,100,200,400", "512x512,1024x1024,1024x2048", "2"
    queries = _csv_list(args.queries or dq, int) if mp.queries else [1]
    resolutions = [parse_resolution(r) for r in _csv_list(args.resolutions or dr)]
    batches = _csv_list(args.batch or db, int)
    if not queries or not resolutions or not batches or min(queries + batches) <= 0:
        raise BenchError("--queries, --resolutions and --batch need positive values")
    if not 0 < args.density <= 1:
        raise BenchError("--density must be in (0, 1]")
    for h, w in resolutions:  # an op's own constraints (e.g. divisibility), before anything runs
        mp.shape(queries[0], h, w, batches[0], {"density": args.density})
    out, err = _console()
    env = environment(device)
    out.print(_env_line(env))
    out.print(f"memprof {spec.name}: {mp.description}; {DTYPE_NAMES[dtype]}, {args.mode}")
    if cpu:
        out.print(f"[bold yellow]No CUDA device.[/] {mp.eager}: peak MEASURED on the CPU allocator (torch.profiler), "
                  f"plus its saved-for-backward bytes measured with saved_tensors_hooks. {mp.fused}: ANALYTIC — "
                  f"accounting from the shapes ({mp.analytic_what}), not measured; where an op has no analytic model "
                  "and TRITON_INTERPRET=1 is set, its kernels run under the interpreter and are MEASURED like the "
                  "eager path (method column; no time). Times are CPU times of the eager path.")
    partial = None
    if args.out:  # a sweep cut short (time limit, crash) keeps the settings it measured
        def partial(rows_so_far):
            write_results(args.out, rows_so_far, env, command=args.argv, notes=["partial: run in progress"],
                          extra={"budget_bytes": budget})
    rows = run_memprof(spec, queries, resolutions, batches, dtype, device, mode=args.mode,
                       extra={"density": args.density}, timing=not args.no_time, console=err,
                       progress=not args.no_progress, on_rows=partial)
    for table in memprof_tables(rows, budget, cpu):
        out.print(table)
    summary = {}
    for impl in (mp.eager, mp.fused):
        impl_rows = [r for r in rows if r["impl"] == impl]
        for b in (batches if mp.queries else [None]):
            best = largest_within(rows, budget, impl, b)
            key = impl if b is None else f"{impl} batch {b}"
            sel = [r for r in impl_rows if b is None or r["batch"] == b]
            ok = [r for r in sel if r["status"] == "ok"]
            if best is None:
                summary[key] = None
                if ok or any(r["status"] == "OOM" for r in sel):
                    why = "[red]none of the settings fits[/]"
                else:  # nothing was measured: say why instead of claiming that nothing fits
                    statuses = ", ".join(sorted({r["status"] for r in sel}))
                    why = f"[yellow]not known: no setting was measured ({statuses}: {escape(sel[0]['note'])})[/]"
                out.print(f"largest within {fmt_bytes(budget)}, [bold]{key}[/]: {why}")
            else:
                summary[key] = {k: best[k] for k in ("queries", "resolution", "batch", "peak_bytes")}
                unknown = [r for r in sel if r["status"] not in ("ok", "OOM")]
                caveat = (f"; among the measured settings, {len(unknown)} not measured "
                          f"({', '.join(sorted({r['status'] for r in unknown}))})" if unknown else "")
                out.print(f"largest within {fmt_bytes(budget)}, [bold]{key}[/]: {setting_label(best)} "
                          f"({fmt_bytes(best['peak_bytes'])}, {best['method']}{caveat})")
    if cpu and any(r.get("saved_bytes") for r in rows):
        for table in memprof_tables(rows, budget, cpu, key="saved_bytes",
                                    what=f"saved for backward (activations, excl. inputs/weights; {mp.eager} measured, "
                                         f"{mp.fused} analytic, or measured where the method says so)", show_budget=False):
            out.print(table)
    bad = [r for r in rows if r["status"] == "OOM"]
    if bad:
        out.print(f"{len(bad)} setting(s) ran out of memory (recorded as OOM).")
    if args.plot:
        title = f"fastseg memprof {spec.name} ({env['device_name']}, {DTYPE_NAMES[dtype]}, {args.mode})"
        memprof_heatmaps(rows, args.plot, budget, title)
        out.print(f"wrote {args.plot}")
    if args.out:
        paths = write_results(args.out, rows, env, command=args.argv,
                              extra={"budget_bytes": budget, "largest_within_budget": summary})
        out.print("wrote " + ", ".join(paths))
    return 1 if any(r["status"] == "error" for r in rows) else 0


def cmd_check(args) -> int:
    from rich.table import Table

    from fastseg.bench.check import CHECKS, run_checks
    from fastseg.bench.env import environment
    from fastseg.bench.registry import BenchError

    device = _device(args.device)
    names = args.ops or list(CHECKS)
    bad = [n for n in names if n not in CHECKS]
    if bad:
        raise BenchError(f"unknown op(s) for check: {', '.join(bad)}; choose from: {', '.join(CHECKS)}")
    dtypes = _dtypes(args, device, gpu_default=("fp32", "bf16"))
    out, _ = _console()
    env = environment(device)
    out.print(_env_line(env))
    from fastseg import _backend
    if device.type == "cpu":
        out.print("Triton kernels run under the interpreter (TRITON_INTERPRET=1)" if _backend.interpreter_enabled()
                  else "[yellow]TRITON_INTERPRET is off: checking fastseg's plain-PyTorch CPU path, not the kernels[/]")
    entries = run_checks(names, device, dtypes)
    t = Table(title="fastseg check: fused op vs reference (relative L2 error; max abs error)", title_justify="left")
    for col in ("op", "dtype", "backend", "launches", "quantity", "max abs err", "rel err", "tol", "result"):
        t.add_column(col, justify="right" if col in ("launches", "max abs err", "rel err", "tol") else "left")
    for e in entries:
        if not e["results"]:
            colour = "yellow" if e["status"] == "unavailable" else "bold red"
            t.add_row(e["op"], e["dtype"], e["backend"], str(e["launches"]), "", "", "", "",
                      f"[{colour}]{e['status']}[/]: {escape(e['note'][:160])}")
            continue
        for i, r in enumerate(e["results"]):
            res = "[green]ok[/]" if r["ok"] else "[bold red]FAIL[/]"
            t.add_row(e["op"] if i == 0 else "", e["dtype"] if i == 0 else "", e["backend"] if i == 0 else "",
                      str(e["launches"]) if i == 0 else "", r["quantity"], f"{r['max_abs']:.2e}", f"{r['rel']:.2e}",
                      f"{r['tol']:.0e}", res)
        if e["note"]:
            t.add_row("", "", "", "", "", "", "", "", f"[bold red]{e['status']}[/]: {escape(e['note'][:160])}")
        t.add_section()
    out.print(t)
    failed = [e for e in entries if e["status"] in ("FAIL", "error")]
    available = [e for e in entries if e["status"] != "unavailable"]
    if failed:
        out.print(f"[bold red]{len(failed)} check(s) failed[/]")
        return 1
    if not available:
        out.print("[yellow]no fused op is available in this build yet: nothing to check[/]")
        return 0
    out.print(f"[green]all {len(available)} available check(s) passed[/]")
    return 0


def _needs_interpreter(args) -> bool:
    """`check` on a machine without a GPU: the kernels must be decorated under TRITON_INTERPRET=1."""
    if args.command != "check" or "TRITON_INTERPRET" in os.environ or args.device == "cuda":
        return False
    import torch

    return args.device == "cpu" or not torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["fastseg", *argv]
    if _needs_interpreter(args):
        # fastseg (and its @triton.jit kernels) is already imported without the interpreter: run again in a
        # fresh process with TRITON_INTERPRET=1 so the Triton kernels really run on the CPU.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "fastseg", *argv], env=env)
    from fastseg.bench.registry import BenchError

    handlers = {"bench": cmd_bench, "memprof": cmd_memprof, "check": cmd_check, "list": cmd_list}
    try:
        return handlers[args.command](args)
    except BenchError as exc:
        print(f"fastseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
