"""``fastseg check``: each available fused op against its reference on small random inputs.

Forward output and every gradient (inputs and parameters) are compared; the relative L2 error must be
below a per-dtype tolerance. On CPU the Triton kernels run under the interpreter (the CLI sets
``TRITON_INTERPRET=1`` before importing fastseg); the number of kernel launches proves they ran.
"""
from __future__ import annotations

from typing import Callable

import torch

from .measure import Unavailable
from .registry import require

__all__ = ["CHECKS", "run_checks", "tolerance"]


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        # CUDA kernels may use TF32 tensor cores for fp32 dot products
        return 1e-4 if device.type == "cpu" else 2e-2
    return 2e-2 if dtype == torch.float16 else 6e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    diff = (a - b).abs()
    den = b.norm().item()
    return diff.max().item() if diff.numel() else 0.0, (diff.norm().item() / den if den else diff.norm().item())


def compare(fused: torch.nn.Module, ref: torch.nn.Module, inputs: list[torch.Tensor],
            call: Callable, dtype: torch.dtype, device: torch.device, input_names=None) -> list[dict]:
    """Run ``call(module, *inputs)`` for both (fused in ``dtype`` on ``device``; reference in fp32/fp64 on the
    same inputs) and compare output and gradients of inputs and parameters."""
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fused = fused.to(device=device, dtype=dtype)
    ref = ref.to(device=device, dtype=ref_dtype)
    xs_f = [x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype).requires_grad_(x.is_floating_point())
            for x in inputs]
    xs_r = [x.detach().to(ref_dtype if x.is_floating_point() else x.dtype).requires_grad_(x.is_floating_point())
            for x in xs_f]
    out_f, out_r = call(fused, *xs_f), call(ref, *xs_r)
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1)).to(device)
    pf = dict(fused.named_parameters())
    pr = dict(ref.named_parameters())
    names = [n for n in pr if n in pf and pr[n].requires_grad]
    lf = [x for x in xs_f if x.requires_grad] + [pf[n] for n in names]
    lr = [x for x in xs_r if x.requires_grad] + [pr[n] for n in names]
    gf = torch.autograd.grad(out_f, lf, g.to(out_f.dtype), allow_unused=True)
    gr = torch.autograd.grad(out_r, lr, g.to(out_r.dtype), allow_unused=True)
    input_names = input_names or [f"input{i}" for i in range(len(xs_f))]
    labels = [f"grad {input_names[i]}" for i, x in enumerate(xs_f) if x.requires_grad] + [f"grad {n}" for n in names]
    tol = tolerance(dtype, device)
    results = [dict(zip(("max_abs", "rel"), _rel(out_f, out_r)), quantity="forward", tol=tol)]
    for lab, a, b in zip(labels, gf, gr):
        if b is None and a is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        results.append(dict(zip(("max_abs", "rel"), _rel(a, b)), quantity=lab, tol=tol))
    for r in results:
        r["ok"] = r["rel"] <= r["tol"]
    return results


def check_masked_attention(device, dtype):
    cls = require("fastseg.nn", "MaskedCrossAttention", "the fused masked attention lands with issue 3")
    from fastseg.reference import ReferenceMaskedCrossAttention

    from .ops.masked_attention import blob_mask

    E, nh, B, Q, h, w = 32, 4, 2, 7, 5, 9
    torch.manual_seed(0)
    ref = ReferenceMaskedCrossAttention(E, nh, empty_rows="zero")
    fused = cls(E, nh)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    allowed = blob_mask(B, Q, h, w, 0.4, g, torch.device("cpu"))
    attn_mask = (~allowed).unsqueeze(1).repeat(1, nh, 1, 1).flatten(0, 1).to(device)
    inputs = [torch.randn(Q, B, E, generator=g), torch.randn(h * w, B, E, generator=g),
              torch.randn(h * w, B, E, generator=g)]
    return compare(fused, ref, inputs, lambda m, q, k, v: m(q, k, v, attn_mask=attn_mask)[0], dtype, device,
                   input_names=["query", "key", "value"])


def check_msca(device, dtype):
    cls = require("fastseg.nn", "MSCA", "the fused MSCA lands with issue 4")
    ref_cls = require("fastseg.reference", "AttentionModule", "the MSCA reference lands with issue 4")
    torch.manual_seed(0)
    ref = ref_cls(8)
    fused = cls(8)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 13, 11, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


def check_context_cluster(device, dtype):
    cls = require("fastseg.nn", "ContextCluster", "the fused context cluster lands with issue 5")
    ref_cls = require("fastseg.reference", "Cluster", "the Context Cluster reference lands with issue 5")
    args = dict(dim=16, out_dim=16, proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=2, head_dim=8)
    torch.manual_seed(0)
    ref = ref_cls(**args)
    fused = cls(**args)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


