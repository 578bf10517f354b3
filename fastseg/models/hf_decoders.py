"""Hugging Face Mask2Former / OneFormer decoders whose attention masks come bit-packed from the embeddings.

Hugging Face builds each masked-attention layer's mask as (``Mask2FormerMaskPredictor.forward``,
``OneFormerTransformerDecoder.forward_prediction_heads``)::

    logits = einsum("bqc,bchw->bqhw", mask_embed, pixel_embeddings)              # (B, Q, H/4, W/4), returned
    mask = interpolate(logits, size=level, mode="bilinear", align_corners=False)  # (B, Q, h, w)
    mask = (mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5).detach()

and resets a query row with every pixel masked to "attend everywhere" just before the layer (Mask2Former: in
the decoder loop, by multiplication; OneFormer: in the decoder layer, by indexing). :func:`patch_hf_decoders`
binds a forward to such a decoder (and, for OneFormer, to its layers) that follows Hugging Face's line by
line except for that path: the pixel embeddings are resized once per level (same ``interpolate`` call on
(B, C, H/4, W/4) instead of (B, Q, H/4, W/4)), and :func:`fastseg.ops.mask_from_embeddings` forms
``mask_embed · resized`` tile by tile, keeps its sign (allowed iff >= 0) and applies the empty-row reset,
bit-packed, one (B, 1, Q, ceil(h·w / 32)) int32 mask shared by the heads. The (B, Q, H/4, W/4) logits are
still computed (they are the outputs), the (B, Q, h, w) resized logits and the (B·heads, Q, h·w) mask never.
The last predictor call's attention mask (unused by Hugging Face) is not built.

Bilinear resizing and the per-query dot product commute only in exact arithmetic, and ``sigmoid(x) < 0.5``
is ``x < 0`` only where ``sigmoid`` does not round to 0.5: a mask bit can differ where a logit is within
rounding of 0 (docs/models.md, "Hugging Face decoders, fused mask path").

Recognised by structure (no transformers import): a module whose class lives in a ``transformers`` model
module next to the output dataclass, with the attributes and forward parameters used here and every
cross-attention a :class:`fastseg.nn.MaskedCrossAttention`. Before binding, a private copy runs Hugging
Face's forward and the fused one on a probe input (forward outputs, and gradients in training mode), with
fastseg's PyTorch path.
"""
from __future__ import annotations

import functools
import inspect
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_attention import PackedMask, mask_from_embeddings

__all__ = ["patch_hf_decoders", "note_hf_attention_interface", "mask2former_decoder_forward",
           "oneformer_decoder_forward", "oneformer_layer_forward"]

_M2F_OUTPUT = "Mask2FormerMaskedAttentionDecoderOutput"
_ONEFORMER_OUTPUT = "OneFormerTransformerDecoderOutput"
_M2F_ARGS = ("inputs_embeds", "multi_stage_positional_embeddings", "pixel_embeddings", "encoder_hidden_states",
             "query_position_embeddings", "feature_size_list", "output_attentions", "output_hidden_states",
             "return_dict")
_ONEFORMER_ARGS = ("task_token", "multi_stage_features", "multi_stage_positional_embeddings", "mask_features",
                   "query_features", "query_embeddings", "query_embedder", "size_list", "output_attentions")
_ONEFORMER_LAYER_ARGS = ("index", "output", "multi_stage_features", "multi_stage_positional_embeddings",
                         "attention_mask", "query_embeddings", "output_attentions")
WHAT = ("attention masks bit-packed and head-shared straight from the mask embeddings and the pixel "
        "embeddings resized once per level (fastseg.ops.mask_from_embeddings; no (B·heads, Q, HW) mask, no "
        "resized (B, Q, h, w) logits)")


class _LevelMasks:
    """Attention masks of one forward: the pixel embeddings resized to each level once (detached, as Hugging
    Face detaches the mask), then ``mask_from_embeddings``."""

    def __init__(self, pixel_embeddings: torch.Tensor):
        self.pixel, self.levels = pixel_embeddings.detach(), {}

    def __call__(self, mask_embed: torch.Tensor, size) -> PackedMask:
        size = tuple(int(s) for s in size)
        if size not in self.levels:
            self.levels[size] = F.interpolate(self.pixel, size=size, mode="bilinear", align_corners=False)
        return mask_from_embeddings(mask_embed, self.levels[size], reset_empty=True)


