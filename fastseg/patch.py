"""``fastseg.patch(model)``: swap every module fastseg has a drop-in for, in place, by structure.

Recognised (each op is skipped, with a note, when its fastseg class is not in this build):

* ``"masked_attention"``: an ``nn.MultiheadAttention`` used as the cross-attention of a transformer decoder
  layer — attribute named ``multihead_attn`` / ``cross_attn`` / ``encoder_attn`` / ``cross_attention`` in a
  layer that also holds a ``LayerNorm`` (official Mask2Former ``CrossAttentionLayer``, Hugging Face
  ``Mask2FormerMaskedAttentionDecoderLayer``, DETR/MaskFormer decoder layers, this project's models) ->
  :class:`fastseg.nn.MaskedCrossAttention` (``from_mha``). Self-attention is left alone (its callers may use
  the attention weights). Not replaced: attention dropout > 0, ``add_bias_kv``, ``add_zero_attn``.
* ``"msca"``: SegNeXt's attention module, official ``AttentionModule`` and mmsegmentation ``MSCAAttention``
  layouts (convs ``conv0``, ``conv0_1`` … ``conv2_2``, ``conv3``) -> :class:`fastseg.nn.MSCA`.
* ``"context_cluster"``: Context Clusters' ``Cluster`` (convs ``f``, ``v``, ``proj``, parameters
  ``sim_alpha``, ``sim_beta``, pooling ``centers_proposal``) -> :class:`fastseg.nn.ContextCluster`.
* ``"ms_deform_attn"``: multi-scale deformable attention with Linear ``sampling_offsets``,
  ``attention_weights``, ``value_proj``, ``output_proj`` — the official Deformable DETR / Mask2Former
  ``MSDeformAttn`` (forward ``(query, reference_points, input_flatten, input_spatial_shapes,
  input_level_start_index, input_padding_mask)``) -> :class:`fastseg.nn.MSDeformAttn`, and Hugging Face's
  ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` (keyword call with ``spatial_shapes_list``)
  -> :class:`fastseg.nn.MSDeformAttnHF`. This project's own pixel-decoder module (list of shapes, no level start
  index) is not swapped: it has its own ``fused`` switch (``MSDeformAttnPixelDecoder.set_fused``).

Deeper patch (``report.deeper``): where the model's own code allows it — this project's Mask2Former decoder
(recognised by its ``packed_attn_masks`` switch and ``fused_attention_mask`` method, once all its
cross-attentions are fastseg's) — the mask predictor is switched to produce the bit-packed attention masks
straight from the query embeddings (``fastseg.ops.mask_from_embeddings``), with no (B·heads, Q, HW) tensor.
Hugging Face's decoder post-processes the predictor's bool mask itself, so there the attention packs it
(said in ``report.notes``).

Weights (state_dict), device, dtype, ``requires_grad`` and train/eval mode are kept; hooks registered on a
replaced module are not carried over. Patched and unpatched models compute the same function (to float
tolerance): the drop-ins implement the originals' math, and a Mask2Former decoder resets fully-masked rows
before the attention, so the drop-in's empty-row convention (output 0 instead of NaN) never shows. The deeper
patch thresholds ``e · resize(F)`` instead of ``resize(e · F)``: equal up to rounding, so a mask bit can
differ only where a logit is within rounding of 0 (docs/models.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect

import torch

from torch import nn

__all__ = ["patch", "PatchReport", "OPS"]

OPS = ("masked_attention", "msca", "context_cluster", "ms_deform_attn")
_CROSS_NAMES = ("multihead_attn", "cross_attn", "encoder_attn", "cross_attention")
_MSCA_CONVS = {  # name -> (kernel size, depthwise)
    "conv0": ((5, 5), True), "conv0_1": ((1, 7), True), "conv0_2": ((7, 1), True),
    "conv1_1": ((1, 11), True), "conv1_2": ((11, 1), True), "conv2_1": ((1, 21), True),
    "conv2_2": ((21, 1), True), "conv3": ((1, 1), False),
}


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced (``replaced``: (path, op, old class, new class)), what it recognised but
    left alone (``skipped``: (path, op, reason)) and general ``notes``."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    dry_run: bool = False
    deeper: list = dataclasses.field(default_factory=list)  # (path, what): patches beyond module swaps

    def count(self, op: str | None = None) -> int:
        return sum(1 for r in self.replaced if op is None or r[1] == op)

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"fastseg.patch: {verb} {len(self.replaced)} module(s)"]
        lines += [f"  {path}: {old} -> {new} [{op}]" for path, op, old, new in self.replaced]
        lines += [f"  {path}: {what} [deeper patch]" for path, what in self.deeper]
        lines += [f"  skipped {path} [{op}]: {why}" for path, op, why in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fastseg_class(name: str):
    try:
        return getattr(importlib.import_module("fastseg.nn"), name, None)
    except ImportError:
        return None


def _parents(model: nn.Module):
    """Yield (path, parent, attribute name, child) for every submodule (each child once per parent)."""
    for ppath, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            yield (f"{ppath}.{name}" if ppath else name), parent, name, child


def _is_cross_attention(parent: nn.Module, name: str, child: nn.Module) -> bool:
    if not isinstance(child, nn.MultiheadAttention) or name not in _CROSS_NAMES:
        return False
    return any(isinstance(m, nn.LayerNorm) for m in parent.children())


def _mha_unsupported(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported by the fused kernel"
    if m.dropout > 0:
        return f"attention dropout {m.dropout} > 0 is not supported by the fused kernel"
    return None


def _is_msca(m: nn.Module) -> bool:
    convs = {n: getattr(m, n, None) for n in _MSCA_CONVS}
    if not all(isinstance(c, nn.Conv2d) for c in convs.values()):
        return False
    dim = convs["conv0"].in_channels
    for n, (k, dw) in _MSCA_CONVS.items():
        c = convs[n]
        if c.in_channels != dim or c.out_channels != dim or tuple(c.kernel_size) != k or (dw and c.groups != dim):
            return False
    return True


def _is_context_cluster(m: nn.Module) -> bool:
    ok = all(isinstance(getattr(m, n, None), nn.Conv2d) for n in ("f", "v", "proj"))
    ok = ok and all(isinstance(getattr(m, n, None), nn.Parameter) for n in ("sim_alpha", "sim_beta"))
    ok = ok and isinstance(getattr(m, "centers_proposal", None), nn.AdaptiveAvgPool2d)
    return ok and all(hasattr(m, a) for a in ("heads", "head_dim", "fold_w", "fold_h"))


def _msda_convention(m: nn.Module) -> str | None:
    """"official" / "hf" from the forward signature of a module with MSDeformAttn's parameters, else None."""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in
               ("sampling_offsets", "attention_weights", "value_proj", "output_proj")):
        return None
    if not all(isinstance(getattr(m, a, None), int) for a in ("d_model", "n_levels", "n_heads", "n_points")):
        return None
    C, L, M, P = m.d_model, m.n_levels, m.n_heads, m.n_points
    if M <= 0 or C % M or m.sampling_offsets.out_features != M * L * P * 2 \
            or m.attention_weights.out_features != M * L * P:
        return None
    if any(lin.in_features != C for lin in (m.sampling_offsets, m.attention_weights, m.value_proj, m.output_proj)) \
            or m.value_proj.out_features != C or m.output_proj.out_features != C:
        return None
    try:
        params = list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return None
    if params[1:7] == ["query", "reference_points", "input_flatten", "input_spatial_shapes",
                       "input_level_start_index", "input_padding_mask"]:
        return "official"
    if all(p in params for p in ("hidden_states", "encoder_hidden_states", "reference_points",
                                 "spatial_shapes_list", "level_start_index")):
        return "hf"
    return None


