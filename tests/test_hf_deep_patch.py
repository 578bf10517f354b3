"""fastseg.patch on Hugging Face Mask2Former / OneFormer: each layer's attention mask comes bit-packed from the
mask embeddings (fastseg.models.hf_decoders); outputs, loss and gradients as Hugging Face's; no
(B·heads, Q, HW) mask and no resized (B, Q, h, w) logits are ever allocated. Tiny random models (no download);
the kernels run under TRITON_INTERPRET=1, the PyTorch path with use_backend("torch")."""
import contextlib
import copy

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastseg
from fastseg._backend import use_backend
from fastseg.models.hf_decoders import WHAT
from hf_models import targets as targets_, tiny_hf_mask2former, tiny_hf_maskformer, tiny_hf_oneformer

pytestmark = pytest.mark.skipif(not hasattr(fastseg.nn, "MaskedCrossAttention"), reason="no MaskedCrossAttention")

DEC = "model.transformer_module.decoder"
B, HEADS, Q, LEVELS = 2, 4, 6, ((2, 2), (4, 4), (8, 8))  # the tiny models on 64x64 images: strides 32, 16, 8


def _flat(out, prefix="out"):
    """(name, tensor) of every floating tensor of a (nested) Hugging Face output."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)] if out.is_floating_point() else []
    if hasattr(out, "keys"):
        return [t for k in out.keys() for t in _flat(out[k], f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in _flat(v, f"{prefix}[{i}]")]
    return []


def _inputs(kind, labels=True):
    torch.manual_seed(5)
    kw = dict(pixel_values=torch.randn(B, 3, 64, 64), output_hidden_states=True)
    if kind == "oneformer":
        kw["task_inputs"] = torch.randint(0, 50, (B, 8))
    if labels:
        t = targets_(torch.float32)
        kw.update(mask_labels=[x["masks"] for x in t], class_labels=[x["labels"] for x in t])
    return kw


def _step(model, kw, train):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the losses' random point sampling
    with torch.set_grad_enabled(train):
        out = model(**kw)
    grads = {}
    if train:
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return _flat(out), grads


def _assert_same(got, want, tol=1e-4):
    (out_g, grads_g), (out_w, grads_w) = got, want
    assert [n for n, _ in out_g] == [n for n, _ in out_w]
    for (name, a), (_, b) in zip(out_g, out_w):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def _count_empty_rows(decoder):
    """Hook on an unpatched Hugging Face Mask2Former decoder's mask predictor: a list that receives, per call,
    the number of query rows whose attention mask masks every pixel (where the empty-row reset acts)."""
    counts = []
    decoder.mask_predictor.register_forward_hook(lambda mod, args, out: counts.append(int(out[1].all(-1).sum())))
    return counts


@pytest.mark.parametrize("kind", ["mask2former", "oneformer"])
def test_deep_patch_same_outputs_and_gradients(kind, triton_launches, monkeypatch):
    """Training mode (dropout 0), labels given: logits, masks, loss, aux outputs, hidden states and every
    parameter gradient agree with the unpatched model; the masks come from the sign-pack kernel (once per
    layer that uses one), no bool mask is packed, and no tensor of the patched forward + backward has the size
    of a dense mask or of resized logits (the unpatched step has them: the check bites). Then eval mode with
    output_attentions (Mask2Former; OneFormer's: test_masked_attention.py)."""
    model = tiny_hf_mask2former() if kind == "mask2former" else tiny_hf_oneformer(dropout=0.0)
    ref = copy.deepcopy(model)
    kw = _inputs(kind)
    rec = _Allocations(monkeypatch) if fastseg.interpreter_enabled() else None
    empty = _count_empty_rows(ref.model.transformer_module.decoder) if kind == "mask2former" else None
    with rec or contextlib.nullcontext():
        want = _step(ref, kw, True)
    if empty is not None:  # the reset is exercised (OneFormer's random init has no empty row; its probe input has)
        assert sum(empty[:2]) > 0, empty
    if rec is not None:
        assert _forbidden(rec.seen, True), "the unpatched model builds dense masks: the check must see them"
        rec.seen.clear()
    _, report = fastseg.patch(model, ops="masked_attention")
    assert (DEC, WHAT) in report.deeper
    probe = report.probe_of(DEC)
    assert probe.ok and probe.op == "hf_decoder_masks" and any(r["quantity"].startswith("grad ") for r in probe.results)
    assert "forward" in vars(model.model.transformer_module.decoder)
    triton_launches.clear()
    with rec or contextlib.nullcontext():
        got = _step(model, kw, True)
    _assert_same(got, want)
    if rec is not None:
        assert rec.seen and not _forbidden(rec.seen, True), _forbidden(rec.seen, True)
        assert triton_launches["attention_mask_sign_pack"] == 2  # 2 layers; the last prediction's mask is not built
        assert "masked_attention_pack" not in triton_launches and triton_launches["masked_attention_bwd_dq"] > 0
    if kind == "mask2former":
        model.eval(), ref.eval()
        kw = dict(_inputs(kind, labels=False), output_attentions=True)
        want, got = _step(ref, kw, False), _step(model, kw, False)
        _assert_same(got, want)
        assert any("attentions" in n for n, _ in got[0])
    _, again = fastseg.patch(model, ops="masked_attention")  # idempotent
    assert not again.replaced and not [d for d in again.deeper if d[0] == DEC]


def test_deep_patch_torch_path():
    """fastseg's PyTorch path (no Triton): same outputs and gradients as Hugging Face's; a deep copy of the
    patched model too."""
    model = tiny_hf_mask2former()
    ref = copy.deepcopy(model)
    kw = _inputs("mask2former")
    want = _step(ref, kw, True)
    with use_backend("torch"):
        _, report = fastseg.patch(model, ops="masked_attention")
        assert report.probe_of(DEC).ok
        got = _step(model, kw, True)
        _assert_same(got, want)
        clone = copy.deepcopy(model)  # the bound forward follows the copy
        assert clone.model.transformer_module.decoder.forward.args[0] is clone.model.transformer_module.decoder
        _assert_same(_step(clone, kw, True), want)


class _Allocations(TorchDispatchMode):
    """Records (op, shape) of every tensor an aten op returns; Triton interpreter launches are not recorded
    (the interpreter copies the kernel's arguments)."""

    def __init__(self, monkeypatch):
        super().__init__()
        from triton.runtime import interpreter

        self.seen, self.paused = [], False
        launch, outer = interpreter.GridExecutor.__call__, self

        def quiet(executor, *args, **kwargs):
            outer.paused = True
            try:
                return launch(executor, *args, **kwargs)
            finally:
                outer.paused = False

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", quiet)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.seen += [(str(func), tuple(t.shape)) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _forbidden(seen, with_logits):
    """Recorded (op, shape) of the size of a level's dense mask (B·heads, Q, h·w) / (B, heads, Q, h·w) or of
    its resized logits (B, Q, h, w) (``with_logits``: also (B, Q, h·w))."""
    bad = set()
    for h, w in LEVELS:
        bad |= {(B * HEADS, Q, h * w), (B, HEADS, Q, h * w), (B, Q, h, w)}
        if with_logits:
            bad.add((B, Q, h * w))
    return sorted({(op, s) for op, s in seen if s in bad})


def test_probe_refuses_a_fork_and_dry_run():
    """A decoder whose mask predictor computes something else (here: threshold 0.4) keeps Hugging Face's
    forward (the probe disagrees; report.skipped says why); dry_run lists the probe and binds nothing;
    verify=False binds without a probe."""
    model = tiny_hf_mask2former().eval()
    dry = copy.deepcopy(model)
    _, report = fastseg.patch(dry, ops="masked_attention", dry_run=True)
    assert (DEC, WHAT) in report.deeper and report.probe_of(DEC).ok is None
    assert "forward" not in vars(dry.model.transformer_module.decoder) and "hf_decoder_masks" in str(report)
    unverified = copy.deepcopy(model)
    _, report = fastseg.patch(unverified, ops="masked_attention", verify=False)  # bound without a probe
    assert (DEC, WHAT) in report.deeper and not report.probes
    assert "forward" in vars(unverified.model.transformer_module.decoder)
    pred = model.model.transformer_module.decoder.mask_predictor
    original = type(pred).forward

    def forked(self, outputs, pixel_embeddings, size=None):
        logits, _ = original(self, outputs, pixel_embeddings, size)
        m = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits, (m.sigmoid().flatten(2).repeat_interleave(self.num_heads, 0) < 0.4).detach()

    pred.forward = forked.__get__(pred)
    _, report = fastseg.patch(model, ops="masked_attention")
    assert report.count("masked_attention") == 2 and not [d for d in report.deeper if d[0] == DEC]
    assert [s for s in report.skipped if s[0] == DEC and "disagree on the probe" in s[2]]
    assert "forward" not in vars(model.model.transformer_module.decoder)


def test_hf_maskformer_is_reported_and_unchanged():
    """HF MaskFormer: a DETR decoder (cross-attention through transformers' attention interface, no masks from
    predictions): patch swaps nothing there, says so in the notes, and the outputs, loss and gradients stay
    bit for bit the same."""
    model = tiny_hf_maskformer()
    ref = copy.deepcopy(model)
    _, report = fastseg.patch(model)
    assert not report.replaced and not report.deeper
    assert any("attention interface" in n and "MaskFormerDetrCrossAttention" in n for n in report.notes), report
    kw = _inputs("maskformer")
    kw.pop("output_hidden_states")
    _assert_same(_step(model, kw, True), _step(ref, kw, True), tol=0)