def _output_class(module: nn.Module, name: str):
    return getattr(sys.modules.get(type(module).__module__), name, None)


# --- Mask2Former --------------------------------------------------------------------------------------------

def _m2f_predict(predictor: nn.Module, hidden: torch.Tensor, pixel_embeddings: torch.Tensor, masks: _LevelMasks,
                 size, need_mask: bool):
    """``Mask2FormerMaskPredictor.forward`` with the attention mask packed (None when ``need_mask`` is False)."""
    mask_embeddings = predictor.mask_embedder(hidden.transpose(0, 1))
    outputs_mask = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
    return outputs_mask, (masks(mask_embeddings, size) if need_mask else None)


def mask2former_decoder_forward(self, inputs_embeds=None, multi_stage_positional_embeddings=None,
                                pixel_embeddings=None, encoder_hidden_states=None, query_position_embeddings=None,
                                feature_size_list=None, output_attentions=None, output_hidden_states=None,
                                return_dict=None):
    """``Mask2FormerMaskedAttentionDecoder.forward`` (written from transformers 5.24; the probe checks the
    installed version) with packed attention masks; the empty-row reset is done by ``mask_from_embeddings``.
    Same arguments and outputs."""
    output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
    output_hidden_states = (output_hidden_states if output_hidden_states is not None
                            else self.config.output_hidden_states)
    return_dict = return_dict if return_dict is not None else self.config.return_dict
    if inputs_embeds is not None:
        hidden_states = inputs_embeds
    masks = _LevelMasks(pixel_embeddings)
    n_layers = len(self.layers)
    intermediate = ()
    all_hidden_states = () if output_hidden_states else None
    attentions = () if output_attentions else None
    intermediate_hidden_states = self.layernorm(inputs_embeds)
    intermediate += (intermediate_hidden_states,)
    predicted_mask, attention_mask = _m2f_predict(self.mask_predictor, intermediate_hidden_states, pixel_embeddings,
                                                  masks, feature_size_list[0], n_layers > 0)
    intermediate_mask_predictions = (predicted_mask,)
    for idx, decoder_layer in enumerate(self.layers):
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if self.training and self.layerdrop > 0.0:
            dropout_probability = torch.rand([])
            if dropout_probability < self.layerdrop:
                continue
        level_index = idx % self.num_feature_levels
        layer_outputs = decoder_layer(
            hidden_states, level_index, None, multi_stage_positional_embeddings, query_position_embeddings,
            encoder_hidden_states, encoder_attention_mask=attention_mask, output_attentions=output_attentions)
        intermediate_hidden_states = self.layernorm(layer_outputs[0])
        predicted_mask, attention_mask = _m2f_predict(
            self.mask_predictor, intermediate_hidden_states, pixel_embeddings, masks,
            feature_size_list[(idx + 1) % self.num_feature_levels], idx + 1 < n_layers)
        intermediate_mask_predictions += (predicted_mask,)
        intermediate += (intermediate_hidden_states,)
        hidden_states = layer_outputs[0]
        if output_attentions:
            attentions += (layer_outputs[1],)
    if output_hidden_states:
        all_hidden_states += (hidden_states,)
    hidden_states = hidden_states.transpose(1, 0)
    if not return_dict:
        outputs = [hidden_states, all_hidden_states, attentions, intermediate, intermediate_mask_predictions]
        return tuple(v for v in outputs if v is not None)
    return _output_class(self, _M2F_OUTPUT)(
        last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=attentions,
        intermediate_hidden_states=intermediate, masks_queries_logits=intermediate_mask_predictions)


# --- OneFormer ----------------------------------------------------------------------------------------------

def _oneformer_heads(self, output: torch.Tensor, mask_features: torch.Tensor, masks: _LevelMasks, size,
                     need_mask: bool):
    """``OneFormerTransformerDecoder.forward_prediction_heads`` with the attention mask packed."""
    decoder_output = self.decoder_norm(output).transpose(0, 1)
    outputs_class = self.class_embed(decoder_output)
    mask_embed = self.mask_embed(decoder_output)
    outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
    return outputs_class, outputs_mask, (masks(mask_embed, size) if need_mask else None)


