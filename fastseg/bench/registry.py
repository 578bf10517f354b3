"""Benchmark case registry: an :class:`OpSpec` per op, with its implementations and shape presets.

Shapes are plain dicts of the op's parameters (``--shape "B=2,Q=100,H=64,W=64"`` overrides defaults).
The op files in :mod:`fastseg.bench.ops` register themselves; tests may register tiny dummy ops.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .measure import Prepared, Unavailable

__all__ = ["Impl", "OpSpec", "MemprofSpec", "register", "get_op", "all_ops", "BenchError", "parse_shape",
           "DTYPES", "parse_dtypes", "require"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class BenchError(ValueError):
    """A user error (unknown op, preset, shape key, dtype, ...): the CLI prints it and exits with 2."""


@dataclass
class Impl:
    """One way to run an op. ``prepare(shape, dtype, device, mode)`` returns a :class:`Prepared`
    (or raises :class:`Unavailable`). ``fastseg=True`` marks the fused op the baselines are compared to."""

    name: str
    prepare: Callable[[dict, torch.dtype, torch.device, str], Prepared]
    fastseg: bool = False
    gpu_only: bool = False  # e.g. torch.compile / FlexAttention baselines: skipped on CPU (compile time)
    description: str = ""


@dataclass
class MemprofSpec:
    """How ``fastseg memprof`` maps (queries, image H×W, batch) to a shape of this op.

    ``analytic(shape, dtype)`` returns {part: bytes} of the fused op's training step, from the shapes, used on
    CPU where the kernel's own allocations cannot be measured. Part names: ``saved: ...`` (kept for backward),
    ``gradients ...`` / ``backward ...`` (left out for ``--mode fwd``), anything else (inputs, weights, outputs). ``cpu_estimate(shape, dtype)``
    is a rough upper bound of the eager peak, to skip settings too large to run on the CPU.
    """

    shape: Callable[[int, int, int, int, dict], dict]
    eager: str
    fused: str
    analytic: Callable[[dict, torch.dtype], dict]
    cpu_estimate: Callable[[dict, torch.dtype], int]
    description: str = ""
    #: False for ops without object queries (MSCA, context cluster): the sweep is resolution x batch only
    queries: bool = True
    #: what the CPU analytic accounting of the fused path counts (printed as its label)
    analytic_what: str = "inputs, weights, what the fused op saves for backward, gradients, backward buffers"
    #: default (queries, resolutions, batches) on CPU and for --quick, as comma-separated strings; None = generic
    cpu_grid: tuple | None = None
    quick_grid: tuple | None = None


@dataclass
class OpSpec:
    name: str
    summary: str
    shape_keys: dict  # key -> default value (its type is the key's type)
    presets: dict  # name -> list of shape dicts (partial; defaults fill the rest)
    impls: list
    label: Callable[[dict], str] = None
    issue: str = ""
    memprof: MemprofSpec | None = None
    notes: list = field(default_factory=list)
    #: printed under a CPU run's table: how fastseg's plain-PyTorch path compares with eager, and why
    cpu_note: str = ""
    heavy: bool = False  # whole models: on CPU only when named explicitly (minutes per step there)

    def full_shape(self, partial: dict) -> dict:
        shape = dict(self.shape_keys)
        shape.update(partial)
        return shape

    def shape_label(self, shape: dict) -> str:
        if self.label is not None:
            return self.label(shape)
        return " ".join(f"{k}={v}" for k, v in shape.items())

    def preset(self, name: str) -> list[dict]:
        if name not in self.presets:
            raise BenchError(f"unknown preset {name!r} for op {self.name!r}; choose from: {', '.join(self.presets)}")
        return [self.full_shape(s) for s in self.presets[name]]

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise BenchError(f"op {self.name!r} has no implementation {name!r}; it has: "
                         + ", ".join(i.name for i in self.impls))


_REGISTRY: dict[str, OpSpec] = {}
_BUILTIN = ("masked_attention", "msca", "context_cluster", "models", "cac", "ms_deform_attn", "ecenet",
            "maskformer", "segvit")
_loaded = False


def register(spec: OpSpec) -> OpSpec:
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN:
            importlib.import_module(f"fastseg.bench.ops.{mod}")


def all_ops() -> dict[str, OpSpec]:
    _load_builtin()
    return dict(_REGISTRY)


def get_op(name: str) -> OpSpec:
    ops = all_ops()
    if name not in ops:
        raise BenchError(f"unknown op {name!r}; choose from: {', '.join(ops)}")
    return ops[name]


def _convert(key: str, text: str, default):
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
            return value
        return text
    except ValueError:
        raise BenchError(f"bad value {text!r} for shape key {key!r} (expected {type(default).__name__})") from None


def parse_shape(spec: OpSpec, text: str) -> dict:
    """``"B=2,Q=100,H=64,W=64"`` (also ``HxW=64x64``) -> a full shape dict for ``spec``."""
    shape = {}
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        if "=" not in item:
            raise BenchError(f"bad --shape item {item!r} for op {spec.name!r}: expected KEY=VALUE; keys: "
                             + ", ".join(spec.shape_keys))
        key, value = (s.strip() for s in item.split("=", 1))
        if key.upper() == "HXW" and "H" in spec.shape_keys and "W" in spec.shape_keys:
            try:
                h, w = value.lower().split("x")
            except ValueError:
                raise BenchError(f"bad HxW value {value!r}: expected e.g. 64x128") from None
            shape["H"], shape["W"] = _convert("H", h, 0), _convert("W", w, 0)
            continue
        if key not in spec.shape_keys:
            raise BenchError(f"unknown shape key {key!r} for op {spec.name!r}; keys: " + ", ".join(spec.shape_keys))
        shape[key] = _convert(key, value, spec.shape_keys[key])
    if not shape:
        raise BenchError(f"empty --shape for op {spec.name!r}")
    for key, value in shape.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise BenchError(f"shape key {key!r} must be positive, got {value}")
    return spec.full_shape(shape)


def parse_dtypes(items) -> list[torch.dtype]:
    out = []
    for item in items:
        for name in filter(None, item.split(",")):
            name = name.strip().lower()
            alias = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float64": "fp64"}
            name = alias.get(name, name)
            if name not in DTYPES:
                raise BenchError(f"unknown dtype {name!r}; choose from: {', '.join(DTYPES)}")
            out.append(DTYPES[name])
    return out


def require(module: str, attr: str, what: str):
    """``getattr(import_module(module), attr)``, or :class:`Unavailable` saying which issue builds it."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} cannot be imported ({exc}); {what}") from None
    obj = getattr(mod, attr, None)
    if obj is None:
        raise Unavailable(f"{module}.{attr} is not in this build yet; {what}")
    return obj
