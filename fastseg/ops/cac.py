"""CAC's context-aware classifier as fused ops with autograd (Triton kernels in :mod:`fastseg.kernels.cac`).

Same signatures and results as :mod:`fastseg.reference.cac` (so this module can serve as its ``impl`` in
:func:`fastseg.reference.cac.cac_train_losses`):

* ``soft_class_prototypes(feat (B, C, h, w), logits (B, K, h, w)) -> (B, K, C)``: softmax-weighted feature
  means; the (B, K, h·w) probabilities are never stored (the backward recomputes them). K ≤ 256 on the Triton
  path.
* ``oracle_class_prototypes(feat, labels, weight, ignore_index=255) -> (K, C)``: batch mean feature per labelled
  class, ``weight`` rows for absent classes (no (B·h·w, K) onehot).
* ``cosine_logits(feat, proto (K, C) or (B, K, C), tau=15, norm_eps=1e-12, clamp=False) -> (B, K, h, w)``:
  τ·cos, each side ÷ (norm + eps) (``get_pred``) or, ``clamp=True``, ÷ max(norm, eps) (``F.normalize``).
* ``refine_logits`` / ``oracle_logits``: the two classifiers composed from the above and the projector.
* ``entropy_distill_loss(pred, teacher, labels, smoothness=0.5, ignore_index=255, eps=0.0) -> ()``: one kernel
  over the pixels with per-class accumulators (teacher detached).

Labels (B, H, W) or (B, 1, H, W) int, values in [0, K) or ``ignore_index``. On the Triton path labels outside
[0, K) give NaN (the oracle table's every row, the distillation loss, and those pixels' gradients); no host
check, which would make every call wait for the GPU. The plain-PyTorch path (the reference) raises ValueError.

Float dtypes fp32 / fp16 / bf16 (fp64 on CPU); features and logits of one call share a dtype. Dispatch by
:func:`fastseg._backend.select`: Triton on CUDA and under ``TRITON_INTERPRET=1``, else the reference. The
per-tile partial sums are reduced in a fixed order (deterministic; no atomics). Saved for backward: the
inputs, per-pixel statistics (B, h·w) and per-class (B, K[, C]) tensors; the cosine classifier also keeps its
output (the next op holds it anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import cac as ref
from ..reference.cac import SMOOTHNESS, TAU, resize_labels

__all__ = ["soft_class_prototypes", "oracle_class_prototypes", "cosine_logits", "refine_logits", "oracle_logits",
           "entropy_distill_loss", "upsampled_cross_entropy"]

from .upsample_ce import upsampled_cross_entropy  # noqa: E402  (the CE of cac_train_losses' fused impl)

_EPS = 1e-12
_OP = "cac"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_triton(name: str, *tensors) -> bool:
    device = _backend.check_same_device(name, **{f"t{i}": t for i, t in enumerate(tensors)})
    if any(t.numel() == 0 for t in tensors) or _backend.select(name, device) == "torch":
        return False
    if device.type == "cuda" and any(t.dtype == torch.float64 for t in tensors):
        raise TypeError(f"{name}: float64 runs only under the Triton interpreter; use fp32/fp16/bf16 on CUDA")
    return True


def _check_feat(name, feat):
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or not feat.is_floating_point():
        raise ValueError(f"{name}: feat must be a floating (B, C, h, w) tensor, got "
                         f"{getattr(feat, 'dtype', type(feat))} {tuple(getattr(feat, 'shape', ()))}")


def _fold(t):
    """A (B, X, h, w) tensor whose pixel axes fold into one (the kernels index h·w with one stride)."""
    b, x, h, w = t.shape
    sb, sx, sh, sw = t.stride()
    return t if (h <= 1 or w <= 1 or sh == sw * w) else t.contiguous()


# --------------------------------------------------------------------------------------- soft prototypes
def _soft_fwd_impl(feat, logits):
    from fastseg.kernels import cac as K

    a, d, lse = K.soft_proto_fwd(feat, logits)
    inv = 1.0 / (d + _EPS)
    return a * inv.unsqueeze(-1), lse, inv  # prototypes (accumulation dtype), lse (B, P), 1/(Σw + eps) (B, K)


def _soft_bwd_impl(feat, logits, lse, inv, proto, g):
    from fastseg.kernels import cac as K

    g = g.to(proto.dtype)
    da = (g * inv.unsqueeze(-1)).contiguous()
    dd = (-(g * proto).sum(-1) * inv).contiguous()
    return K.soft_proto_bwd(feat, logits, lse, da, dd)


class _SoftPrototypes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, logits):
        proto, lse, inv = _soft_fwd_impl(feat, logits)
        ctx.save_for_backward(feat, logits, lse, inv, proto)
        return proto

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return _soft_bwd_impl(*ctx.saved_tensors, g)


def soft_class_prototypes(feat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, K, C): Σ_p softmax(logits)_kp f_p / (Σ_p softmax_kp + 1e-12), in feat's dtype."""
    _check_feat("soft_class_prototypes", feat)
    b, c, h, w = feat.shape
    if logits.dim() != 4 or logits.shape[0] != b or logits.shape[2:] != feat.shape[2:]:
        raise ValueError(f"soft_class_prototypes: logits {tuple(logits.shape)} do not match feat {tuple(feat.shape)}")
    if logits.dtype != feat.dtype:
        raise TypeError(f"soft_class_prototypes: logits ({logits.dtype}) and feat ({feat.dtype}) must share a dtype")
    if not _use_triton("soft_class_prototypes", feat, logits):
        return ref.soft_class_prototypes(feat, logits)
    from fastseg.kernels.cac import MAX_CLASSES

    if logits.shape[1] > MAX_CLASSES:
        raise NotImplementedError(f"soft_class_prototypes: the Triton kernel keeps all classes of a pixel in "
                                  f"registers and supports K <= {MAX_CLASSES}, got K = {logits.shape[1]}")
    feat, logits = _fold(feat), _fold(logits)
    if torch.compiler.is_compiling():
        return _soft_fwd_op(feat, logits)[0].to(feat.dtype)
    return _SoftPrototypes.apply(feat, logits).to(feat.dtype)


