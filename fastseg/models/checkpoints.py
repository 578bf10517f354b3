"""Load official checkpoints into fastseg's models: :func:`load_official`.

Sources (``source=``; detected from the keys when not given):

* ``"detectron2-mask2former"``: facebookresearch/Mask2Former (detectron2) checkpoints —
  ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, ``criterion.empty_weight`` and
  ``backbone.*``. Into :class:`~fastseg.models.Mask2Former` (``sem_seg_head.`` dropped), or into a bare
  :class:`~fastseg.models.MSDeformAttnPixelDecoder` / :class:`~fastseg.models.Mask2FormerDecoder` (that part
  only). The head names are the official ones; an old ``predictor.static_query`` is read as ``query_feat``
  (as the official ``_load_from_state_dict`` does). ``backbone.*`` keys are passed through unchanged: they
  load when the model's backbone has detectron2's names (e.g. detectron2's own ``ResNet`` / ``D2SwinTransformer``
  module given as the backbone). fastseg has no ResNet-50/101 or Swin backbone of its own; to load only the
  head into a model with another backbone, pass ``ignore=("backbone.",)``.
* ``"mmseg-segnext"``: open-mmlab/mmsegmentation SegNeXt checkpoints — ``backbone.*`` (MSCAN, same names as
  :class:`~fastseg.models.MSCAN`) and ``decode_head.*`` (LightHamHead; mmcv ``ConvModule`` keys
  ``<m>.conv.*`` / ``<m>.gn.*`` -> fastseg's ``<m>.0.*`` / ``<m>.1.*``). Into
  :class:`~fastseg.models.SegNeXt`, a bare :class:`~fastseg.models.MSCAN` (``backbone.*``) or
  :class:`~fastseg.models.LightHamHead` (``decode_head.*``).
* ``"coc"``: ma-xu/Context-Cluster — ImageNet checkpoints (``patch_embed.*``, ``network.*``, ``norm.*``,
  ``head.*``; into ``coc_*()``), and the segmentation (mmseg semantic FPN) checkpoints' ``backbone.*`` (into
  ``coc_*(fork_feat=True)``, keys ``norm0/2/4/6``). fastseg has no semantic-FPN neck/head: pass
  ``ignore=("neck.", "decode_head.")`` to load the backbone of such a checkpoint.

Weights load into patched models too (``fastseg.patch`` / ``fused=True`` keep the state_dict).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re

import torch
from torch import nn

__all__ = ["load_official", "convert_official", "read_checkpoint", "CheckpointMismatchError", "LoadReport",
           "SOURCES", "detect_source"]

SOURCES = ("detectron2-mask2former", "mmseg-segnext", "coc")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not fit the model. ``missing``: fastseg keys with no value (official name
    in parentheses); ``unexpected``: official keys with no place in the model; ``mismatched``:
    (official key, checkpoint shape, model shape)."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_official` did: ``loaded`` fastseg keys, ``ignored`` official keys (by ``ignore``),
    and (``strict=False`` only) the ``missing`` / ``unexpected`` / ``mismatched`` keys left alone."""

    source: str
    loaded: list
    ignored: list
    missing: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    mismatched: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------- key rules
class _Rule:
    """official template <-> fastseg template, ``{name}`` placeholders (non-greedy, at least one char)."""

    def __init__(self, official: str, fastseg: str | None, reverse: bool = True):
        self.official, self.fastseg, self.reverse = official, fastseg, reverse
        self._off = self._compile(official)
        self._fs = self._compile(fastseg) if fastseg is not None else None

    @staticmethod
    def _compile(template: str):
        parts = re.split(r"\{(\w+)\}", template)
        rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
        return re.compile(rx)

    def to_fastseg(self, key):
        m = self._off.fullmatch(key)
        return None if m is None else self.fastseg.format(**m.groupdict())

    def to_official(self, key):
        if not self.reverse or self._fs is None:
            return None
        m = self._fs.fullmatch(key)
        return None if m is None else self.official.format(**m.groupdict())


