"""Record of CAC's fused context-aware classifier: ``fastseg.nn.ContextAwareClassifier`` (``fastseg.ops.cac``).

``patch`` recognises, by structure, a module with CAC's classifier: ``conv_seg`` (1×1 ``Conv2d`` C → K with
bias), ``proj`` and ``apd_proj`` (``Linear(2C, C/2, no bias)``, ``ReLU``, ``Linear(C/2, C)``), the fastseg
interface ``base_forward`` / ``forward_train`` (the official mmseg heads return ``(logits, feat)`` from
``forward`` and need mmcv; their state_dicts load into fastseg's reference heads, which are patched):

* a classifier-only module (no parameters besides those three, e.g.
  :class:`fastseg.reference.cac.CACClassifier`, or ``FCNHeadCAC(num_convs=0, concat_input=False)``) is swapped
  for :class:`fastseg.nn.ContextAwareClassifier` (same state_dict);
* a whole reference head with feature layers (``FCNHeadCAC``, ``UPerHeadCAC``, ``DepthwiseSeparableASPPHeadCAC``,
  ``LightHamHeadCAC``: they have ``set_fused``) is replaced by a copy with ``set_fused(True)`` (the same
  module class, its classifier on the same fused ops), so its feature layers and state_dict stay as they are.

The probe runs ``forward`` (the refined logits) and ``forward_train(...)["loss_ce"]`` on one tiny image in eval
mode (dropout is stochastic; the Ham head's NMF draws random bases: both runs get the same seed).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .fused_op import FusedOp, Probe, randn

__all__ = ["RECORD"]


def _is_projector(p, c: int) -> bool:
    return (isinstance(p, nn.Sequential) and len(p) == 3 and isinstance(p[0], nn.Linear)
            and isinstance(p[1], nn.ReLU) and isinstance(p[2], nn.Linear) and p[0].bias is None
            and p[0].in_features == 2 * c and p[0].out_features == p[2].in_features and p[2].out_features == c)


def _has_cac_classifier(m: nn.Module) -> bool:
    conv = getattr(m, "conv_seg", None)
    if not (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.bias is not None
            and conv.groups == 1):
        return False
    c = conv.in_channels
    return _is_projector(getattr(m, "proj", None), c) and _is_projector(getattr(m, "apd_proj", None), c)


def _classifier_only(m: nn.Module) -> bool:
    keep = ("conv_seg", "proj", "apd_proj")
    return all(n in keep or not any(True for _ in c.parameters()) for n, c in m.named_children())


def _is_cac(parent: nn.Module, name: str, m: nn.Module) -> bool:
    if not (_has_cac_classifier(m) and callable(getattr(m, "forward_train", None))
            and callable(getattr(m, "base_forward", None))):
        return False
    return _classifier_only(m) or callable(getattr(m, "set_fused", None))


def _unsupported(m: nn.Module) -> str | None:
    from fastseg.kernels.cac import MAX_CLASSES

    if m.conv_seg.out_channels > MAX_CLASSES:
        return f"{m.conv_seg.out_channels} classes: the fused soft prototypes support at most {MAX_CLASSES}"
    if getattr(m, "fused", False):
        return "already fused (set_fused(True))"
    return None


def _build(cls, m: nn.Module) -> nn.Module:
    if _classifier_only(m):
        return cls.from_module(m)
    new = copy.deepcopy(m)
    return new.set_fused(True)


def _inputs(m: nn.Module, g, device, dtype):
    """Backbone features for a head: level i of n at (s + 1, s + 2) pixels, s = 2^(n-1-i), with the channels of
    ``in_channels`` / ``in_index`` (a classifier-only module: one (1, C, 3, 5) map)."""
    if _classifier_only(m):
        return randn((1, m.conv_seg.in_channels, 3, 5), g, device, dtype)
    ins, idx = getattr(m, "in_channels"), getattr(m, "in_index", -1)
    levels = dict(zip(idx, ins)) if isinstance(idx, (list, tuple)) else {idx: ins}
    c1 = getattr(m, "c1_bottleneck", None)
    if c1 is not None:
        levels.setdefault(0, c1.conv.in_channels)
    n = max(max(levels) + 1, 1)
    levels = {(i if i >= 0 else n + i): c for i, c in levels.items()}
    return [randn((1, levels.get(i, 1), 2 ** (n - 1 - i) + 1, 2 ** (n - 1 - i) + 2), g, device, dtype)
            for i in range(n)]


def _seeded(device):
    def call(fn):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            return fn()
    return call


def _probe(m: nn.Module, device, dtype, g: torch.Generator) -> list[Probe]:
    x = _inputs(m, g, device, dtype)
    k = m.conv_seg.out_channels
    y = torch.randint(0, k, (1, 1, 12, 20), generator=g)
    y[:, :, :3] = getattr(m, "ignore_index", 255)
    y = y.to(device)
    run = _seeded(device)
    if isinstance(x, torch.Tensor):  # the labels are captured by the call (probe inputs are the float ones)
        return [Probe("feat (1, C, 3, 5)", (x,), lambda mod, x: run(lambda: mod(x)), train=False),
                Probe("feat, labels (1, 1, 12, 20) -> loss_ce", (x,),
                      lambda mod, x: run(lambda: mod.forward_train(x, y)["loss_ce"]), train=False)]
    n = len(x)
    return [Probe(f"{n} feature level(s)", tuple(x), lambda mod, *xs: run(lambda: mod(list(xs))), train=False),
            Probe(f"{n} feature level(s), labels (1, 1, 12, 20) -> loss_ce", tuple(x),
                  lambda mod, *xs: run(lambda: mod.forward_train(list(xs), y)["loss_ce"]), train=False)]


def _check(device, dtype):
    """The fused classifier vs the reference block: inference logits, and the training loss with the gradients
    of every parameter and of the features (odd sizes, ignored pixels, absent classes)."""
    from fastseg.bench.check import compare
    from fastseg.bench.registry import require

    cls = require("fastseg.nn", "ContextAwareClassifier", "the fused CAC classifier lands with issue 17")
    ref_cls = require("fastseg.reference", "CACClassifier", "the CAC reference lands with issue 17")
    torch.manual_seed(0)
    ref = ref_cls(12, 7, dropout_ratio=0.0)
    fused = cls(12, 7, dropout_ratio=0.0)
    fused.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, 9, generator=gen)
    y = torch.randint(0, 5, (2, 1, 20, 36), generator=gen)  # classes 5, 6 absent
    y[:, :, :4] = 255
    out = [dict(r, quantity=f"logits {r['quantity']}")
           for r in compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["feat"])]
    out += [dict(r, quantity=f"loss_ce {r['quantity']}")
            for r in compare(fused, ref, [x, y.to(device)], lambda m, x, y: m.forward_train(x, y)["loss_ce"], dtype,
                             device, input_names=["feat", "labels"])]
    return out


RECORD = FusedOp(
    name="cac",
    summary="CAC context-aware classifier: soft prototypes, cosine classifier, oracle + entropy distillation",
    nn_class="ContextAwareClassifier",
    matches=_is_cac,
    build=_build,
    probe=_probe,
    unsupported=_unsupported,
    check=_check,
    bench=("cac",),
)
