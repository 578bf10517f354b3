"""Helpers shared by the benchmark case files."""
from __future__ import annotations

import contextlib

import torch

from ..measure import Prepared, make_step


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, device, g, requires_grad=False) -> torch.Tensor:
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    return x.requires_grad_(requires_grad)


def module_step(forward, inputs: list[torch.Tensor], modules: list[torch.nn.Module], mode: str,
                extra_resident=()) -> Prepared:
    """A :class:`Prepared` for ``forward()`` whose gradients go to ``inputs`` and all module parameters."""
    leaves = [t for t in inputs if t.requires_grad]
    for m in modules:
        leaves += [p for p in m.parameters() if p.requires_grad]
    return Prepared(make_step(forward, leaves, mode), resident=list(inputs) + list(modules) + list(extra_resident),
                    forward=forward)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The parameters' dtype of a whole-model case run in ``dtype``: float64 for float64, else float32 (fp16 /
    bf16 run under :func:`autocast` with fp32 parameters, as mixed-precision training does)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device`` for fp16 / bf16; a no-op context for fp32 / fp64."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def image_model_step(model: torch.nn.Module, x: torch.Tensor, dtype, device, mode: str,
                     compile_: bool = False) -> Prepared:
    """A :class:`Prepared` for ``scalar_loss(model(x))`` under :func:`autocast` (``model`` already at
    :func:`param_dtype` and in train / eval mode, ``x`` its (B, 3, H, W) input), gradients of every trainable
    parameter; ``compile_``: through :func:`compiled`."""
    fn = compiled(model) if compile_ else model

    def fwd():
        with autocast(device, dtype):
            return scalar_loss(fn(x))
    leaves = [p for p in model.parameters() if p.requires_grad]
    return Prepared(make_step(fwd, leaves, mode), resident=[x, model])


def compiled(fn):
    """``torch.compile`` with a recompile limit high enough for a sweep over many shapes and dtypes."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        try:
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), value))
        except Exception:  # noqa: BLE001 - renamed/removed knobs in other torch versions
            pass
    return torch.compile(fn)


def scalar_loss(out) -> torch.Tensor:
    """A scalar from a model output (tensor, or list/tuple/dict of tensors) for a training step."""
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(scalar_loss(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict)))