def _is_ms_deform_attn(m: nn.Module) -> bool:
    """Official ``MSDeformAttn`` or Hugging Face's Mask2Former pixel-decoder deformable attention."""
    return _msda_convention(m) is not None


def _new_ms_deform_attn(m: nn.Module) -> nn.Module:
    """The fastseg drop-in (``MSDeformAttn`` / ``MSDeformAttnHF``) holding ``m``'s weights."""
    name = "MSDeformAttnHF" if _msda_convention(m) == "hf" else "MSDeformAttn"
    cls = _fastseg_class(name)
    if cls is None:
        raise RuntimeError(f"fastseg.nn.{name} is not available in this build")
    return cls.from_module(m)


def _probe_ms_deform_attn(m: nn.Module) -> tuple[tuple, dict]:
    """Example forward ``(args, kwargs)`` for ``m`` (small odd level shapes, batch 2, 5 queries), on its
    device and dtype: positional for the official module, keywords for Hugging Face's."""
    ref = m.value_proj.weight
    g = torch.Generator().manual_seed(0)
    shapes_list = [(3 + l, 4 + 2 * l) for l in range(m.n_levels)]
    S = sum(h * w for h, w in shapes_list)

    def rnd(*shape, scale=1.0):
        return (torch.rand(shape, generator=g) * scale).to(device=ref.device, dtype=ref.dtype)

    query, flat = rnd(2, 5, m.d_model) - 0.5, rnd(2, S, m.d_model) - 0.5
    refs = rnd(2, 5, m.n_levels, 2)
    shapes = torch.tensor(shapes_list, dtype=torch.long, device=ref.device)
    starts = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    if _msda_convention(m) == "hf":
        return (), dict(hidden_states=query, attention_mask=None, encoder_hidden_states=flat,
                        encoder_attention_mask=None, position_embeddings=None, reference_points=refs,
                        spatial_shapes_list=shapes_list, level_start_index=starts)
    return (query, refs, flat, shapes, starts, None), {}