def oneformer_decoder_forward(self, task_token=None, multi_stage_features=None,
                              multi_stage_positional_embeddings=None, mask_features=None, query_features=None,
                              query_embeddings=None, query_embedder=None, size_list=None, output_attentions=None):
    """``OneFormerTransformerDecoder.forward`` with packed attention masks. Same arguments and outputs."""
    if self.use_task_norm:
        task_token = self.decoder_norm(task_token)
    object_queries = self.query_transformer(query_features, None, query_embedder.weight[:-1],
                                            self.query_input_projection(mask_features),
                                            task_token if self.use_task_norm else None)
    object_queries = object_queries[0].permute(1, 0, 2)
    queries = torch.cat([object_queries, task_token], dim=0)
    output = queries.clone()
    masks = _LevelMasks(mask_features)
    n_layers = len(self.layers)
    outputs_class, outputs_mask, attention_mask = _oneformer_heads(self, output, mask_features, masks, size_list[0],
                                                                   n_layers > 0)
    intermediate_class_predictions, intermediate_mask_predictions = [outputs_class], [outputs_mask]
    attentions = ()
    for index, layer in enumerate(self.layers):
        layer_outputs = layer(index=index, output=output, multi_stage_features=multi_stage_features,
                              multi_stage_positional_embeddings=multi_stage_positional_embeddings,
                              attention_mask=attention_mask, query_embeddings=query_embeddings,
                              output_attentions=output_attentions)
        output = layer_outputs[0]
        attentions += (layer_outputs[1:],)
        outputs_class, outputs_mask, attention_mask = _oneformer_heads(
            self, output, mask_features, masks, size_list[(index + 1) % self.num_feature_levels], index + 1 < n_layers)
        intermediate_class_predictions.append(outputs_class)
        intermediate_mask_predictions.append(outputs_mask)
    object_queries = layer_outputs[0].permute(1, 0, 2)
    contrastive_logits = queries.permute(1, 0, 2)
    aux = (self._get_aux_predictions(intermediate_class_predictions, intermediate_mask_predictions)
           if self.use_auxiliary_loss else None)
    return _output_class(self, _ONEFORMER_OUTPUT)(
        object_queries=object_queries, contrastive_logits=contrastive_logits,
        prediction_masks=intermediate_mask_predictions[-1], prediction_class=intermediate_class_predictions[-1],
        auxiliary_predictions=aux, attentions=attentions)


def oneformer_layer_forward(self, index, output, multi_stage_features, multi_stage_positional_embeddings,
                            attention_mask=None, query_embeddings=None, output_attentions=False):
    """``OneFormerTransformerDecoderLayer.forward`` taking a :class:`PackedMask` (empty rows already reset by
    ``mask_from_embeddings``); any other mask goes to the class's own forward."""
    if not isinstance(attention_mask, PackedMask):
        return type(self).forward(self, index, output, multi_stage_features, multi_stage_positional_embeddings,
                                  attention_mask, query_embeddings, output_attentions)
    level_index = index % self.num_feature_levels
    output, cross_attn_weights = self.cross_attn(
        output, multi_stage_features[level_index], memory_mask=attention_mask, memory_key_padding_mask=None,
        pos=multi_stage_positional_embeddings[level_index], query_pos=query_embeddings)
    output, self_attn_weights = self.self_attn(output, output_mask=None, output_key_padding_mask=None,
                                               query_pos=query_embeddings)
    output = self.ffn(output)
    outputs = (output,)
    if output_attentions:
        outputs += (self_attn_weights, cross_attn_weights)
    return outputs


# --- recognition --------------------------------------------------------------------------------------------

def _has_params(fn, names) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def _last_linear(m: nn.Module) -> nn.Linear | None:
    lins = [x for x in m.modules() if isinstance(x, nn.Linear)]
    return lins[-1] if lins else None


