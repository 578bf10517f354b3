"""``fastseg.patch(model)``: swap every module fastseg has a drop-in for, in place, by structure, after a probe
shows that the drop-in computes what the module computes.

What is recognised comes from the fused-op records (:mod:`fastseg.records`, each op is skipped, with a note,
when its fastseg class is not in this build):

* ``"masked_attention"``: an ``nn.MultiheadAttention`` used as the cross-attention of a transformer decoder
  layer — attribute named ``multihead_attn`` / ``cross_attn`` / ``encoder_attn`` / ``cross_attention`` in a
  layer that also holds a ``LayerNorm`` (official Mask2Former ``CrossAttentionLayer``, Hugging Face
  ``Mask2FormerMaskedAttentionDecoderLayer``, DETR/MaskFormer decoder layers, this project's models) ->
  :class:`fastseg.nn.MaskedCrossAttention` (``from_mha``). Self-attention is left alone (its callers may use
  the attention weights). Not replaced: ``add_bias_kv``, ``add_zero_attn`` (attention dropout is fused).
* ``"msca"``: SegNeXt's attention module, official ``AttentionModule`` and mmsegmentation ``MSCAAttention``
  layouts (convs ``conv0``, ``conv0_1`` … ``conv2_2``, ``conv3``) -> :class:`fastseg.nn.MSCA`.
* ``"ms_deform_attn"`` / ``"ms_deform_attn_hf"``: multi-scale deformable attention, the official Deformable
  DETR / Mask2Former ``MSDeformAttn`` -> :class:`fastseg.nn.MSDeformAttn`, Hugging Face's
  ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` -> :class:`fastseg.nn.MSDeformAttnHF`
  (:mod:`fastseg.records.ms_deform_attn`).
* ``"cac"``: CAC's context-aware classifier (``conv_seg`` + ``proj`` + ``apd_proj``, :mod:`fastseg.records.cac`):
  a classifier-only module -> :class:`fastseg.nn.ContextAwareClassifier`; fastseg's reference CAC heads -> a
  copy with ``set_fused(True)``.
* ``"context_cluster"``: Context Clusters' ``Cluster`` (convs ``f``, ``v``, ``proj``, parameters
  ``sim_alpha``, ``sim_beta``, pooling ``centers_proposal``) -> :class:`fastseg.nn.ContextCluster`.

Verification (``verify=True``, the default): a module can look like the original by structure and compute
something else (a fork, an older version, a subclass overriding ``forward``). Before a swap, a private copy
of the module (its hooks left out) and the drop-in built from it run on the record's tiny probe inputs (on
the module's device and dtype, drawn from a private ``torch.Generator``); forward outputs and, for a module
in training mode, the gradients of the inputs and parameters (``torch.autograd.grad``, for a random output
gradient) must agree to the dtype's relative L2 tolerance (:func:`fastseg.records.tolerance`). Otherwise the
module stays and ``report.skipped`` gives the measured difference. One probe serves all modules of the same
type and configuration (the types of the module and of its submodules, their plain attributes — sizes,
flags, ``training`` — and parameter / buffer shapes, dtypes, devices and ``requires_grad``); a module with
any other instance attribute (e.g. a ``forward`` assigned on the instance) is probed on its own. The model's
parameters, buffers (BatchNorm statistics), ``.grad`` and the CPU / CUDA random number generator states are
left as they were. Masked attention: ``nn.MultiheadAttention`` outputs NaN for a fully masked query row, the
drop-in ``out_proj.bias``; the probe compares the rows that are not fully masked, then resets empty rows as
Mask2Former does and compares forward and gradients. ``verify="cpu"`` probes float64 CPU copies with
fastseg's PyTorch path instead (the module's math; no kernel compiled or autotuned for the probe shapes on a
GPU). ``verify=False`` swaps without probing: that the drop-in computes the module's function is then the
caller's responsibility. ``dry_run=True`` runs nothing:
``report.probes`` lists the probes a real run would do (``ok=None``).

Deeper patch (``report.deeper``): where the model's own code allows it — this project's Mask2Former decoder
(recognised by its ``packed_attn_masks`` switch and ``fused_attention_mask`` method, once all its
cross-attentions are fastseg's) — the mask predictor is switched to produce the bit-packed attention masks
straight from the query embeddings (``fastseg.ops.mask_from_embeddings``), with no (B·heads, Q, HW) tensor.
Hugging Face's ``Mask2FormerMaskedAttentionDecoder`` / ``OneFormerTransformerDecoder`` (found by structure,
:mod:`fastseg.models.hf_decoders`) get a forward that follows Hugging Face's except that each layer's mask
comes packed from the embeddings the same way (empty-row reset included), probed against Hugging Face's
forward on a private copy first.

Weights (state_dict), device, dtype, ``requires_grad`` and train/eval mode are kept; hooks registered on a
replaced module are not carried over. Patched and unpatched models compute the same function (to float
tolerance): the drop-ins implement the originals' math (and the probe checks it per module), and a
Mask2Former decoder resets fully-masked rows before the attention, so the drop-in's empty-row convention
(output 0 instead of NaN) never shows. The deeper patch thresholds ``e · resize(F)`` instead of
``resize(e · F)``: equal up to rounding, so a mask bit can differ only where a logit is within rounding of 0
(docs/models.md).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from typing import NamedTuple

import torch
from torch import nn

from ._backend import use_backend
from .records import RECORDS, tolerance, where
from .records.masked_attention import _mha_unsupported  # noqa: F401  (kept importable from here)

__all__ = ["patch", "PatchReport", "ProbeResult", "OPS"]

#: names of the ops ``patch`` can swap (records with a recogniser)
OPS = tuple(r.name for r in RECORDS if r.patchable)


class Replaced(NamedTuple):
    path: str
    op: str
    old: str  # class name of the module replaced
    new: str  # class name of the drop-in


class Skipped(NamedTuple):
    path: str
    op: str
    reason: str


@dataclasses.dataclass
class ProbeResult:
    """One verification probe, shared by every module in ``paths`` (same type and configuration).

    ``ok``: True = agree, False = disagree or the probe failed (``error``), None = not run (dry run).
    ``difference``: the largest relative L2 difference over ``results`` (inf where an output was not finite
    or had another shape); ``results``: one dict per compared quantity (probe, quantity, rel, max_abs);
    ``seconds``: its wall time (kernel compilation included on a GPU's first call)."""

    op: str
    module: str
    paths: list
    ok: bool | None = None
    difference: float | None = None
    tol: float | None = None
    results: list = dataclasses.field(default_factory=list)
    error: str = ""
    seconds: float = 0.0  # wall time of the probe

    def worst(self) -> dict | None:
        return max(self.results, key=lambda r: r["rel"], default=None)

    def summary(self) -> str:
        if self.ok is None:
            return "not run"
        if self.error:
            return f"the probe failed ({self.error})"
        w = self.worst()
        if w is None:
            return "nothing compared"
        rel = "non-finite or mismatched" if w["rel"] == float("inf") else f"{w['rel']:.1e}"
        return (f"largest rel. L2 difference {rel} ({w['quantity']}, {w['probe']}) "
                f"{'<=' if self.ok else '>'} tol {self.tol:.0e}")


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced (``replaced``: (path, op, old class, new class)), what it recognised but
    left alone (``skipped``: (path, op, reason); a probe's reason gives the measured difference), the
    verification probes (``probes``: :class:`ProbeResult`, one per type and configuration; ``verified``:
    replaced paths whose probe agreed) and general ``notes``."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    dry_run: bool = False
    deeper: list = dataclasses.field(default_factory=list)  # (path, what): patches beyond module swaps
    probes: list = dataclasses.field(default_factory=list)
    verify: bool | str = True

    def count(self, op: str | None = None) -> int:
        return sum(1 for r in self.replaced if op is None or r[1] == op)

    def probe_of(self, path: str) -> ProbeResult | None:
        """The probe that verified (or refused) the module at ``path``."""
        return next((p for p in self.probes if path in p.paths), None)

    @property
    def verified(self) -> list:
        return [r[0] for r in self.replaced if (p := self.probe_of(r[0])) is not None and p.ok]

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"fastseg.patch: {verb} {len(self.replaced)} module(s)"]
        for path, op, old, new in self.replaced:
            p = self.probe_of(path)
            tag = "" if p is None else " (to be verified)" if p.ok is None else f" (verified: {p.summary()})"
            lines.append(f"  {path}: {old} -> {new} [{op}]{tag}")
        lines += [f"  {path}: {what} [deeper patch]" for path, what in self.deeper]
        lines += [f"  skipped {path} [{op}]: {why}" for path, op, why in self.skipped]
        if self.dry_run and self.probes:
            lines.append(f"  would probe {len(self.probes)} time(s) before swapping: "
                         + "; ".join(f"{p.module} [{p.op}] for {len(p.paths)} module(s)" for p in self.probes))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parents(model: nn.Module):
    """Yield (path, parent, attribute name, child) for every submodule (each child once per parent)."""
    for ppath, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            yield (f"{ppath}.{name}" if ppath else name), parent, name, child


# --- verification -----------------------------------------------------------------------------------------

_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _plain(v):
    """``v`` if it is a plain value (numbers, strings, dtypes, tuples of them ...), else a ``TypeError``."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)):
        return type(v).__name__, tuple(_plain(x) for x in v)
    raise TypeError


def _fingerprint(m: nn.Module):
    """Hashable key of everything besides weight values that can make two modules compute different functions:
    the type and plain attributes of the module and of every submodule, parameter and buffer shapes / dtypes /
    devices / requires_grad. None when an instance holds anything else (a function, an object): not shared."""
    key = []
    for name, sub in m.named_modules(remove_duplicate=False):
        try:
            attrs = tuple(sorted((k, _plain(v)) for k, v in vars(sub).items() if k not in _MODULE_INTERNALS))
        except TypeError:
            return None
        params = tuple((n, None if p is None else (tuple(p.shape), p.dtype, p.device, p.requires_grad))
                       for n, p in sub._parameters.items())
        buffers = tuple((n, None if b is None else (tuple(b.shape), b.dtype, b.device))
                        for n, b in sub._buffers.items())
        key.append((name, type(sub), attrs, params, buffers))
    return tuple(key)


def _private_copy(m: nn.Module) -> nn.Module:
    """A deep copy of ``m`` without its hooks (they are neither copied nor run)."""
    memo = {}
    for sub in m.modules():
        for attr in _HOOK_DICTS:
            d = getattr(sub, attr, None)
            if d is not None:
                memo[id(d)] = type(d)()
    return copy.deepcopy(m, memo)


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs, relative L2) difference of ``a`` to ``b``; inf where either is not finite."""
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf"), float("inf")
    diff = (a - b).abs()
    den = b.norm().item()
    return (diff.max().item() if diff.numel() else 0.0), (diff.norm().item() / den if den else diff.norm().item())


def _run_case(mod: nn.Module, case, mode: bool, grads: bool, g_out):
    """Forward (and gradients) of one probe case: (output, {label: grad})."""
    mod.train(mode)
    xs = [x.detach().clone().requires_grad_(grads) if isinstance(x, torch.Tensor) and x.is_floating_point()
          else x for x in case.inputs]
    with torch.set_grad_enabled(grads):
        out = case.call(mod, *xs)
    if not grads:
        return out, {}
    labels = [f"grad input {i}" for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.requires_grad]
    leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    named = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
    labels += [f"grad {n}" for n, _ in named]
    leaves += [p for _, p in named]
    go = g_out(out)
    if case.keep is not None:
        go = go * case.keep
    got = torch.autograd.grad(out, leaves, go, allow_unused=True)
    return out, {lab: (torch.zeros_like(x) if gr is None else gr) for lab, x, gr in zip(labels, leaves, got)}


def _keep_rng(device: torch.device):
    """Restore the CPU (and ``device``'s CUDA) generator state on exit: building a drop-in initialises its
    weights before loading the original's, and a probed fork may draw random numbers."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _probe(rec, cls, child: nn.Module, paths: list, on_cpu: bool = False) -> ProbeResult:
    """Run ``child`` (a private copy) and its drop-in on ``rec``'s probe inputs; compare. Touches nothing of
    ``child``: private copies, a private generator, global RNG states restored, ``autograd.grad`` only.
    ``on_cpu``: float64 CPU copies, fastseg's PyTorch path (``verify="cpu"``)."""
    device, dtype = where(child)
    if on_cpu:
        device, dtype = torch.device("cpu"), torch.float64
    res = ProbeResult(rec.name, type(child).__name__, paths, tol=tolerance(dtype, device))
    if device.type == "meta":
        res.ok, res.error = False, "its parameters are on the meta device, nothing to compute with (verify=False swaps)"
        return res
    backend = use_backend("torch") if on_cpu else contextlib.nullcontext()
    try:
        with _keep_rng(where(child)[0]), backend:
            g = torch.Generator().manual_seed(0)
            orig = _private_copy(child)
            if on_cpu:
                orig = orig.to(device=device, dtype=dtype)
            new = rec.build(cls, _private_copy(orig))
            for case in rec.probe(orig, device, dtype, g):
                mode = child.training if case.train is None else case.train
                grads = child.training and case.grad
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))

                def g_out(out):
                    gen = torch.Generator().manual_seed(seed)
                    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
                out_o, grads_o = _run_case(orig, case, mode, grads, g_out)
                out_n, grads_n = _run_case(new, case, mode, grads, g_out)
                pairs = [("forward", out_n, out_o)] + [(k, grads_n.get(k), v) for k, v in grads_o.items()]
                for quantity, a, b in pairs:
                    if a is None or b is None or a.shape != b.shape:
                        shapes = f"{None if a is None else tuple(a.shape)} vs {None if b is None else tuple(b.shape)}"
                        res.results.append(dict(probe=case.what, quantity=f"{quantity} (shape {shapes})",
                                                rel=float("inf"), max_abs=float("inf")))
                        continue
                    if quantity == "forward" and case.keep is not None:
                        keep = case.keep.expand_as(a)
                        a, b = a[keep], b[keep]
                    max_abs, rel = _rel(a, b)
                    res.results.append(dict(probe=case.what, quantity=quantity, rel=rel, max_abs=max_abs))
    except Exception as exc:  # noqa: BLE001 - reported: the module is not swapped
        res.ok, res.error = False, f"{type(exc).__name__}: {exc}"
        return res
    res.difference = max((r["rel"] for r in res.results), default=0.0)
    res.ok = bool(res.results) and res.difference <= res.tol
    return res