# -------------------------------------------------------------------------------------- oracle prototypes
class _LabelSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, y, k, ignore_index):
        from fastseg.kernels import cac as K

        a, count = K.label_proto_fwd(feat, y, k, ignore_index)
        ctx.save_for_backward(feat, y)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(count)
        return a, count

    @staticmethod
    @once_differentiable
    def backward(ctx, ga, gcount):
        from fastseg.kernels import cac as K

        feat, y = ctx.saved_tensors
        return K.label_proto_bwd(feat, y, ga.contiguous(), ctx.ignore_index), None, None, None


def oracle_class_prototypes(feat: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                            ignore_index: int = 255) -> torch.Tensor:
    """(K, C): batch mean feature of the pixels labelled k (labels nearest-resized to the feature size), or
    ``weight[k]`` where class k has no pixel (see :func:`fastseg.reference.cac.oracle_class_prototypes`)."""
    _check_feat("oracle_class_prototypes", feat)
    _backend.check_same_device("oracle_class_prototypes", feat=feat, labels=labels, weight=weight)
    if not _use_triton("oracle_class_prototypes", feat, weight):
        return ref.oracle_class_prototypes(feat, labels, weight, ignore_index)
    b, c, h, w = feat.shape
    k = weight.shape[0]
    from fastseg.kernels.cac import MAX_CLASSES

    if k > MAX_CLASSES:
        raise NotImplementedError(f"oracle_class_prototypes: the Triton kernel keeps all classes of a pixel in "
                                  f"registers and supports K <= {MAX_CLASSES}, got K = {k}")
    y = resize_labels(labels, (h, w), None, ignore_index).reshape(b, h * w).contiguous()  # no host check
    if torch.compiler.is_compiling():
        a, count = _label_fwd_op(_fold(feat), y, k, int(ignore_index))
    else:
        a, count = _LabelSums.apply(_fold(feat), y, k, int(ignore_index))
    mean = a / (count.unsqueeze(1) + _EPS)  # count is NaN after a bad label: keep the NaN (!= 0, not > 0)
    return torch.where((count != 0).unsqueeze(1), mean, weight.to(mean.dtype)).to(feat.dtype)


