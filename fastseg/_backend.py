"""Backend dispatch: the one place that decides how a fastseg op runs.

* CUDA tensors run the compiled Triton kernels. There is no silent fallback on CUDA: a case the kernels do
  not cover raises an error that says so.
* CPU tensors run the *same* Triton kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before ``fastseg`` was imported (that is how the test-suite checks the kernels without a GPU), and a plain
  PyTorch path otherwise, so the library works everywhere.

``use_backend("torch")`` forces the PyTorch path (for baselines and debugging); ``use_backend("triton")``
makes the PyTorch path an error. Every kernel launch is counted in :data:`launches`, so tests can prove
that the Triton path really ran.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Iterator

import torch

__all__ = [
    "triton_available",
    "interpreter_enabled",
    "select",
    "use_backend",
    "launches",
    "record_launch",
    "check_same_device",
]

_BACKENDS = ("auto", "triton", "torch")
_state = threading.local()

#: kernel name -> number of launches since the process started (or since ``launches.clear()``).
launches: collections.Counter[str] = collections.Counter()


def record_launch(name: str) -> None:
    """Called by every launcher in :mod:`fastseg.kernels` right before a kernel launch."""
    launches[name] += 1


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, so the
# interpreter state is frozen when fastseg is imported.
_INTERPRET_AT_IMPORT = _env_interpret()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreter_enabled() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET_AT_IMPORT and triton_available()


def _forced() -> str:
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: ``"auto"`` (default), ``"triton"`` or ``"torch"``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {_BACKENDS}")
    old = _forced()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = old


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given (non-None) tensors must live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if not devices:
        raise ValueError(f"{op}: no tensor given")
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return first


def select(op: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for running ``op`` on ``device``."""
    forced = _forced()
    if forced == "torch":
        return "torch"
    if device.type == "cuda":
        if not triton_available():
            raise RuntimeError(f"{op}: CUDA tensors need Triton, which is not installed")
        if interpreter_enabled():
            raise RuntimeError(
                f"{op}: TRITON_INTERPRET=1 was set when fastseg was imported; the interpreter runs on CPU "
                "tensors only. Unset it to run the compiled kernels on CUDA."
            )
        return "triton"
    if device.type == "cpu":
        if interpreter_enabled():
            return "triton"
        if forced == "triton":
            raise RuntimeError(
                f"{op}: the Triton backend was forced for CPU tensors, but the Triton interpreter is off; "
                "set TRITON_INTERPRET=1 before importing fastseg"
            )
        return "torch"
    if forced == "triton":
        raise RuntimeError(f"{op}: no Triton backend for device {device}")
    return "torch"