# --- patch ------------------------------------------------------------------------------------------------

def patch(model: nn.Module, ops=None, dry_run: bool = False, verify: bool | str = True
          ) -> tuple[nn.Module, PatchReport]:
    """Replace, in place, every module of ``model`` that fastseg has a drop-in for; returns
    ``(model, report)``. ``ops``: subset of :data:`OPS` (default: all). ``dry_run``: report only (no probe
    runs; ``report.probes`` lists those a real run would do). ``verify``: probe each swap first, on the
    module's device and dtype (see the module docstring); ``"cpu"``: probe float64 CPU copies with fastseg's
    PyTorch path instead (checks the module's math without compiling or autotuning kernels for the probe
    shapes on a GPU; not the kernels on that device); ``False``: no probe, the drop-ins' faithfulness is the
    caller's responsibility."""
    if verify not in (True, False, "cpu"):
        raise ValueError(f"verify must be True, False or 'cpu', got {verify!r}")
    ops = OPS if ops is None else tuple([ops] if isinstance(ops, str) else ops)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; expected a subset of {OPS}")
    report = PatchReport(dry_run=dry_run, verify=verify)
    records = [r for r in RECORDS if r.patchable]
    classes = {r.name: r.fastseg_class() for r in records}
    plan = []
    for path, parent, name, child in list(_parents(model)):
        if any(isinstance(child, c) for c in classes.values() if c is not None):
            continue
        rec = next((r for r in records if r.matches(parent, name, child)), None)
        if rec is None or rec.name not in ops:
            continue
        cls = classes[rec.name]
        if cls is None:
            report.skipped.append(Skipped(path, rec.name, f"fastseg.nn.{rec.nn_class} is not available in this build"))
            continue
        why = rec.why_not(child)
        if why:
            report.skipped.append(Skipped(path, rec.name, why))
            continue
        plan.append((path, parent, name, child, rec, cls))
    verdict: dict[int, ProbeResult] = {}  # id(module) -> its probe
    if verify:
        groups: dict = {}  # fingerprint -> ProbeResult
        for path, _, _, child, rec, cls in plan:
            if id(child) in verdict:  # a module shared by several parents
                verdict[id(child)].paths.append(path)
                continue
            key = _fingerprint(child)
            key = (rec.name, key) if key is not None else ("unshared", id(child))
            if key in groups:
                groups[key].paths.append(path)
            else:
                start = time.perf_counter()
                groups[key] = ProbeResult(rec.name, type(child).__name__, [path]) if dry_run else \
                    _probe(rec, cls, child, [path], on_cpu=verify == "cpu")
                groups[key].seconds = 0.0 if dry_run else time.perf_counter() - start
                report.probes.append(groups[key])
            verdict[id(child)] = groups[key]
    done: dict[int, nn.Module] = {}  # id(old) -> new (a module shared by several parents is replaced once)
    swapped = []
    for path, parent, name, child, rec, cls in plan:
        probe = verdict.get(id(child))
        if probe is not None and probe.ok is False:
            why = (f"not swapped: the probe of {type(child).__name__} vs fastseg.nn.{rec.nn_class} failed: "
                   f"{probe.error}" if probe.error else f"not swapped: {type(child).__name__} and fastseg.nn."
                   f"{rec.nn_class} disagree on the probe: {probe.summary()}")
            report.skipped.append(Skipped(path, rec.name, why))
            continue
        if not dry_run and id(child) not in done:
            try:
                with _keep_rng(where(child)[0]):
                    done[id(child)] = rec.build(cls, child)
            except Exception as exc:  # noqa: BLE001 - reported: the module is not swapped
                done[id(child)] = exc
        if isinstance(done.get(id(child)), Exception):
            report.skipped.append(Skipped(path, rec.name, f"could not build fastseg.nn.{rec.nn_class} from it: "
                                          f"{type(done[id(child)]).__name__}: {done[id(child)]}"))
            continue
        new_name = type(done[id(child)]).__name__ if id(child) in done else cls.__name__  # e.g. a fused CAC head
        report.replaced.append(Replaced(path, rec.name, type(child).__name__, new_name))
        swapped.append((path, parent, name, child, rec, cls))
    for path, parent, name, child, rec, cls in ([] if dry_run else swapped):
        setattr(parent, name, done[id(child)])
    if plan and not verify:
        report.notes.append("verify=False: modules swapped without a probe; that each drop-in computes the replaced "
                            "module's function is the caller's responsibility")
    if "masked_attention" in ops:
        from .models.hf_decoders import note_hf_attention_interface, patch_hf_decoders

        _deeper_mask_predictors(model, swapped, report, dry_run)
        _hf_attention_weight_requests(model, swapped, report, dry_run)
        new_ids = {id(child) for _, _, _, child, rec, _ in swapped if rec.name == "masked_attention"}
        patch_hf_decoders(model, new_ids, classes.get("masked_attention"), report, dry_run, verify)
        note_hf_attention_interface(model, report)
    if any(hasattr(m, "set_fused") and not hasattr(m, "apd_proj") for m in model.modules()):  # not CAC heads
        report.notes.append("this model also has set_fused(True) (point-sampled losses, tiled inference, no "
                            "(B, Q, H/4, W/4) logits); not switched on by patch() because it changes the output "
                            "layout (pred_embeds + mask_features instead of pred_masks)")
    return model, report


