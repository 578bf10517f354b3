"""Launch and torch-op counts of fastseg's fused ops and modules, forward and backward, and host-sync checks.

Counted under the Triton interpreter (CPU tensors, tiny shapes): :class:`OpRecorder` (a TorchDispatchMode)
records every aten op dispatched outside the Triton kernels themselves, except views and allocations
(``empty*``: no kernel launch on a GPU); :data:`fastseg.launches` counts the Triton launches. On a GPU each
recorded op is (at most) one kernel launch, so ``launches + torch ops`` bounds the launches of one call.
:data:`SYNC_OPS` are the aten ops that make the host wait for the device (a value or a data-dependent shape
read back); :func:`count` reports which of them ran.

``python -m fastseg.bench.opcount [--json]`` (TRITON_INTERPRET=1 is set for a child process if needed).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "OpRecorder", "count", "CASES", "count_all"]

#: aten ops that synchronise the host with the device: scalar / value read-backs and ops whose output
#: shape depends on the data.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_numpy", "argwhere",
    "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "repeat_interleave", "bincount", "histc", "histogram", "masked_scatter", "index_put_bool", "tolist",
    "_assert_async", "_assert_scalar",
})
_ALLOC = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"})
_META = frozenset({"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "stride", "size",
                   "dim", "numel", "is_same_size", "_version", "detach", "lift_fresh", "alias", "_to_copy_noop"})


class OpRecorder(TorchDispatchMode):
    """Records aten ops (name -> count) outside Triton kernels; views, metadata and allocations apart."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.allocs: Counter = Counter()
        self.sync: list[str] = []
        self._in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._in_kernel:
            return out
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.sync.append(name)
        if name in _ALLOC:
            self.allocs[name] += 1
        elif not (getattr(func, "is_view", False) or name in _META):
            self.ops[name] += 1
        return out

    @contextlib.contextmanager
    def kernels_apart(self):
        """Ops the Triton interpreter itself runs to execute a kernel are not the op's own."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction

        rec = self
        old_run, old_at = InterpretedFunction.run, Autotuner.run

        def run(self_, *a, **k):
            rec._in_kernel += 1
            try:
                return old_run(self_, *a, **k)
            finally:
                rec._in_kernel -= 1

        def at_run(self_, *a, **k):
            rec._in_kernel += 1
            try:
                return old_at(self_, *a, **k)
            finally:
                rec._in_kernel -= 1

        InterpretedFunction.run, Autotuner.run = run, at_run
        try:
            yield
        finally:
            InterpretedFunction.run, Autotuner.run = old_run, old_at


def _phase(fn: Callable[[], object]) -> tuple[object, dict]:
    from fastseg import _backend

    before = Counter(_backend.launches)
    rec = OpRecorder()
    with rec.kernels_apart(), rec:
        out = fn()
    launched = Counter(_backend.launches)
    launched.subtract(before)
    launched = {k: v for k, v in launched.items() if v}
    return out, {"launches": sum(launched.values()), "kernels": launched, "aten": dict(rec.ops),
                 "allocs": dict(rec.allocs), "sync": rec.sync}


def count(forward: Callable[[], torch.Tensor], leaves=(), grad: bool = True, warmup: bool = True) -> dict:
    """{"forward": ..., "backward": ...} of one call: launches, kernels, aten ops, allocations, sync ops.
    ``warmup`` runs the call once first, so per-weight-version caches are warm (as in a training loop after
    the first step); the ``leaves``' gradients are reset to None before the counted backward (no accumulation)."""
    if warmup:
        out = forward()
        if grad:
            out.float().sum().backward()
    for t in leaves:
        t.grad = None
    out, fwd = _phase(forward)
    if not grad:
        return {"forward": fwd, "backward": {"launches": 0, "kernels": {}, "aten": {}, "allocs": {}, "sync": []}}
    g = torch.randn_like(out)
    _, bwd = _phase(lambda: out.backward(g))
    return {"forward": fwd, "backward": bwd}


# ------------------------------------------------------------------------------------------------- cases
def _rand(*shape, dtype=torch.float32, grad=True, g=None):
    t = torch.randn(*shape, dtype=dtype, generator=g)
    return t.requires_grad_(grad)