def _kind(m: nn.Module) -> str | None:
    """"mask2former" / "oneformer" when ``m`` has the structure this module's forwards rely on."""
    if not type(m).__module__.startswith("transformers.") or not isinstance(getattr(m, "layers", None), nn.ModuleList):
        return None
    pred = getattr(m, "mask_predictor", None)
    if (pred is not None and isinstance(getattr(pred, "mask_embedder", None), nn.Module)
            and isinstance(getattr(pred, "num_heads", None), int)
            and isinstance(getattr(m, "layernorm", None), nn.LayerNorm)
            and isinstance(getattr(m, "num_feature_levels", None), int) and hasattr(m, "layerdrop")
            and hasattr(m, "config") and _has_params(type(m).forward, _M2F_ARGS)
            and _output_class(m, _M2F_OUTPUT) is not None and _last_linear(pred.mask_embedder) is not None):
        return "mask2former"
    if (hasattr(m, "forward_prediction_heads") and hasattr(m, "query_transformer")
            and isinstance(getattr(m, "decoder_norm", None), nn.LayerNorm)
            and isinstance(getattr(m, "class_embed", None), nn.Linear)
            and isinstance(getattr(m, "mask_embed", None), nn.Module) and _last_linear(m.mask_embed) is not None
            and isinstance(getattr(m, "query_input_projection", None), nn.Conv2d)
            and isinstance(getattr(m, "num_feature_levels", None), int) and hasattr(m, "use_task_norm")
            and hasattr(m, "use_auxiliary_loss") and hasattr(m, "_get_aux_predictions")
            and _has_params(type(m).forward, _ONEFORMER_ARGS) and _output_class(m, _ONEFORMER_OUTPUT) is not None
            and all(isinstance(getattr(layer, "num_feature_levels", None), int) and hasattr(layer, "self_attn")
                    and hasattr(layer, "ffn") and _has_params(type(layer).forward, _ONEFORMER_LAYER_ARGS)
                    for layer in m.layers)):
        return "oneformer"
    return None


def _cross_attentions(kind: str, m: nn.Module) -> list:
    path = "cross_attn" if kind == "mask2former" else "cross_attn.multihead_attn"
    out = []
    for layer in m.layers:
        try:
            out.append(layer.get_submodule(path))
        except AttributeError:
            out.append(None)
    return out


# --- probe --------------------------------------------------------------------------------------------------

_PROBE_LEVELS = ((2, 3), (3, 4), (5, 6))  # h, w of the three attention levels
_PROBE_PIXELS = (10, 12)  # the pixel embeddings (stride 4)


def _probe_inputs(kind: str, dec: nn.Module, device, dtype, g: torch.Generator) -> dict:
    """Keyword arguments of a probe call: 2 images, 5 queries, levels ``_PROBE_LEVELS``. Image 1's pixel
    embeddings are nearly constant over the pixels, so that many of its queries mask every pixel (the empty-row
    reset is exercised)."""
    from ..records.fused_op import randn

    B, Q = 2, 5
    hidden = (dec.layernorm if kind == "mask2former" else dec.decoder_norm).normalized_shape[0]
    C = _last_linear(dec.mask_predictor.mask_embedder if kind == "mask2former" else dec.mask_embed).out_features
    H4, W4 = _PROBE_PIXELS
    pixel = randn((B, C, H4, W4), g, device, dtype)
    pixel = torch.cat([pixel[:1], randn((1, C, 1, 1), g, device, dtype) + 0.02 * pixel[1:]])
    sizes = [torch.Size(s) for s in _PROBE_LEVELS]
    feats = [randn((h * w, B, hidden), g, device, dtype) for h, w in _PROBE_LEVELS]
    pos = [randn((h * w, B, hidden), g, device, dtype) for h, w in _PROBE_LEVELS]
    if kind == "mask2former":
        return dict(inputs_embeds=randn((Q, B, hidden), g, device, dtype), multi_stage_positional_embeddings=pos,
                    pixel_embeddings=pixel, encoder_hidden_states=feats,
                    query_position_embeddings=randn((Q, B, hidden), g, device, dtype), feature_size_list=sizes,
                    output_hidden_states=True, return_dict=True)
    embedder = nn.Embedding(Q, hidden).to(device=device, dtype=dtype)
    with torch.no_grad():
        embedder.weight.copy_(randn((Q, hidden), g, device, dtype))
    return dict(task_token=randn((1, B, hidden), g, device, dtype), multi_stage_features=feats,
                multi_stage_positional_embeddings=pos, mask_features=pixel,
                query_features=randn((B, hidden, H4, W4), g, device, dtype),
                query_embeddings=randn((Q, B, hidden), g, device, dtype), query_embedder=embedder,
                size_list=sizes, output_attentions=False)