def _deeper_mask_predictors(model: nn.Module, plan: list, report: PatchReport, dry_run: bool) -> None:
    """Decoders whose own code can hand packed masks to the attention (this project's Mask2Former decoder:
    ``packed_attn_masks`` + ``fused_attention_mask``): once every cross-attention layer takes packed masks,
    switch the mask predictor to build them straight from the query embeddings and the mask features resized
    once per level (``fastseg.ops.mask_from_embeddings``), instead of resizing (B, Q, H/4, W/4) logits and
    repeating a bool mask over the heads. Outputs keep their layout; see docs/models.md for the ties."""
    new_ids = {id(child) for _, _, _, child, rec, _ in plan if rec.name == "masked_attention"}
    mca = next(r for r in RECORDS if r.name == "masked_attention").fastseg_class()
    for path, m in model.named_modules():
        layers = getattr(m, "transformer_cross_attention_layers", None)
        if not (hasattr(m, "packed_attn_masks") and hasattr(m, "fused_attention_mask") and layers is not None):
            continue
        if m.packed_attn_masks or getattr(m, "fused", False) or len(layers) == 0:
            continue
        attns = [getattr(layer, "multihead_attn", None) for layer in layers]
        if not all(a is not None and (getattr(a, "accepts_packed_mask", False) or id(a) in new_ids
                                      or (mca is not None and isinstance(a, mca))) for a in attns):
            continue
        report.deeper.append((path or "<model>", "mask predictor -> bit-packed attention masks straight from the "
                              "query embeddings (packed_attn_masks=True; no (B·heads, Q, HW) mask tensor)"))
        if not dry_run:
            m.packed_attn_masks = True


