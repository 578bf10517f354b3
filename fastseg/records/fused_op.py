"""The record of one fused op: :class:`FusedOp`, read by ``fastseg check``, ``fastseg.patch`` and the CLI
(``fastseg bench`` / ``memprof`` keep their op registry, :mod:`fastseg.bench.registry`; a record names its
bench ops). :class:`Probe` is one input a record supplies so that ``patch`` can verify a module before it
swaps it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["FusedOp", "Probe", "tolerance", "where", "randn", "finish"]


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative L2 error a fused op may have against its reference / the module it replaces."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        # CUDA kernels (and cuDNN / cuBLAS in the original) may use TF32 tensor cores for fp32 dot products
        return 1e-4 if device.type == "cpu" else 2e-2
    return 2e-2 if dtype == torch.float16 else 6e-2


def where(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of ``module``'s first floating parameter (or buffer); CPU / fp32 if none."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def randn(shape, g: torch.Generator, device, dtype) -> torch.Tensor:
    """Standard normal drawn from the (CPU) generator ``g``, then moved: the global RNGs are never used."""
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Probe:
    """One probe call for verifying a swap: ``call(module, *inputs)`` returns the tensor compared between
    the original and the drop-in. ``keep``: bool, broadcastable to that output, True where the two must agree
    (None: everywhere). ``grad``: for a module in training mode also compare the gradients of the floating
    inputs and of the parameters (for a random output gradient that is zero outside ``keep``). ``train``: the
    mode both run in (None: the module's own; False for a stochastic training forward, e.g. dropout, whose
    random numbers the drop-in draws differently — gradients are then compared in eval mode)."""

    what: str
    inputs: tuple
    call: Callable
    keep: torch.Tensor | None = None
    grad: bool = True
    train: bool | None = None


@dataclass(frozen=True)
class FusedOp:
    """Everything the tools need to know about one fused op.

    * ``name``: identifier (``fastseg.patch(ops=[...])``, report entries); ``check_name`` (``name`` with ``-``)
      is its ``fastseg check`` name.
    * ``nn_class``: the ``fastseg.nn`` class ``patch`` swaps in (None: no drop-in module).
    * ``matches(parent, attr, child) -> bool``: the ``patch`` recogniser (None: not patched).
    * ``build(cls, child) -> nn.Module``: the drop-in (``cls`` = the ``fastseg.nn`` class) with ``child``'s
      weights, device, dtype, ``requires_grad`` and train/eval mode.
    * ``probe(child, device, dtype, generator) -> list[Probe]``: tiny inputs shaped like ``child``'s use, drawn
      from ``generator`` (a private CPU ``torch.Generator``), on ``child``'s device and dtype.
    * ``unsupported(child) -> str | None``: why a recognised module cannot be swapped (None: it can).
    * ``check(device, dtype) -> list[dict]``: the ``fastseg check`` entry (fused op vs reference; see
      :func:`fastseg.bench.check.compare`); it raises ``fastseg.bench.measure.Unavailable`` when the op is
      not in the build.
    * ``bench``: ``fastseg bench`` / ``memprof`` op names that time this op (its own op first).
    """

    name: str
    summary: str
    nn_class: str | None = None
    matches: Callable[[nn.Module, str, nn.Module], bool] | None = None
    build: Callable[[type, nn.Module], nn.Module] | None = None
    probe: Callable[[nn.Module, torch.device, torch.dtype, torch.Generator], list] | None = None
    unsupported: Callable[[nn.Module], str | None] | None = None
    check: Callable[[torch.device, torch.dtype], list] | None = None
    bench: tuple = ()

    def __post_init__(self):
        if self.matches is not None and (self.nn_class is None or self.build is None or self.probe is None):
            raise ValueError(f"fused op {self.name!r}: a patch recogniser needs nn_class, build and probe")

    @property
    def check_name(self) -> str:
        return self.name.replace("_", "-")

    @property
    def patchable(self) -> bool:
        return self.matches is not None

    def fastseg_class(self):
        """The ``fastseg.nn`` class, or None where it is not in this build."""
        if self.nn_class is None:
            return None
        try:
            return getattr(importlib.import_module("fastseg.nn"), self.nn_class, None)
        except ImportError:
            return None

    def why_not(self, child: nn.Module) -> str | None:
        return None if self.unsupported is None else self.unsupported(child)


def finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy weights, device, dtype, requires_grad and train/eval mode from ``old`` onto ``new``."""
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    flags = dict(old.named_parameters())
    for n, p in new.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n].requires_grad)
    return new.train(old.training)