# -------------------------------------------------------------------------------------- cosine classifier
def _inv_norm(n, eps, clamp):
    """(1/(n+eps) or 1/max(n, eps), ∂(that)/∂n · (n+eps or max(n, eps)) / n, 0 where undefined)."""
    if clamp:
        inv = 1.0 / n.clamp_min(eps)
        coef = torch.where(n > eps, -inv * inv, torch.zeros_like(n))
    else:
        inv = 1.0 / (n + eps)
        coef = torch.where(n > 0, -inv / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    return inv, coef


def _cos_fwd_impl(feat, q3, tau, eps, clamp):
    """q3 (B|1, K, C) in feat's dtype → (out, 1/‖q‖, q's gradient coefficient (both (B|1, K)), ‖f‖ (B, P))."""
    from fastseg.kernels import cac as K

    q3 = q3.contiguous()
    m = torch.linalg.vector_norm(q3.to(_acc(feat.dtype)), dim=-1)
    rq, coef_q = _inv_norm(m, eps, clamp)
    out, nf = K.cos_fwd(feat, q3, rq.contiguous(), tau, eps, clamp)
    return out, rq, coef_q, nf


def _cos_bwd_impl(feat, q3, rq, coef_q, nf, out, g, tau, eps, clamp):
    from fastseg.kernels import cac as K

    q3 = q3.contiguous()
    df, gf, t = K.cos_bwd(feat, q3, rq, nf, out, g.contiguous(), tau, eps, clamp)
    dq = tau * rq.unsqueeze(-1) * gf + q3.to(gf.dtype) * (coef_q * t).unsqueeze(-1)  # (B, K, C)
    if q3.shape[0] == 1:  # a table shared by the images
        dq = dq.sum(0, keepdim=True)
    return df, dq.to(q3.dtype)


class _Cosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, q3, tau, eps, clamp):
        out, rq, coef_q, nf = _cos_fwd_impl(feat, q3, tau, eps, clamp)
        ctx.save_for_backward(feat, q3, rq, coef_q, nf, out)
        ctx.args = (tau, eps, clamp)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        df, dq = _cos_bwd_impl(*ctx.saved_tensors, g, *ctx.args)
        return df, dq, None, None, None


def cosine_logits(feat: torch.Tensor, proto: torch.Tensor, tau: float = TAU, norm_eps: float = _EPS,
                  clamp: bool = False) -> torch.Tensor:
    """τ · cos(f_p, proto_k) (B, K, h, w) in feat's dtype; ``proto`` (K, C) shared or (B, K, C) per image."""
    _check_feat("cosine_logits", feat)
    b, c, h, w = feat.shape
    if proto.dim() not in (2, 3) or proto.shape[-1] != c or (proto.dim() == 3 and proto.shape[0] != b):
        raise ValueError(f"cosine_logits: proto {tuple(proto.shape)} must be (K, {c}) or ({b}, K, {c})")
    if not proto.is_floating_point():
        raise TypeError(f"cosine_logits: proto must be floating point, got {proto.dtype}")
    if not _use_triton("cosine_logits", feat, proto):
        if clamp:
            p = F.normalize(proto, 2, -1)
            x = F.normalize(feat, 2, 1)
            eq = "kc,bchw->bkhw" if p.dim() == 2 else "bkc,bchw->bkhw"
            return torch.einsum(eq, p, x) * tau
        return ref.cosine_logits(feat, proto, tau, norm_eps)
    q3 = (proto.unsqueeze(0) if proto.dim() == 2 else proto).to(feat.dtype)  # autograd sums a shared table's grad
    feat, args = _fold(feat), (float(tau), float(norm_eps), bool(clamp))
    if torch.compiler.is_compiling():
        return _cos_fwd_op(feat, q3, *args)[0]
    return _Cosine.apply(feat, q3, *args)


def refine_logits(feat, logits, weight, proj, tau: float = TAU, norm_eps: float = _EPS) -> torch.Tensor:
    """``post_refine_proto_v2`` (see :func:`fastseg.reference.cac.refine_logits`), fused."""
    proto = soft_class_prototypes(feat, logits)
    proto = torch.cat([proto, weight.unsqueeze(0).expand(proto.shape[0], -1, -1).to(proto.dtype)], -1)
    return cosine_logits(feat, proj(proto), tau, norm_eps)


def oracle_logits(feat, labels, weight, apd_proj, tau: float = TAU, ignore_index: int = 255) -> torch.Tensor:
    """``get_adaptive_perspective`` (see :func:`fastseg.reference.cac.oracle_logits`), fused."""
    table = oracle_class_prototypes(feat, labels, weight.detach(), ignore_index)
    proto = apd_proj(torch.cat([table, weight.to(table.dtype)], -1))
    return cosine_logits(feat, proto, tau, _EPS, clamp=True)