def check_mlp_dwconv(device, dtype):
    cls = require("fastseg.nn", "MSCANMlp", "the fused MLP depthwise conv lands with issue 4")
    ref_cls = require("fastseg.models.mscan", "Mlp", "the MSCAN reference lands with issue 4")
    torch.manual_seed(0)
    ref = ref_cls(8, 16)
    fused = cls(8, 16)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 9, 13, generator=torch.Generator().manual_seed(0))
    return compare(fused, ref, [x], lambda m, x: m(x), dtype, device, input_names=["x"])


def check_mask_from_embeddings(device, dtype):
    """The fused GEMM + sign-and-pack mask of a level vs the sign of the reference logits (fp64). Logits
    within rounding of 0 may differ in sign; every other bit must match."""
    op = require("fastseg.ops", "mask_from_embeddings", "the fused mask builder lands with issue 3")
    unpack = require("fastseg.ops.masked_attention", "unpack_mask", "the fused mask builder lands with issue 3")
    g = torch.Generator().manual_seed(0)
    B, Q, C, h, w = 2, 7, 16, 5, 9
    emb, feat = torch.randn(B, Q, C, generator=g), torch.randn(B, C, h, w, generator=g)
    logits = torch.einsum("bqc,bcp->bqp", emb.double(), feat.flatten(2).double())
    allowed = unpack(op(emb.to(device, dtype), feat.to(device, dtype), reset_empty=False))[:, 0].cpu()
    eps = {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 0.5)  # half precision: inputs rounded
    decided = logits.abs() > eps
    wrong = int(((allowed != (logits >= 0)) & decided).sum())
    frac = wrong / max(1, int(decided.sum()))
    return [{"quantity": f"mask bits (of {int(decided.sum())} with |logit| > {eps:g})", "max_abs": float(wrong),
             "rel": frac, "tol": 0.0, "ok": wrong == 0}]


def check_ms_deform_attn(device, dtype):
    """fastseg.nn.MSDeformAttn vs the official module (grid_sample core): 3 odd-sized levels, 2 heads of 8,
    3 points, random (non-init) offsets so that no point sits exactly on a texel border."""
    cls = require("fastseg.nn", "MSDeformAttn", "the fused multi-scale deformable attention lands with issue 14")
    ref_cls = require("fastseg.reference", "ReferenceMSDeformAttn", "the MSDeformAttn reference lands with issue 14")
    shapes = [(5, 7), (3, 4), (2, 1)]
    torch.manual_seed(0)
    ref = ref_cls(16, 3, 2, 3)
    with torch.no_grad():
        ref.sampling_offsets.weight.normal_(0, 0.3)
        ref.attention_weights.weight.normal_(0, 0.3)
    fused = cls(16, 3, 2, 3)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in shapes)
    st = torch.tensor(shapes, device=device)
    starts = torch.tensor([0, 35, 47], device=device)
    inputs = [torch.randn(2, 9, 16, generator=g), torch.rand(2, 9, 3, 2, generator=g),
              torch.randn(2, S, 16, generator=g)]
    return compare(fused, ref, inputs, lambda m, q, r, x: m(q, r, x, st, starts), dtype, device,
                   input_names=["query", "reference_points", "input_flatten"])


CHECKS: dict[str, Callable] = {
    "masked-attention": check_masked_attention,
    "mask-from-embeddings": check_mask_from_embeddings,
    "msca": check_msca,
    "mlp-dwconv": check_mlp_dwconv,
    "context-cluster": check_context_cluster,
    "ms-deform-attn": check_ms_deform_attn,
}


def run_checks(names: list[str], device: torch.device, dtypes: list[torch.dtype]) -> list[dict]:
    """One dict per (op, dtype): status ("ok", "FAIL", "unavailable", "error"), backend, launches, results."""
    from fastseg import _backend

    out = []
    for name in names:
        for dtype in dtypes:
            before = sum(_backend.launches.values())
            entry = {"op": name, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                     "backend": _backend.select(name, device), "results": [], "note": ""}
            try:
                results = CHECKS[name](device, dtype)
                entry["results"] = results
                entry["status"] = "ok" if all(r["ok"] for r in results) else "FAIL"
            except Unavailable as exc:
                entry["status"], entry["note"] = "unavailable", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported, and makes the command fail
                entry["status"], entry["note"] = "error", f"{type(exc).__name__}: {exc}"
            entry["launches"] = sum(_backend.launches.values()) - before
            if entry["status"] == "ok" and entry["backend"] == "triton" and entry["launches"] == 0:
                entry["status"], entry["note"] = "FAIL", "no Triton kernel launch was recorded"
            out.append(entry)
    return out