# Decoder layers that call their nn.MultiheadAttention cross-attention without need_weights (so with PyTorch's
# default need_weights=True): layer class (module.qualname) -> (path of the attention inside the layer, whether
# the layer returns the weights when called with ``output_attentions``; False: it always discards them, e.g.
# ``self.multihead_attn(...)[0]``).
_WEIGHT_USERS = {
    "transformers.models.mask2former.modeling_mask2former.Mask2FormerMaskedAttentionDecoderLayer": ("cross_attn", True),
    "transformers.models.oneformer.modeling_oneformer.OneFormerTransformerDecoderLayer":
        ("cross_attn.multihead_attn", True),
    "transformers.models.oneformer.modeling_oneformer.OneFormerTransformerDecoderQueryTransformerDecoderLayer":
        ("multihead_attn", False),
    "fastseg.models.mask2former.CrossAttentionLayer": ("multihead_attn", False),
    "fastseg.models.maskformer.TransformerDecoderLayer": ("multihead_attn", False),
    # official code bases (facebookresearch/Mask2Former, MaskFormer, detr): ``self.multihead_attn(...)[0]``
    "mask2former.modeling.transformer_decoder.mask2former_transformer_decoder.CrossAttentionLayer":
        ("multihead_attn", False),
    "mask_former.modeling.transformer.transformer.TransformerDecoderLayer": ("multihead_attn", False),
    "models.transformer.TransformerDecoderLayer": ("multihead_attn", False),
}


