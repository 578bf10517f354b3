"""SegViT models: a plain ViT backbone + an ATM head, as mmseg's ``EncoderDecoder`` with SegViT's configs.

* :class:`SegViT`: ``backbone`` + ``decode_head`` (the names of mmseg's ``EncoderDecoder``, so SegViT checkpoints'
  ``backbone.*`` / ``decode_head.*`` keys load, ``decode_head.loss_decode.criterion.empty_weight`` included;
  :func:`load_segvit_checkpoint`).
  ``forward(img)`` -> class scores (B, K, H, W) at the input size (mmseg's ``encode_decode``: the head's
  ``pred`` at ``img_size``, bilinearly resized); ``forward(img, label)`` -> weighted losses (training mode);
  :meth:`SegViT.slide_inference` (the configs' ``test_cfg`` mode ``slide``) and :meth:`SegViT.predict`
  (softmax + argmax label map).
* Builders (random init, ADE20K's 150 classes by default): :func:`segvit_vit_t`, :func:`segvit_vit_s`,
  :func:`segvit_vit_b`, :func:`segvit_vit_l`; ``structure="shrunk"`` (official Shrunk: ``vit_shrink`` +
  ``TPNATMHead``) or ``"shrunk++"`` (SegViTv2's EQD / QU, our reading, :mod:`fastseg.models.vit_shrunk_plus`).
  :func:`build_segvit` takes the size by name.

Official sizes (``configs/``): ViT-B 768 wide, 12 layers, 12 heads, ``out_indices`` [5, 7, 11], head
``embed_dims`` 384, 12 heads, 3 layers per stage; ViT-L 1024 / 24 / 16, [7, 15, 23], head 512 / 16;
Shrunk ViT-L ``shrink_idx=8``, ``out_indices`` [7, 23], ``TPNATMHead`` 2 stages. ViT-T (192 / 3 heads) and
ViT-S (384 / 6) are ours, scaled as the official ones (head width C/2, 32 channels per head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .atm_head import ATMHead, TPNATMHead
from .vit import ViTShrink, VisionTransformer
from .vit_shrunk_plus import ViTShrunkPlus, edge_loss, edge_targets

__all__ = ["SegViT", "segvit_vit_t", "segvit_vit_s", "segvit_vit_b", "segvit_vit_l", "build_segvit",
           "SEGVIT_SIZES", "load_segvit_checkpoint"]

# name: (embed_dims, num_layers, num_heads, drop_path_rate)
SEGVIT_SIZES = {"t": (192, 12, 3, 0.1), "s": (384, 12, 6, 0.1), "b": (768, 12, 12, 0.1), "l": (1024, 24, 16, 0.3)}


class SegViT(nn.Module):
    """``backbone`` (a ViT) + ``decode_head`` (:class:`ATMHead` / :class:`TPNATMHead`). ``edge_weight``: weight
    of the Shrunk++ edge loss (used only when the backbone exposes ``edge_logits``)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, edge_weight: float = 1.0):
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head
        self.num_classes = decode_head.num_classes
        self.edge_weight = edge_weight

    def init_weights(self) -> None:
        for m in (self.backbone, self.decode_head):
            if hasattr(m, "init_weights"):
                m.init_weights()

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) -> class scores (B, K, H, W) (square ``H == W`` inputs; any size, the position
        embedding and the head's output are resized)."""
        out = self.decode_head(self.backbone(img))
        pred = out["pred"] if isinstance(out, dict) else out
        return F.interpolate(pred, size=img.shape[2:], mode="bilinear", align_corners=False)

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict:
        """Weighted losses (ATM losses, ``acc_seg``, and ``loss_edge`` for Shrunk++). label (B, H, W) int."""
        out = self.decode_head(self.backbone(img))
        if not isinstance(out, dict):
            raise RuntimeError("forward_train needs the model in training mode (model.train())")
        losses = self.decode_head.losses(out, label)
        edge_logits = getattr(self.backbone, "edge_logits", None)
        if edge_logits is not None:
            lab = label.squeeze(1) if label.dim() == 4 else label
            tgt = edge_targets(lab, self.backbone.patch_size, self.decode_head.ignore_index)
            losses["loss_edge"] = self.edge_weight * edge_loss(edge_logits, tgt)
        return losses

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None):
        if label is not None:
            return self.forward_train(img, label)
        return self.encode_decode(img)

    @torch.no_grad()
    def slide_inference(self, img: torch.Tensor, crop_size: int | tuple[int, int],
                        stride: int | tuple[int, int]) -> torch.Tensor:
        """mmseg's sliding-window inference: overlapping ``crop_size`` crops every ``stride`` (the last one
        flush with the border), scores averaged where crops overlap. -> (B, K, H, W). The configs use
        crop 512 / stride 341 (ViT-B) and 640 / 608 (ViT-L)."""
        h_crop, w_crop = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        h_stride, w_stride = (stride, stride) if isinstance(stride, int) else stride
        B, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((B, self.num_classes, h_img, w_img))
        count = img.new_zeros((B, 1, h_img, w_img))
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * h_stride + h_crop, h_img), min(wi * w_stride + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                preds[:, :, y1:y2, x1:x2] += self.encode_decode(img[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    @torch.no_grad()
    def predict(self, img: torch.Tensor, crop_size=None, stride=None) -> torch.Tensor:
        """Label map (B, H, W) int64: argmax of the softmaxed scores (whole image, or sliding windows when
        ``crop_size`` / ``stride`` are given)."""
        if crop_size is not None:
            scores = self.slide_inference(img, crop_size, stride if stride is not None else crop_size)
        else:
            scores = self.encode_decode(img)
        return scores.softmax(dim=1).argmax(dim=1)


def _build(size: str, num_classes: int, img_size: int, structure: str, out_indices=None, shrink_idx=None,
           edge_ratio: float = 0.1, head_layers: int = 3, head_dims=None, head_heads=None, drop_path_rate=None,
           init: bool = True, **vit_kwargs) -> SegViT:
    if size not in SEGVIT_SIZES:
        raise ValueError(f"unknown SegViT size {size!r}; choose from {sorted(SEGVIT_SIZES)}")
    dim, depth, heads, dpr = SEGVIT_SIZES[size]
    dpr = dpr if drop_path_rate is None else drop_path_rate
    vit = dict(img_size=(img_size, img_size), patch_size=16, embed_dims=dim, num_layers=depth, num_heads=heads,
               drop_path_rate=dpr, with_cls_token=False, final_norm=False, norm_eps=1e-6)
    vit.update(vit_kwargs)
    dim, depth = vit["embed_dims"], vit["num_layers"]
    head_dim = head_dims or dim // 2
    head_heads = head_heads or max(head_dim // 32, 1)
    if structure == "plain":
        if out_indices is None:
            out_indices = [5, 7, 11] if depth == 12 else [depth // 3 - 1, 2 * depth // 3 - 1, depth - 1]
        backbone = VisionTransformer(out_indices=out_indices, **vit)
        head = ATMHead(img_size, dim, embed_dims=head_dim, num_layers=head_layers, num_heads=head_heads,
                       use_stages=len(out_indices), num_classes=num_classes)
    elif structure in ("shrunk", "shrunk++"):
        shrink_idx = depth // 3 if shrink_idx is None else shrink_idx
        out_indices = [shrink_idx - 1, depth - 1] if out_indices is None else out_indices
        if structure == "shrunk":
            backbone = ViTShrink(shrink_idx=shrink_idx, out_indices=out_indices, **vit)
            head = TPNATMHead(img_size, dim, embed_dims=head_dim, num_layers=head_layers, num_heads=head_heads,
                              use_stages=len(out_indices), num_classes=num_classes)
        else:
            backbone = ViTShrunkPlus(shrink_idx=shrink_idx, edge_ratio=edge_ratio, out_indices=out_indices, **vit)
            head = ATMHead(img_size, dim, embed_dims=head_dim, num_layers=head_layers, num_heads=head_heads,
                           use_stages=len(out_indices), num_classes=num_classes)
    else:
        raise ValueError(f"structure must be 'plain', 'shrunk' or 'shrunk++', got {structure!r}")
    model = SegViT(backbone, head)
    if init:
        model.init_weights()
    return model


def segvit_vit_t(num_classes: int = 150, img_size: int = 512, structure: str = "plain", **kw) -> SegViT:
    """ViT-T (192 wide, 12 layers, 3 heads) + ATM head (96, 3 heads). Our size (no official T config)."""
    return _build("t", num_classes, img_size, structure, **kw)


def segvit_vit_s(num_classes: int = 150, img_size: int = 512, structure: str = "plain", **kw) -> SegViT:
    """ViT-S (384, 12 layers, 6 heads) + ATM head (192, 6 heads). Our size (no official S config)."""
    return _build("s", num_classes, img_size, structure, **kw)


def segvit_vit_b(num_classes: int = 150, img_size: int = 512, structure: str = "plain", **kw) -> SegViT:
    """ViT-B (768, 12, 12) + ATM head (384, 12 heads), ``out_indices`` [5, 7, 11]: the official ``seg_vit-b16``."""
    return _build("b", num_classes, img_size, structure, **kw)


def segvit_vit_l(num_classes: int = 150, img_size: int = 640, structure: str = "plain", **kw) -> SegViT:
    """ViT-L (1024, 24, 16) + ATM head (512, 16 heads), ``out_indices`` [7, 15, 23] (official ADE20K 640 config);
    ``structure="shrunk"``: the official Shrunk config (``shrink_idx=8``, [7, 23], ``TPNATMHead``)."""
    return _build("l", num_classes, img_size, structure, **kw)


def build_segvit(size: str = "b", num_classes: int = 150, img_size: int = 512, structure: str = "plain",
                 **kw) -> SegViT:
    """``build_segvit("b" | "l" | "s" | "t", num_classes, img_size, structure)``: one entry point for benches.
    Extra keywords: ``out_indices``, ``shrink_idx``, ``edge_ratio``, ``head_layers``, ``head_dims``,
    ``head_heads``, ``drop_path_rate``,
    ``init``, and the ViT's own (``num_layers``, ``embed_dims`` ... override the size's)."""
    return _build(size, num_classes, img_size, structure, **kw)


def load_segvit_checkpoint(model: SegViT, checkpoint, strict: bool = True) -> dict:
    """Load an official SegViT (mmseg) checkpoint — a path, ``{"state_dict": ...}`` / ``{"model": ...}`` or the
    flat dict — into ``model``. The names are the official ones, so no key is renamed; a DDP ``module.`` prefix
    is dropped. ``strict``: raise :class:`~fastseg.models.CheckpointMismatchError` naming the missing /
    unexpected / shape-mismatched keys (else load what fits and return them). Returns
    ``{"loaded", "missing", "unexpected", "mismatched"}``."""
    from .checkpoints import CheckpointMismatchError, read_checkpoint

    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in read_checkpoint(checkpoint).items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(
            f"SegViT checkpoint does not fit: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}), {len(mismatched)} shape mismatches (e.g. {mismatched[:2]})",
            missing, unexpected, mismatched)
    bad = {m[0] for m in mismatched}
    fit = {k: v for k, v in sd.items() if k in own and k not in bad}
    model.load_state_dict(fit, strict=False)
    return {"loaded": list(fit), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}