def _case_msca(dtype):
    from fastseg.nn import MSCA

    m = MSCA(4).to(dtype)
    x = _rand(1, 4, 7, 9, dtype=dtype)
    return (lambda: m(x)), [x, *m.parameters()]


def _case_msca_op(dtype):
    from fastseg.nn import MSCA
    from fastseg.ops import msca
    from fastseg.ops.msca import DW_NAMES

    m = MSCA(4).to(dtype)
    x = _rand(1, 4, 7, 9, dtype=dtype)
    convs = [getattr(m, n) for n in DW_NAMES]
    return (lambda: msca(x, [c.weight for c in convs], [c.bias for c in convs], m.conv3.weight, m.conv3.bias)),\
        [x, *m.parameters()]


def _case_mlp_op(dtype):
    from fastseg.ops import dwconv3x3_gelu

    x = _rand(1, 6, 5, 7, dtype=dtype)
    w, b = _rand(6, 1, 3, 3, dtype=dtype), _rand(6, dtype=dtype)
    return (lambda: dwconv3x3_gelu(x, w, b)), [x, w, b]


def _case_mlp(dtype):
    from fastseg.nn import MSCANMlp

    m = MSCANMlp(4, 8).to(dtype)
    x = _rand(1, 4, 5, 7, dtype=dtype)
    return (lambda: m(x)), [x, *m.parameters()]


def _case_attention(dtype):
    from fastseg.ops import masked_attention

    q, k, v = _rand(1, 2, 5, 8, dtype=dtype), _rand(1, 2, 11, 8, dtype=dtype), _rand(1, 2, 11, 8, dtype=dtype)
    mask = torch.rand(1, 1, 5, 11) > 0.4
    mask[..., 0] = True
    return (lambda: masked_attention(q, k, v, mask)), [q, k, v]


def _case_mask_from_embeddings(dtype):
    from fastseg.ops import mask_from_embeddings

    e, f = _rand(1, 5, 8, dtype=dtype, grad=False), _rand(1, 8, 4, 6, dtype=dtype, grad=False)
    return (lambda: mask_from_embeddings(e, f).bits), []


def _case_context_cluster(dtype):
    from fastseg.ops import context_cluster

    x, v = _rand(1, 2 * 4, 4, 4, dtype=dtype), _rand(1, 2 * 4, 4, 4, dtype=dtype)
    a, b = _rand(1, dtype=dtype), _rand(1, dtype=dtype)
    return (lambda: context_cluster(x, v, a, b, 2, 2, 2, 2, 2)), [x, v, a, b]


def _case_atm_attention(dtype):
    """Both outputs are used (summed, so the counts include two sums and an add)."""
    from fastseg.ops import atm_attention

    q, k, v = _rand(1, 3, 5, 8, dtype=dtype), _rand(1, 3, 11, 8, dtype=dtype), _rand(1, 3, 11, 8, dtype=dtype)

    def fwd():
        out, logits = atm_attention(q, k, v)
        return out.sum() + logits.sum()
    return fwd, [q, k, v]


def _case_ms_deform_attn(dtype):
    """Shapes as a host list, starts None (checked in Python); CPU shape tensors are read only on CPU."""
    from fastseg.ops import ms_deform_attn

    shapes = [(3, 4), (2, 2)]
    S = sum(h * w for h, w in shapes)
    value = _rand(1, S, 2, 4, dtype=dtype)
    locs = torch.rand(1, 5, 2, 2, 3, 2, dtype=dtype).requires_grad_(True)
    attn = torch.rand(1, 5, 2, 2, 3, dtype=dtype).softmax(-1).requires_grad_(True)
    return (lambda: ms_deform_attn(value, shapes, None, locs, attn)), [value, locs, attn]


def _case_ms_deform_attn_from_offsets(dtype):
    from fastseg.ops import ms_deform_attn_from_offsets

    shapes = [(3, 4), (2, 2)]
    S = sum(h * w for h, w in shapes)
    value = _rand(1, S, 2, 4, dtype=dtype)
    ref = torch.rand(1, 5, 2, 2, dtype=dtype).requires_grad_(True)
    off, logits = _rand(1, 5, 2, 2, 3, 2, dtype=dtype), _rand(1, 5, 2, 2, 3, dtype=dtype)
    return (lambda: ms_deform_attn_from_offsets(value, shapes, None, ref, off, logits)), [value, ref, off, logits]


