"""Training with and without :func:`fastseg.patch` from the same seed: loss curves on a synthetic task.

The task: images of a background and a few coloured shapes (rectangles, discs, triangles; one class each,
random size / place / brightness, pixel noise), made from a seed; per-pixel labels. The models, small
versions of the project's models:

* ``"mask2former"``: :class:`~fastseg.models.Mask2Former` with the :class:`~fastseg.models.TinyResNet`
  backbone, Mask2Former's matcher + losses on the present classes (patch: masked attention + the packed
  attention masks);
* ``"segnext"``: :class:`~fastseg.models.SegNeXt` (a narrow, 1-block-per-stage MSCAN + LightHamHead),
  cross-entropy (patch: MSCA);
* ``"coc"``: a narrow ``coc_tiny`` (fork_feat) with a small head (1×1 conv per stage to a common width,
  upsampled to stride 4 and summed, 1×1 classifier; the official segmentation models use a semantic FPN
  that fastseg does not have), cross-entropy (patch: context cluster);
* ``"hf-mask2former"``: Hugging Face transformers' ``Mask2FormerForUniversalSegmentation`` from a small
  config (Swin backbone, random init, no download), its own loss (``outputs.loss``) on the present classes
  (patch: whatever ``fastseg.patch`` finds in it: the masked cross-attentions, the pixel decoder's deformable
  attention, the decoder's mask path). Needs ``transformers``.

:func:`train` runs one curve; :func:`compare` both (patched / unpatched). Random draws inside the
models (NMF bases, Mask2Former's point sampling) are reseeded before every step, identically for both.
Used by ``tests/test_convergence.py`` (tiny sizes, interpreter) and ``benchmarks/convergence.py``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["synthetic_batch", "build", "loss_fn", "train", "compare", "MODELS", "SIZES"]

MODELS = ("mask2former", "segnext", "coc", "hf-mask2former")

#: per model and size: (image size, batch, model options)
SIZES = {
    "ci": {"mask2former": (64, 2, dict(width=16, queries=4, dec_layers=2, points=32)),
           "segnext": (16, 2, dict(dims=(4, 8, 8, 8), ham=32, depths=(1, 0, 0, 0))),
           "coc": (32, 1, dict(dims=(4, 4, 8, 8), heads=(1, 1, 1, 1), head_dim=(4, 4, 4, 4), fold=(2, 2, 1, 1))),
           "hf-mask2former": (64, 2, dict(width=16, queries=4, dec_layers=2, points=32))},
    "bench": {"mask2former": (64, 4, dict(width=32, queries=8, dec_layers=3, points=256)),
              "segnext": (64, 4, dict(dims=(16, 32, 64, 64), ham=32)),
              "coc": (64, 4, dict(dims=(16, 32, 48, 64), heads=(2, 2, 4, 4), head_dim=(8, 8, 8, 8))),
              "hf-mask2former": (64, 4, dict(width=32, queries=8, dec_layers=3, points=256))},
}

_COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.95], [0.95, 0.85, 0.1]])


def synthetic_batch(batch: int, size: int, num_classes: int = 4, generator: torch.Generator | None = None,
                    dtype=torch.float32):
    """(images (B, 3, size, size) in ~[-1, 1], labels (B, size, size) int64 in [0, num_classes)).

    Class 0 is the background (a random grey); classes 1.. are a rectangle, a disc, a triangle ... each in its
    colour with random brightness, drawn in random order (later shapes cover earlier ones)."""
    if not 2 <= num_classes <= len(_COLOURS) + 1:
        raise ValueError(f"num_classes must be in [2, {len(_COLOURS) + 1}], got {num_classes}")
    g = generator
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    f32 = torch.float32  # drawn in float32 whatever the default dtype, so every dtype sees the same task
    images = torch.empty(batch, 3, size, size, dtype=f32)
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        img = torch.rand(1, generator=g, dtype=f32).expand(3, size, size).clone() * 0.4 + 0.3
        for cls in (torch.randperm(num_classes - 1, generator=g) + 1).tolist():
            cy, cx = (torch.rand(2, generator=g, dtype=f32) * 0.6 + 0.2).mul(size).tolist()
            r = float(torch.rand(1, generator=g, dtype=f32) * 0.15 + 0.12) * size
            kind = (cls - 1) % 3
            if kind == 0:
                inside = ((ys - cy).abs() <= r * 0.8) & ((xs - cx).abs() <= r * 1.2)
            elif kind == 1:
                inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            else:
                inside = (ys >= cy - r) & (ys <= cy + r) & ((xs - cx).abs() <= (ys - (cy - r)) * 0.6)
            bright = float(torch.rand(1, generator=g, dtype=f32) * 0.4 + 0.8)
            img[:, inside] = (_COLOURS[cls - 1] * bright).clamp(max=1)[:, None]
            labels[b][inside] = cls
        images[b] = img + 0.05 * torch.randn(3, size, size, generator=g, dtype=f32)
    return (images * 2 - 1).to(dtype), labels


def mask_targets(labels: torch.Tensor, dtype=torch.float32) -> list[dict]:
    """Mask2Former targets from per-pixel labels: one binary mask per present class."""
    out = []
    for lab in labels:
        classes = lab.unique()
        out.append({"labels": classes, "masks": (lab[None] == classes[:, None, None]).to(dtype)})
    return out


class CoCSegmenter(nn.Module):
    """``coc_tiny``-style backbone (4 stage features) + a small sum-of-levels head (see the module doc)."""

    def __init__(self, backbone: nn.Module, dims, num_classes: int, width: int = 16):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.ModuleList(nn.Conv2d(d, width, 1) for d in dims)
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if i else p(f)
                for i, (p, f) in enumerate(zip(self.proj, feats)))
        return F.interpolate(self.cls(F.relu(y)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build(name: str, num_classes: int = 4, size: str = "ci", seed: int = 0) -> nn.Module:
    """The small model ``name`` (one of :data:`MODELS`) at ``size`` ("ci" or "bench"), initialised from
    ``seed``."""
    from fastseg import models

    opts = SIZES[size][name][2]
    torch.manual_seed(seed)
    if name == "mask2former":
        w = opts["width"]
        return models.build_mask2former(
            "tiny", num_classes, backbone_kwargs=dict(channels=(w // 2, w, w, w), stem_channels=w // 2),
            hidden_dim=w, num_queries=opts["queries"], nheads=2, dim_feedforward=2 * w,
            dec_layers=opts["dec_layers"], mask_dim=w, conv_dim=w, enc_layers=1, enc_nheads=2,
            enc_dim_feedforward=2 * w, train_num_points=opts["points"])
    if name == "segnext":
        dims, ham = list(opts["dims"]), opts["ham"]
        head = models.LightHamHead(in_channels=dims[1:], channels=ham, ham_channels=ham, num_classes=num_classes,
                                   dropout_ratio=0.0,
                                   ham_kwargs=dict(MD_S=1, MD_R=4, train_steps=3, eval_steps=3, inv_t=100,
                                                   rand_init=True))
        depths = list(opts.get("depths", (1, 1, 1, 1)))
        return models.SegNeXt(models.MSCAN(embed_dims=dims, depths=depths, mlp_ratios=[4, 4, 4, 4]), head)
    if name == "coc":
        dims = list(opts["dims"])
        fold = list(opts.get("fold", (8, 4, 2, 1)))
        backbone = models.coc_tiny(fork_feat=True, layers=[1, 1, 1, 1], embed_dims=dims, heads=list(opts["heads"]),
                                   head_dim=list(opts["head_dim"]), fold_w=fold, fold_h=fold)
        return CoCSegmenter(backbone, dims, num_classes)
    if name == "hf-mask2former":
        return _hf_mask2former(num_classes, **opts)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def _hf_mask2former(num_classes: int, width: int, queries: int, dec_layers: int, points: int) -> nn.Module:
    """A small Hugging Face Mask2Former (Swin backbone at 64², random init, dropout 0 so both curves see the
    same numbers)."""
    try:
        import transformers
    except ImportError as e:  # a clear error, not a skipped model
        raise RuntimeError("the hf-mask2former convergence model needs `transformers`") from e
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=width, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.Mask2FormerConfig(
        backbone_config=swin, use_pretrained_backbone=False, hidden_dim=2 * width, mask_feature_size=2 * width,
        feature_size=2 * width, num_queries=queries, encoder_layers=1, decoder_layers=dec_layers + 1,
        num_attention_heads=2, dim_feedforward=4 * width, encoder_feedforward_dim=4 * width,
        num_labels=num_classes, train_num_points=points, dropout=0.0)
    return transformers.Mask2FormerForUniversalSegmentation(cfg)


def loss_fn(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: Mask2Former's weighted sum of losses, HF's ``outputs.loss``, or pixel cross-entropy."""
    if name == "mask2former":
        return sum(model(images, mask_targets(labels, images.dtype)).values())
    if name == "hf-mask2former":
        targets = mask_targets(labels, images.dtype)
        return model(pixel_values=images, mask_labels=[t["masks"] for t in targets],
                     class_labels=[t["labels"] for t in targets]).loss
    return F.cross_entropy(model(images), labels)