def _tensors(out, prefix="output") -> list:
    """(name, tensor) of every floating tensor in a (nested) model output."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)] if out.is_floating_point() else []
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        return [t for k in out.keys() for t in _tensors(out[k], f"{prefix}.{k}")]
    if isinstance(out, dict):
        return [t for k, v in out.items() for t in _tensors(v, f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def _leaves(kwargs: dict, mod: nn.Module):
    """Floating input tensors (fresh leaves requiring grad) and the module's trainable parameters."""
    new, leaves = {}, []
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone().requires_grad_(True)
            leaves.append((f"grad {k}", v))
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor) and v[0].is_floating_point():
            v = [x.detach().clone().requires_grad_(True) for x in v]
            leaves += [(f"grad {k}[{i}]", x) for i, x in enumerate(v)]
        elif isinstance(v, nn.Module):
            leaves += [(f"grad {k}.{n}", p) for n, p in v.named_parameters()]
        new[k] = v
    leaves += [(f"grad {n}", p) for n, p in mod.named_parameters() if p.requires_grad]
    return new, leaves


def _run(fn, mod: nn.Module, kwargs: dict, grads: bool, seed: int):
    kwargs, leaves = _leaves(kwargs, mod)
    torch.manual_seed(seed)  # dropout / layerdrop draw the same numbers in both runs
    with torch.set_grad_enabled(grads):
        out = _tensors(fn(mod, **kwargs))
    if not grads:
        return out, []
    g = torch.Generator().manual_seed(seed)
    total = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum()
                for _, t in out if t.requires_grad)
    got = torch.autograd.grad(total, [x for _, x in leaves], allow_unused=True)
    return out, [(n, torch.zeros_like(x) if gr is None else gr) for (n, x), gr in zip(leaves, got)]


def _bind(kind: str, m: nn.Module) -> None:
    """Instance ``forward``s as ``functools.partial`` of module-level functions (no closures): a deep copy of
    the model rebinds them to the copy."""
    fn = mask2former_decoder_forward if kind == "mask2former" else oneformer_decoder_forward
    m.forward = functools.partial(fn, m)
    if kind == "oneformer":
        for layer in m.layers:
            layer.forward = functools.partial(oneformer_layer_forward, layer)
    m._fastseg_packed_masks = True


def _probe(kind: str, dec: nn.Module, path: str, on_cpu: bool):
    """Hugging Face's forward vs the fused one on private copies of ``dec``: one probe input, every floating
    output and, in training mode, the gradients of the inputs and parameters (for a random output gradient),
    on the module's device and dtype (``on_cpu``: float64 CPU copies) with fastseg's PyTorch path — a check
    of the decoder's code path; the kernels behind it are probed per module (masked attention) and tested per
    op (``mask_from_embeddings``)."""
    from .._backend import use_backend
    from ..patch import ProbeResult, _keep_rng, _private_copy, _rel
    from ..records import tolerance, where

    device, dtype = where(dec)
    if on_cpu:
        device, dtype = torch.device("cpu"), torch.float64
    res = ProbeResult("hf_decoder_masks", type(dec).__name__, [path], tol=tolerance(dtype, device))
    if device.type == "meta":
        res.ok, res.error = False, "its parameters are on the meta device, nothing to compute with"
        return res
    try:
        with _keep_rng(where(dec)[0]):
            orig = _private_copy(dec)
            if on_cpu:
                orig = orig.to(device=device, dtype=dtype)
            fused = _private_copy(orig)
            _bind(kind, fused)
            g = torch.Generator().manual_seed(0)
            kwargs = _probe_inputs(kind, orig, device, dtype, g)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            what = (f"{'forward and gradients' if dec.training else 'forward'}, fastseg's PyTorch path; image 1 with "
                    "nearly constant pixel embeddings (empty rows)")
            with use_backend("torch"):
                out_o, gr_o = _run(lambda mod, **kw: type(mod).forward(mod, **kw), orig, kwargs, dec.training, seed)
                out_n, gr_n = _run(lambda mod, **kw: mod(**kw), fused, kwargs, dec.training, seed)
            if [n for n, _ in out_o] != [n for n, _ in out_n]:
                raise ValueError(f"outputs differ in layout: {[n for n, _ in out_n]} vs {[n for n, _ in out_o]}")
            for (name, a), (_, b) in zip(out_n + gr_n, out_o + gr_o):
                if a.shape != b.shape:
                    res.results.append(dict(probe=what, quantity=f"{name} (shape {tuple(a.shape)} vs "
                                            f"{tuple(b.shape)})", rel=float("inf"), max_abs=float("inf")))
                    continue
                max_abs, rel = _rel(a, b)
                res.results.append(dict(probe=what, quantity=name, rel=rel, max_abs=max_abs))
    except Exception as exc:  # noqa: BLE001 - reported: the decoder keeps Hugging Face's forward
        res.ok, res.error = False, f"{type(exc).__name__}: {exc}"
        return res
    res.difference = max((r["rel"] for r in res.results), default=0.0)
    res.ok = bool(res.results) and res.difference <= res.tol
    return res