# ----------------------------------------------------------------------------------------- distillation
def _distill_fwd_impl(pred, teacher, y, smoothness, ignore_index, eps):
    """(loss (), stats (3, B, P), per-class gradient weights (K,) = [present] / (Σ entropy + 1e-12) / (n + 1e-12))."""
    from fastseg.kernels import cac as K

    sums, stats = K.distill_fwd(pred, teacher, y, smoothness, ignore_index, eps)
    num, den, count = sums
    present = count > 0
    n = present.sum().to(num.dtype)
    inv_den = torch.where(present, 1.0 / (den + 1e-12), torch.zeros_like(num))
    return (num * inv_den).sum() / (n + 1e-12), stats, inv_den / (n + 1e-12)


def _distill_bwd_impl(pred, teacher, y, stats, w, g, smoothness, ignore_index, eps):
    from fastseg.kernels import cac as K

    return K.distill_bwd(pred, teacher, y, stats, (w * g.to(w.dtype)).contiguous(), smoothness, ignore_index, eps)


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, teacher, y, smoothness, ignore_index, eps):
        loss, stats, w = _distill_fwd_impl(pred, teacher, y, smoothness, ignore_index, eps)
        ctx.save_for_backward(pred, teacher, y, stats, w)
        ctx.args = (smoothness, ignore_index, eps)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return _distill_bwd_impl(*ctx.saved_tensors, g, *ctx.args), None, None, None, None, None


def entropy_distill_loss(pred: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                         smoothness: float = SMOOTHNESS, ignore_index: int = 255, eps: float = 0.0) -> torch.Tensor:
    """``get_distill_loss`` (see :func:`fastseg.reference.cac.entropy_distill_loss`): scalar, float32 for fp16 /
    bf16 inputs; no gradient to ``teacher``."""
    if pred.shape != teacher.shape or pred.dim() != 4:
        raise ValueError(f"entropy_distill_loss: pred {tuple(pred.shape)} and teacher {tuple(teacher.shape)} "
                         "must be the same (B, K, h, w)")
    if not pred.is_floating_point() or teacher.dtype != pred.dtype:
        raise TypeError(f"entropy_distill_loss: pred and teacher must share a floating dtype, got {pred.dtype}, "
                        f"{teacher.dtype}")
    _backend.check_same_device("entropy_distill_loss", pred=pred, teacher=teacher, labels=labels)
    if not _use_triton("entropy_distill_loss", pred, teacher):
        return ref.entropy_distill_loss(pred, teacher, labels, smoothness, ignore_index, eps)
    b, k, h, w = pred.shape
    y = resize_labels(labels, (h, w), None, ignore_index).reshape(b, h * w).contiguous()  # no host check
    args = (_fold(pred), _fold(teacher.detach()), y, float(smoothness), int(ignore_index), float(eps))
    if torch.compiler.is_compiling():
        return _distill_fwd_op(*args)[0]
    return _Distill.apply(*args)


# ------------------------------------------------------------------------------------------ torch.library ops
# Eager calls go through the autograd Functions above (torch.library's custom-op dispatch costs Python per
# call); under torch.compile the same implementations are reached through these ops (no graph break). Outputs
# never alias inputs or each other.
def _acc_like(t, shape):
    return t.new_empty(shape, dtype=_acc(t.dtype))