@dataclasses.dataclass
class Curve:
    losses: list
    patched: bool
    replaced: int  # modules fastseg.patch replaced (0 unpatched)


def train(name: str, patched: bool, steps: int, *, size: str = "ci", seed: int = 0, lr: float = 3e-3,
          dtype=torch.float32, num_classes: int = 4, data_seed: int = 1, optimizer: str = "adamw") -> Curve:
    """``steps`` AdamW steps on fresh synthetic batches (the same batches for every call with the same
    ``data_seed``); returns the loss of every step."""
    import fastseg

    image_size, batch, _ = SIZES[size][name]
    model = build(name, num_classes, size, seed).to(dtype).train()
    replaced = 0
    if patched:
        model, report = fastseg.patch(model)
        replaced = report.count()
        if replaced == 0:
            raise RuntimeError(f"fastseg.patch replaced nothing in the {name} model")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    g = torch.Generator().manual_seed(data_seed)
    losses = []
    for step in range(steps):
        images, labels = synthetic_batch(batch, image_size, num_classes, g, dtype)
        torch.manual_seed(10_000 * seed + step)  # the models' own random draws, identical for both curves
        loss = loss_fn(name, model, images, labels)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return Curve(losses, patched, replaced)


def compare(name: str, steps: int, **kw) -> tuple[Curve, Curve]:
    """(unpatched curve, patched curve) from the same seed and data."""
    return train(name, False, steps, **kw), train(name, True, steps, **kw)