_MMCV_CONVMODULES = ("squeeze", "align", "hamburger.ham_in", "hamburger.ham_out")
_RULES = {
    "detectron2-mask2former": [
        _Rule("sem_seg_head.predictor.static_query.{p}", "predictor.query_feat.{p}", reverse=False),
        _Rule("sem_seg_head.pixel_decoder.{k}", "pixel_decoder.{k}"),
        _Rule("sem_seg_head.predictor.{k}", "predictor.{k}"),
    ],
    "mmseg-segnext": [r for m in _MMCV_CONVMODULES for r in (
        _Rule(f"decode_head.{m}.conv.{{p}}", f"decode_head.{m}.0.{{p}}"),
        _Rule(f"decode_head.{m}.gn.{{p}}", f"decode_head.{m}.1.{{p}}"))],
    "coc": [],
}


def _targets():
    """(class, source, root prefix in the source's whole-model fastseg names)."""
    from .context_cluster import ContextClusterNet
    from .ham_head import LightHamHead, SegNeXt
    from .mask2former import Mask2Former, MultiScaleMaskedTransformerDecoder
    from .mscan import MSCAN
    from .pixel_decoder import MSDeformAttnPixelDecoder

    return [(Mask2Former, "detectron2-mask2former", ""),
            (MSDeformAttnPixelDecoder, "detectron2-mask2former", "pixel_decoder."),
            (MultiScaleMaskedTransformerDecoder, "detectron2-mask2former", "predictor."),
            (SegNeXt, "mmseg-segnext", ""), (MSCAN, "mmseg-segnext", "backbone."),
            (LightHamHead, "mmseg-segnext", "decode_head."), (ContextClusterNet, "coc", "")]