def _labels(b, h, w, k, g=None):
    y = torch.randint(0, k, (b, h, w), generator=g)
    y[:, 0, 0] = 255  # an ignored pixel
    return y


def _case_upsampled_ce(dtype):
    from fastseg.ops import upsampled_cross_entropy

    x = _rand(2, 5, 3, 4, dtype=dtype)
    y = _labels(2, 7, 9, 5)
    return (lambda: upsampled_cross_entropy(x, y)), [x]


def _case_mask_losses(dtype):
    from fastseg.ops import mask_losses

    x = _rand(3, 4, 5, dtype=dtype)
    y = torch.rand(3, 9, 11) > 0.5

    def fwd():
        focal, dice = mask_losses(x, y, 3.0)
        return focal + dice
    return fwd, [x]


def _case_mask_losses_rows(dtype):
    """With ``target_rows`` (the matcher's, as MaskFormer's criterion passes them): validated on the host."""
    from fastseg.ops import mask_losses

    x = _rand(3, 4, 5, dtype=dtype)
    y = torch.rand(4, 9, 11) > 0.5

    def fwd():
        focal, dice = mask_losses(x, y, 3.0, torch.tensor([3, 0, 2]))
        return focal + dice
    return fwd, [x]


def _case_mask_losses_from_embeddings(dtype, by_count=True):
    """As MaskFormer's criterion calls it: pairs image by image, host counts, the matcher's target rows."""
    from fastseg.ops import mask_losses_from_embeddings

    e, f = _rand(3, 6, dtype=dtype), _rand(2, 6, 4, 5, dtype=dtype)
    batch_idx = torch.tensor([0, 1, 1])  # the matcher's image of each pair
    y = torch.rand(4, 9, 11) > 0.5
    rows = torch.tensor([1, 3, 2])

    def fwd():
        if by_count:
            focal, dice = mask_losses_from_embeddings(e, f, None, y, 3.0, rows, pairs_per_image=[1, 2])
        else:
            focal, dice = mask_losses_from_embeddings(e, f, batch_idx, y, 3.0, rows)
        return focal + dice
    return fwd, [e, f]


def _case_mask_losses_from_embeddings_idx(dtype):
    return _case_mask_losses_from_embeddings(dtype, by_count=False)


def _case_mask_costs(dtype):
    from fastseg.ops import matcher_mask_costs_batch

    x = _rand(2, 5, 4, 5, dtype=dtype, grad=False)
    ys = [torch.rand(3, 9, 11) > 0.5, torch.rand(2, 8, 10) > 0.5]

    def fwd():
        return torch.cat([torch.cat(fd, 1) for fd in matcher_mask_costs_batch(ys, logits=x)], 1)
    return fwd, []


def _case_mask_costs_from_embeddings(dtype):
    from fastseg.ops import matcher_mask_costs_batch

    e, f = _rand(2, 5, 6, dtype=dtype, grad=False), _rand(2, 6, 4, 5, dtype=dtype, grad=False)
    ys = [torch.rand(3, 9, 11) > 0.5, torch.rand(2, 8, 10) > 0.5]

    def fwd():
        return torch.cat([torch.cat(fd, 1) for fd in matcher_mask_costs_batch(ys, embeds=e, features=f)], 1)
    return fwd, []


def _case_cac_soft_prototypes(dtype):
    from fastseg.ops.cac import soft_class_prototypes

    f, z = _rand(2, 6, 3, 5, dtype=dtype), _rand(2, 4, 3, 5, dtype=dtype)
    return (lambda: soft_class_prototypes(f, z)), [f, z]


def _case_cac_oracle_prototypes(dtype):
    from fastseg.ops.cac import oracle_class_prototypes

    f, wt = _rand(2, 6, 3, 5, dtype=dtype), _rand(4, 6, dtype=dtype)
    y = _labels(2, 6, 10, 4)
    return (lambda: oracle_class_prototypes(f, y, wt)), [f, wt]


def _case_cac_cosine(dtype):
    from fastseg.ops.cac import cosine_logits

    f, q = _rand(2, 6, 3, 5, dtype=dtype), _rand(2, 4, 6, dtype=dtype)
    return (lambda: cosine_logits(f, q)), [f, q]