def _hf_output_attentions(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    """The ``output_attentions`` argument of a call of ``layer`` (default False), positional or keyword."""
    import inspect

    try:
        bound = inspect.signature(layer.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return bool(kwargs.get("output_attentions", False))
    return bool(bound.arguments.get("output_attentions", False))


def _hf_request_weights(layer: nn.Module, args: tuple, kwargs: dict, *, attn: str) -> None:
    """Forward pre-hook: the layer's attention computes weights exactly when the layer returns them."""
    layer.get_submodule(attn).need_weights_default = _hf_output_attentions(layer, args, kwargs)


def _hf_attention_weight_requests(model: nn.Module, plan: list, report: PatchReport, dry_run: bool) -> None:
    """Decoder layers (:data:`_WEIGHT_USERS`) call their cross-attention with PyTorch's default
    ``need_weights=True``: Hugging Face Mask2Former / OneFormer use the weights only with
    ``output_attentions=True``, OneFormer's query transformer and the official / this project's Mask2Former,
    MaskFormer and DETR layers never. For each such layer whose attention was replaced, the replacement
    computes weights exactly when the layer will return them: ``need_weights_default = False``, and for the
    Hugging Face layers a forward pre-hook that sets it from the layer's ``output_attentions``. So the default
    path builds nothing of size Q·HW and ``output_attentions=True`` returns the original's weights."""
    import functools

    new = {id(child) for _, _, _, child, rec, _ in plan if rec.name == "masked_attention"}
    mca = next(r for r in RECORDS if r.name == "masked_attention").fastseg_class()
    silenced = 0
    for path, layer in model.named_modules():
        rule = _WEIGHT_USERS.get(f"{type(layer).__module__}.{type(layer).__qualname__}")
        if rule is None or getattr(layer, "_fastseg_weights_patched", False):
            continue
        attn_path, returned = rule
        try:
            attn = layer.get_submodule(attn_path)
        except AttributeError:
            continue
        if not (id(attn) in new or (mca is not None and isinstance(attn, mca))):
            continue
        if returned:
            report.deeper.append((f"{path}.{attn_path}" if path else attn_path,
                                  "attention weights computed only with output_attentions=True"))
        if dry_run:
            continue
        layer.get_submodule(attn_path).need_weights_default = False  # the replacement
        if returned:
            layer.register_forward_pre_hook(functools.partial(_hf_request_weights, attn=attn_path), with_kwargs=True)
        else:
            silenced += 1
        layer._fastseg_weights_patched = True
    if silenced:
        report.notes.append(f"{silenced} cross-attention(s) whose decoder layer discards the attention weights "
                            "(self.multihead_attn(...)[0]): need_weights_default=False, no weights computed")