# ----------------------------------------------------------------------------------------- reading
def read_checkpoint(checkpoint) -> dict:
    """A flat ``{name: tensor}`` from a state_dict, a checkpoint dict wrapping it under ``"model"`` or
    ``"state_dict"`` (detectron2 / mmseg / timm), or a path (``.pkl``: detectron2's pickle of numpy
    arrays; else ``torch.load`` on CPU). numpy arrays become tensors."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                checkpoint = pickle.load(f, encoding="latin1")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a state_dict, a checkpoint dict or a path, got {type(checkpoint).__name__}")
    for wrapper in ("model", "state_dict"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, dict):
            checkpoint = inner
            break
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(k, str):
            raise TypeError(f"checkpoint key {k!r} is not a string")
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif type(v).__module__ == "numpy":
            out[k] = torch.as_tensor(v)
        else:
            raise TypeError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor (is this a state_dict?)")
    return out


def detect_source(state_dict: dict) -> str:
    """The official format of a state_dict, from its keys; ValueError if it cannot tell."""
    keys = list(state_dict)
    if any(k.startswith(("sem_seg_head.pixel_decoder.transformer.", "sem_seg_head.predictor.transformer_"))
           for k in keys):
        return "detectron2-mask2former"
    if any(k.startswith("decode_head.hamburger.") for k in keys):
        return "mmseg-segnext"
    if any(".spatial_gating_unit.conv0_1." in k for k in keys):  # MSCAN alone
        return "mmseg-segnext"
    if any(".token_mixer.sim_alpha" in k for k in keys):
        return "coc"
    raise ValueError("cannot tell the checkpoint's format from its keys (first keys: "
                     f"{keys[:5]}); pass source= one of {SOURCES}")


def _to_fastseg(source, key):
    for rule in _RULES[source]:
        new = rule.to_fastseg(key)
        if new is not None:
            return new
    return key


def _to_official(source, key):
    for rule in _RULES[source]:
        old = rule.to_official(key)
        if old is not None:
            return old
    return key


def _target(model: nn.Module, source: str | None):
    for cls, src, root in _targets():
        if isinstance(model, cls):
            if source is not None and source != src:
                raise ValueError(f"source {source!r} does not load into a {type(model).__name__} "
                                 f"(that takes {src!r})")
            return src, root
    names = sorted({c.__name__ for c, _, _ in _targets()})
    raise TypeError(f"load_official: no official format for a {type(model).__name__}; supported models: {names}")


# ----------------------------------------------------------------------------------------- loading
def convert_official(model: nn.Module, checkpoint, source: str | None = None, *, ignore=()):
    """(converted state_dict in fastseg's names, source, root, ignored official keys, unexpected official
    keys). ``ignore``: prefixes of official key names to leave out. Into a part (a bare pixel decoder,
    MSCAN, ...) the keys of the other parts are ignored."""
    sd = read_checkpoint(checkpoint)
    src, root = _target(model, source)
    if source is None:
        detected = detect_source(sd)
        if detected != src:
            raise ValueError(f"the checkpoint looks like {detected!r}, which does not load into a "
                             f"{type(model).__name__} (that takes {src!r})")
    part = bool(root)  # a part of the whole model: the rest of the checkpoint is not for it
    if src == "coc" and any(k.startswith("backbone.") for k in sd):  # mmseg segmentation checkpoint
        root = "backbone."
    if part and not any(_to_fastseg(src, k).startswith(root) for k in sd):
        root = ""  # the part's own checkpoint (e.g. an ImageNet MSCAN: patch_embed1.*, block1.*, ...)
    ignore = tuple(ignore)
    out, ignored, unexpected = {}, [], []
    for k, v in sd.items():
        if ignore and k.startswith(ignore):
            ignored.append(k)
            continue
        new = _to_fastseg(src, k)
        if not new.startswith(root):
            (ignored if part else unexpected).append(k)
            continue
        out[new[len(root):]] = (k, v)
    return out, src, root, ignored, unexpected


def load_official(model: nn.Module, checkpoint, source: str | None = None, *, strict: bool = True,
                  ignore=()) -> LoadReport:
    """Load an official checkpoint (state_dict, ``{"model"|"state_dict": ...}`` dict, or path) into a
    fastseg model, in place. ``source``: one of :data:`SOURCES` (detected from the keys when None).

    strict (default): every model key gets a value of the model's shape and every checkpoint key (outside
    ``ignore``, a tuple of official-name prefixes) has a place, else :class:`CheckpointMismatchError`
    listing the missing, unexpected and shape-mismatched keys and nothing is loaded. ``strict=False``:
    loads what fits and returns the rest in the report. Model keys whose official name starts with an
    ``ignore`` prefix are not required (e.g. ``ignore=("backbone.",)`` loads a Mask2Former head only).
    A part (``MSDeformAttnPixelDecoder``, ``Mask2FormerDecoder``, ``MSCAN``, ``LightHamHead``) takes its
    part of a whole-model checkpoint (``sem_seg_head.pixel_decoder.*`` ...); the other keys go to
    ``report.ignored``.
    """
    converted, src, root, ignored, unexpected = convert_official(model, checkpoint, source, ignore=ignore)
    ignore = tuple(ignore)
    own = model.state_dict()
    missing, mismatched, values = [], [], {}
    for k, t in own.items():
        official = _to_official(src, root + k)
        if k not in converted:
            if not (ignore and official.startswith(ignore)):
                missing.append(f"{k} (official {official})" if official != k else k)
            continue
        name, v = converted[k]
        if tuple(v.shape) != tuple(t.shape):
            mismatched.append((name, tuple(v.shape), tuple(t.shape)))
            continue
        values[k] = v
    unexpected = sorted(unexpected + [name for k, (name, _) in converted.items() if k not in own])
    if strict and (missing or unexpected or mismatched):
        lines = [f"load_official({type(model).__name__}, source={src!r}): the checkpoint does not fit"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): " + ", ".join(
                f"{n} checkpoint {list(a)} vs model {list(b)}" for n, a, b in mismatched))
        hints = sorted({k.split(".")[0] + "." for k in unexpected if k.startswith(("backbone.", "neck.",
                                                                                    "decode_head.",
                                                                                    "auxiliary_head."))})
        if hints:
            lines.append(f"  (parts fastseg's model does not have can be left out with ignore={tuple(hints)})")
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)
    model.load_state_dict(values, strict=False)  # every key of ``values`` is the model's, shapes checked
    return LoadReport(src, sorted(values), ignored, missing, unexpected, mismatched)
