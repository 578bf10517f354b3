"""Timing and peak-memory measurement of one benchmark case, with out-of-memory recorded, not raised.

* CUDA: time = ``triton.testing.do_bench`` median (ms); peak = ``torch.cuda.max_memory_allocated`` over one
  run after ``gc.collect``/``empty_cache``/``reset_peak_memory_stats``, minus what was allocated before the
  case was built (so it counts the case's inputs, parameters, activations and gradients).
* CPU: time = median of a plain wall-clock loop after a warm-up; peak = the bytes of the case's resident
  tensors plus the largest net allocation the CPU allocator reported to ``torch.profiler`` during one run.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

__all__ = [
    "Unavailable", "Prepared", "Measurement", "is_oom", "make_step", "measure", "tensor_bytes",
    "cpu_peak_bytes", "MEMORY_METHOD", "fmt_bytes", "parse_bytes",
    "saved_for_backward_bytes",
]

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated (measured)",
    "cpu": "CPU allocator peak via torch.profiler (measured)",
}


class Unavailable(Exception):
    """The implementation cannot run here (module not built yet, GPU-only baseline, ...)."""


@dataclass
class Prepared:
    """A ready-to-run case: ``run()`` executes it once; ``resident`` lists the tensors/modules it holds."""

    run: Callable[[], object]
    resident: list = field(default_factory=list)
    forward: Callable[[], object] | None = None  # the bare forward (for saved-for-backward accounting)


@dataclass
class Measurement:
    status: str  # "ok", "OOM", "unavailable", "skipped", "error"
    time_ms: float | None = None
    peak_bytes: int | None = None
    note: str = ""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or isinstance(exc, MemoryError) or "can't allocate memory" in msg
    )


def tensor_bytes(objs: Iterable) -> int:
    """Bytes of the distinct storages behind the given tensors, modules (parameters and buffers)."""
    seen, total = set(), 0
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        elif isinstance(obj, torch.Tensor):
            tensors = [obj]
        else:
            continue
        for t in tensors:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
    return total


def make_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """``fwd``: the forward under ``torch.no_grad`` (inference). ``fwdbwd``: forward, then the gradients
    of every leaf (inputs and parameters) by ``torch.autograd.grad`` against a fixed random output gradient
    (fresh gradients each run: nothing accumulates between runs)."""
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                return forward()
        return run_fwd
    if mode != "fwdbwd":
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    with torch.no_grad():
        out = forward()
    grad_out = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    del out

    def run_fwdbwd():
        out = forward()
        return torch.autograd.grad(out, leaves, grad_out)
    return run_fwdbwd


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's log lines on fd 2 (Python exceptions still propagate)."""
    fd = 2
    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def saved_for_backward_bytes(forward: Callable[[], object], exclude: Iterable = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()`` (measured with
    ``torch.autograd.graph.saved_tensors_hooks``), not counting the storages of ``exclude`` (inputs, weights)."""
    skip = set()
    for obj in exclude:
        ts = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
        skip |= {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Largest net CPU allocation (bytes) during one call of ``fn``, as the allocator reports it."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _time_cpu(fn, min_reps: int = 3, max_reps: int = 20, budget_s: float = 1.0) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if times and time.perf_counter() - start > 5 * budget_s:  # slow case: fewer repetitions
            break
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda(fn, warmup_ms: int = 10, rep_ms: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(prepare: Callable[[], Prepared], device: torch.device | str, *, timing: bool = True,
            memory: bool = True, cpu_budget_s: float = 1.0, cpu_min_reps: int = 3) -> Measurement:
    """Build the case with ``prepare()``, warm it up, time it, then measure its peak memory in one fresh run.

    ``prepare`` may raise :class:`Unavailable`. An out-of-memory error anywhere gives status ``"OOM"``.
    """
    device = torch.device(device)
    prepared = None
    _cleanup(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        prepared = prepare()
        prepared.run()  # warm-up (and compilation for the compiled baselines)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = None
        if timing:
            if device.type == "cuda":
                t = _time_cuda(prepared.run)
            else:
                t = _time_cpu(prepared.run, min_reps=cpu_min_reps, budget_s=cpu_budget_s)
        peak = None
        if memory:
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                prepared.run()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                peak = tensor_bytes(prepared.resident) + cpu_peak_bytes(prepared.run)
        return Measurement("ok", t, peak)
    except Unavailable as exc:
        return Measurement("unavailable", note=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing case is a row in the table, not a crash
        if is_oom(exc):
            return Measurement("OOM", note=str(exc).splitlines()[0][:200] if str(exc) else "out of memory")
        return Measurement("error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    finally:
        del prepared
        _cleanup(device)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024 ** 3:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024 ** 3:.2f} GiB"


def parse_bytes(text: str) -> int:
    """``"24GB"``, ``"512MiB"``, ``"1.5G"``, ``"1000"`` -> bytes (GB and GiB both mean 2**30 here)."""
    s = text.strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    num = s.rstrip("kmgtbi")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot parse memory size {text!r} (examples: 24GB, 512MB, 1.5GiB)") from None
    if unit not in units or not math.isfinite(value) or value < 0:
        raise ValueError(f"cannot parse memory size {text!r} (examples: 24GB, 512MB, 1.5GiB)")
    return int(value * units[unit])