def patch_hf_decoders(model: nn.Module, new_attention_ids: set, attention_class, report, dry_run: bool,
                      verify) -> None:
    """Bind the packed-mask forwards to every Hugging Face Mask2Former / OneFormer decoder of ``model`` whose
    cross-attentions are all fastseg's (``attention_class`` instances, or ids in ``new_attention_ids``: swapped
    in this call). Appends to ``report.deeper`` / ``probes`` / ``skipped``. ``dry_run``: report only (the
    probe is listed, not run). ``verify``: as :func:`fastseg.patch` (``"cpu"``: float64 CPU copies, PyTorch
    path; False: bound without a probe)."""
    from ..patch import ProbeResult, Skipped

    for path, m in model.named_modules():
        kind = _kind(m)
        if kind is None or getattr(m, "_fastseg_packed_masks", False):
            continue
        path = path or "<model>"
        attns = _cross_attentions(kind, m)
        if not attns or not all(a is not None and (id(a) in new_attention_ids or (
                attention_class is not None and isinstance(a, attention_class))) for a in attns):
            continue
        if "forward" in vars(m) or (kind == "oneformer" and any("forward" in vars(layer) for layer in m.layers)):
            report.skipped.append(Skipped(path, "masked_attention", "Hugging Face decoder with a forward assigned on "
                                          "the instance: its attention masks are left to that forward"))
            continue
        if verify and not dry_run:
            start = time.perf_counter()
            probe = _probe(kind, m, path, on_cpu=verify == "cpu")
            probe.seconds = time.perf_counter() - start
            report.probes.append(probe)
            if not probe.ok:
                why = (f"the probe failed ({probe.error})" if probe.error else
                       f"fused and Hugging Face forwards disagree on the probe: {probe.summary()}")
                report.skipped.append(Skipped(path, "masked_attention",
                                              f"attention masks left to Hugging Face's code: {why}"))
                continue
        elif verify:
            report.probes.append(ProbeResult("hf_decoder_masks", type(m).__name__, [path]))
        report.deeper.append((path, WHAT))
        if not dry_run:
            _bind(kind, m)


def note_hf_attention_interface(model: nn.Module, report) -> None:
    """Hugging Face decoders whose cross-attention is a ``transformers`` attention module (``q_proj`` /
    ``k_proj`` / ``v_proj`` run through ``ALL_ATTENTION_FUNCTIONS``: eager, SDPA, flash), e.g. MaskFormer's
    DETR decoder: no mask from predictions there and no ``nn.MultiheadAttention`` to swap; said in the notes."""
    found = []
    for ppath, parent in model.named_modules():
        for name in ("encoder_attn", "cross_attn", "cross_attention"):
            m = getattr(parent, name, None)
            if (isinstance(m, nn.Module) and not isinstance(m, nn.MultiheadAttention)
                    and type(m).__module__.startswith("transformers.")
                    and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj"))):
                impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
                found.append((f"{ppath}.{name}" if ppath else name, type(m).__name__, impl))
    if found:
        path, cls, impl = found[0]
        report.notes.append(
            f"{len(found)} Hugging Face cross-attention(s) ({cls}, e.g. {path}) run through transformers' attention "
            f"interface (attn_implementation={impl!r}) with no mask from mask predictions (a DETR-style decoder, "
            "e.g. MaskFormer): left as they are (no nn.MultiheadAttention to swap; attn_implementation='sdpa' "
            "already avoids the (B, heads, Q, HW) weights)")