def _case_cac_cosine_clamp(dtype):
    from fastseg.ops.cac import cosine_logits

    f, q = _rand(2, 6, 3, 5, dtype=dtype), _rand(4, 6, dtype=dtype)
    return (lambda: cosine_logits(f, q, clamp=True)), [f, q]


def _case_cac_train(dtype):
    """The fused classifier's training losses (refine, oracle, distillation, three upsampled CEs, accuracy)."""
    from fastseg.nn import ContextAwareClassifier

    m = ContextAwareClassifier(6, 4, dropout_ratio=0.0).to(dtype)
    x = _rand(2, 6, 3, 5, dtype=dtype)
    y = _labels(2, 6, 10, 4)[:, None]
    return (lambda: m.forward_train(x, y)["loss_ce"]), [x, *m.parameters()]


def _case_cac_distill(dtype):
    from fastseg.ops.cac import entropy_distill_loss

    x, t = _rand(2, 4, 3, 5, dtype=dtype), _rand(2, 4, 3, 5, dtype=dtype, grad=False)
    y = _labels(2, 6, 10, 4)
    return (lambda: entropy_distill_loss(x, t, y)), [x]


#: name -> (builder(dtype) -> (forward callable, leaf tensors), differentiable)
CASES = {
    "op msca": (_case_msca_op, True), "module fastseg.nn.MSCA": (_case_msca, True),
    "op dwconv3x3_gelu": (_case_mlp_op, True), "module fastseg.nn.MSCANMlp": (_case_mlp, True),
    "op masked_attention": (_case_attention, True), "op mask_from_embeddings": (_case_mask_from_embeddings, False),
    "op context_cluster": (_case_context_cluster, True), "op atm_attention": (_case_atm_attention, True),
    "op ms_deform_attn": (_case_ms_deform_attn, True),
    "op ms_deform_attn_from_offsets": (_case_ms_deform_attn_from_offsets, True),
    "op upsampled_cross_entropy": (_case_upsampled_ce, True),
    "op mask_losses": (_case_mask_losses, True),
    "op mask_losses (target_rows)": (_case_mask_losses_rows, True),
    "op mask_losses_from_embeddings": (_case_mask_losses_from_embeddings, True),
    "op mask_losses_from_embeddings (batch_idx)": (_case_mask_losses_from_embeddings_idx, True),
    "op matcher_mask_costs_batch": (_case_mask_costs, False),
    "op matcher_mask_costs_batch (embeddings)": (_case_mask_costs_from_embeddings, False),
    "op cac.soft_class_prototypes": (_case_cac_soft_prototypes, True),
    "op cac.oracle_class_prototypes": (_case_cac_oracle_prototypes, True),
    "op cac.cosine_logits": (_case_cac_cosine, True),
    "op cac.cosine_logits (clamp)": (_case_cac_cosine_clamp, True),
    "op cac.entropy_distill_loss": (_case_cac_distill, True),
    "module fastseg.nn.ContextAwareClassifier (forward_train)": (_case_cac_train, True),
}


#: half-precision cases the interpreter runs (fp16; its bf16 GEMM is wrong, so MSCA refuses bf16 on CPU)
HALF_CASES = ("op msca", "module fastseg.nn.MSCA", "op dwconv3x3_gelu")


def count_cases(dtypes=(torch.float32, torch.float16)) -> list[dict]:
    from fastseg import _backend

    if not _backend.interpreter_enabled():
        raise RuntimeError("op counts run under the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                           "fastseg (count_all() starts such a process)")
    rows = []
    for name, (build, grad) in CASES.items():
        for dt in dtypes:
            if dt != torch.float32 and name not in HALF_CASES:
                continue
            torch.manual_seed(0)
            try:
                fn, leaves = build(dt)
                res = count(fn, leaves, grad=grad)
            except Exception as e:  # another family's op changed: report, keep counting the others
                rows.append({"what": name, "dtype": str(dt).split(".")[-1], "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"what": name, "dtype": str(dt).split(".")[-1], **res})
    return rows


def count_all() -> list[dict]:
    """:func:`count_cases` in a child process with TRITON_INTERPRET=1 (the interpreter is chosen at import)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "fastseg.bench.opcount", "--json"], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"op counting failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastseg.bench.opcount")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        rows = count_all()
    else:
        rows = count_cases()
    if a.json:
        print(json.dumps(rows, default=str))
    else:
        from .inspect import counts_markdown

        print(counts_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