def _finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy weights, device, dtype, requires_grad and train/eval mode from ``old``."""
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    flags = dict(old.named_parameters())
    for n, p in new.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n].requires_grad)
    return new.train(old.training)


def _new_msca(cls, m: nn.Module) -> nn.Module:
    if hasattr(cls, "from_module"):
        return cls.from_module(m)
    return _finish(cls(m.conv0.in_channels), m)


def _new_context_cluster(cls, m: nn.Module) -> nn.Module:
    if hasattr(cls, "from_module"):
        return cls.from_module(m)
    pw, ph = m.centers_proposal.output_size if isinstance(m.centers_proposal.output_size, tuple) else \
        (m.centers_proposal.output_size,) * 2
    new = cls(m.f.in_channels, m.proj.out_channels, proposal_w=pw, proposal_h=ph, fold_w=m.fold_w,
              fold_h=m.fold_h, heads=m.heads, head_dim=m.head_dim, return_center=getattr(m, "return_center", False))
    return _finish(new, m)


def patch(model: nn.Module, ops=None, dry_run: bool = False) -> tuple[nn.Module, PatchReport]:
    """Replace, in place, every module of ``model`` that fastseg has a drop-in for; returns
    ``(model, report)``. ``ops``: subset of :data:`OPS` (default: all). ``dry_run``: report only."""
    ops = OPS if ops is None else tuple([ops] if isinstance(ops, str) else ops)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; expected a subset of {OPS}")
    report = PatchReport(dry_run=dry_run)
    classes = {"masked_attention": _fastseg_class("MaskedCrossAttention"), "msca": _fastseg_class("MSCA"),
               "context_cluster": _fastseg_class("ContextCluster"),
               "ms_deform_attn": _fastseg_class("MSDeformAttn")}
    names = {"masked_attention": "MaskedCrossAttention", "msca": "MSCA", "context_cluster": "ContextCluster",
             "ms_deform_attn": "MSDeformAttn"}
    done: dict[int, nn.Module] = {}  # id(old) -> new (a module shared by several parents is replaced once)
    plan = []
    for path, parent, name, child in list(_parents(model)):
        if id(child) in done or any(isinstance(child, c) for c in classes.values() if c is not None):
            continue
        if _is_cross_attention(parent, name, child):
            op = "masked_attention"
        elif _is_msca(child):
            op = "msca"
        elif _is_context_cluster(child):
            op = "context_cluster"
        elif _is_ms_deform_attn(child):
            op = "ms_deform_attn"
        else:
            continue
        if op not in ops:
            continue
        cls = classes[op]
        if cls is None:
            report.skipped.append((path, op, f"fastseg.nn.{names[op]} is not available in this build"))
            continue
        why = _mha_unsupported(child) if op == "masked_attention" else None
        if why:
            report.skipped.append((path, op, why))
            continue
        plan.append((path, parent, name, child, op, cls))
    for path, parent, name, child, op, cls in plan:
        new_name = ("MSDeformAttnHF" if _msda_convention(child) == "hf" else cls.__name__) \
            if op == "ms_deform_attn" else cls.__name__
        report.replaced.append((path, op, type(child).__name__, new_name))
        if dry_run:
            continue
        if id(child) not in done:
            if op == "masked_attention":
                done[id(child)] = cls.from_mha(child)
            elif op == "msca":
                done[id(child)] = _new_msca(cls, child)
            elif op == "ms_deform_attn":
                done[id(child)] = _new_ms_deform_attn(child)
            else:
                done[id(child)] = _new_context_cluster(cls, child)
        setattr(parent, name, done[id(child)])
    if "masked_attention" in ops:
        _deeper_mask_predictors(model, plan, report, dry_run)
    if report.count("masked_attention") and any(hasattr(m, "mask_embedder") and hasattr(m, "num_heads")
                                                for m in model.modules()):
        report.notes.append("Hugging Face Mask2Former: its decoder post-processes the mask predictor's bool "
                            "(B·heads, Q, HW) mask (empty-row reset by multiplication) before the attention, so "
                            "the predictor cannot hand over packed masks without rewriting the decoder's forward; "
                            "MaskedCrossAttention packs that mask once per layer (one pass, heads shared when "
                            "the mask is expanded)")
    if any(hasattr(m, "set_fused") for m in model.modules()):
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
    new_ids = {id(child) for _, _, _, child, op, _ in plan if op == "masked_attention"}
    mca = _fastseg_class("MaskedCrossAttention")
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