@torch.library.custom_op("fastseg::cac_soft_prototypes_fwd", mutates_args=())
def _soft_fwd_op(feat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _soft_fwd_impl(feat, logits)


@_soft_fwd_op.register_fake
def _(feat, logits):
    b, c, h, w = feat.shape
    k = logits.shape[1]
    return _acc_like(feat, (b, k, c)), _acc_like(feat, (b * h * w,)), _acc_like(feat, (b, k))


@torch.library.custom_op("fastseg::cac_soft_prototypes_bwd", mutates_args=())
def _soft_bwd_op(feat: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, inv: torch.Tensor, proto: torch.Tensor,
                 g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _soft_bwd_impl(feat, logits, lse, inv, proto, g)


@_soft_bwd_op.register_fake
def _(feat, logits, lse, inv, proto, g):
    return (torch.empty_like(feat, memory_format=torch.contiguous_format),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


def _soft_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2], output[0])
    ctx.mark_non_differentiable(output[1], output[2])


def _soft_backward(ctx, g, *unused):
    return _soft_bwd_op(*ctx.saved_tensors, g)


_soft_fwd_op.register_autograd(_soft_backward, setup_context=_soft_setup)


@torch.library.custom_op("fastseg::cac_label_prototypes_fwd", mutates_args=())
def _label_fwd_op(feat: torch.Tensor, y: torch.Tensor, k: int, ignore_index: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastseg.kernels import cac as K

    return K.label_proto_fwd(feat, y, k, ignore_index)


@_label_fwd_op.register_fake
def _(feat, y, k, ignore_index):
    return _acc_like(feat, (k, feat.shape[1])), _acc_like(feat, (k,))


@torch.library.custom_op("fastseg::cac_label_prototypes_bwd", mutates_args=())
def _label_bwd_op(feat: torch.Tensor, y: torch.Tensor, ga: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from fastseg.kernels import cac as K

    return K.label_proto_bwd(feat, y, ga.contiguous(), ignore_index)


@_label_bwd_op.register_fake
def _(feat, y, ga, ignore_index):
    return torch.empty_like(feat, memory_format=torch.contiguous_format)


def _label_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.ignore_index = inputs[3]
    ctx.mark_non_differentiable(output[1])


def _label_backward(ctx, ga, gcount):
    feat, y = ctx.saved_tensors
    return _label_bwd_op(feat, y, ga, ctx.ignore_index), None, None, None


_label_fwd_op.register_autograd(_label_backward, setup_context=_label_setup)


@torch.library.custom_op("fastseg::cac_cosine_fwd", mutates_args=())
def _cos_fwd_op(feat: torch.Tensor, q3: torch.Tensor, tau: float, eps: float, clamp: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cos_fwd_impl(feat, q3, tau, eps, clamp)


@_cos_fwd_op.register_fake
def _(feat, q3, tau, eps, clamp):
    b, c, h, w = feat.shape
    k = q3.shape[1]
    return (feat.new_empty((b, k, h, w)), _acc_like(feat, (q3.shape[0], k)), _acc_like(feat, (q3.shape[0], k)),
            _acc_like(feat, (b, h * w)))


@torch.library.custom_op("fastseg::cac_cosine_bwd", mutates_args=())
def _cos_bwd_op(feat: torch.Tensor, q3: torch.Tensor, rq: torch.Tensor, coef_q: torch.Tensor, nf: torch.Tensor,
                out: torch.Tensor, g: torch.Tensor, tau: float, eps: float, clamp: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return _cos_bwd_impl(feat, q3, rq, coef_q, nf, out, g, tau, eps, clamp)


@_cos_bwd_op.register_fake
def _(feat, q3, rq, coef_q, nf, out, g, tau, eps, clamp):
    return (torch.empty_like(feat, memory_format=torch.contiguous_format),
            torch.empty_like(q3, memory_format=torch.contiguous_format))


def _cos_setup(ctx, inputs, output):
    feat, q3, tau, eps, clamp = inputs
    out, rq, coef_q, nf = output
    ctx.save_for_backward(feat, q3, rq, coef_q, nf, out)
    ctx.args = (tau, eps, clamp)
    ctx.mark_non_differentiable(rq, coef_q, nf)


def _cos_backward(ctx, g, *unused):
    df, dq = _cos_bwd_op(*ctx.saved_tensors, g, *ctx.args)
    return df, dq, None, None, None


_cos_fwd_op.register_autograd(_cos_backward, setup_context=_cos_setup)


@torch.library.custom_op("fastseg::cac_distill_fwd", mutates_args=())
def _distill_fwd_op(pred: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, smoothness: float,
                    ignore_index: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _distill_fwd_impl(pred, teacher, y, smoothness, ignore_index, eps)


@_distill_fwd_op.register_fake
def _(pred, teacher, y, smoothness, ignore_index, eps):
    b, k, h, w = pred.shape
    return _acc_like(pred, ()), _acc_like(pred, (3, b, h * w)), _acc_like(pred, (k,))


@torch.library.custom_op("fastseg::cac_distill_bwd", mutates_args=())
def _distill_bwd_op(pred: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, stats: torch.Tensor,
                    w: torch.Tensor, g: torch.Tensor, smoothness: float, ignore_index: int, eps: float
                    ) -> torch.Tensor:
    return _distill_bwd_impl(pred, teacher, y, stats, w, g, smoothness, ignore_index, eps)


@_distill_bwd_op.register_fake
def _(pred, teacher, y, stats, w, g, smoothness, ignore_index, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _distill_setup(ctx, inputs, output):
    pred, teacher, y, *args = inputs
    ctx.save_for_backward(pred, teacher, y, output[1], output[2])
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(output[1], output[2])


def _distill_backward(ctx, g, *unused):
    return _distill_bwd_op(*ctx.saved_tensors, g, *ctx.args), None, None, None, None, None


_distill_fwd_op.register_autograd(_distill_backward, setup_context=_distill_setup)
