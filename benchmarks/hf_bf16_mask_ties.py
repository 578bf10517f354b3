"""Hugging Face Mask2Former under bf16 autocast, patched (masks packed from the embeddings) vs unpatched, both
against the fp32 unpatched model: relative L2 differences of the class and mask logits (eval, one batch).

    python benchmarks/hf_bf16_mask_ties.py [--device cpu|cuda] [--seed 0]

Hugging Face thresholds ``sigmoid(logit) < 0.5`` in bf16, where ``sigmoid`` rounds to 0.5 for |logit| below
about 4e-3 (such pixels are allowed whatever their sign); the patch tests the sign of the dot product
accumulated in fp32. The tiny random-init model of tests/hf_models.py has small logits, so many pixels sit in
that band: this shows how far each bf16 model moves from fp32 there (docs/models.md).
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fastseg  # noqa: E402
from hf_models import tiny_hf_mask2former  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = tiny_hf_mask2former().eval().to(args.device)
    ref = copy.deepcopy(model)
    fastseg.patch(model, ops="masked_attention")
    torch.manual_seed(args.seed)
    x = torch.randn(2, 3, 64, 64, device=args.device)
    with torch.no_grad():
        fp32 = ref(pixel_values=x)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            hf, patched = ref(pixel_values=x), model(pixel_values=x)
    print(f"median |mask logit| (fp32): {fp32.masks_queries_logits.abs().median().item():.3g}")
    for key in ("class_queries_logits", "masks_queries_logits"):
        rel = lambda a: ((a[key].float() - fp32[key]).norm() / fp32[key].norm()).item()  # noqa: E731
        print(f"{key}: HF bf16 vs fp32 {rel(hf):.3g}, patched bf16 vs fp32 {rel(patched):.3g}")


if __name__ == "__main__":
    main()
