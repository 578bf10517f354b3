"""Where ECENet's head spends its training step: forward time and bytes saved for backward, per part.

    python benchmarks/ecenet_breakdown.py [--B 1] [--size 512] [--C 256] [--K 150] [--device cpu]

The head (:class:`fastseg.models.ECENetHead`, MSCAN-T stage widths) runs on random stage features of a
size×size image with ADE-like labels (:func:`fastseg.bench.ops.ecenet.ecenet_labels`). Saved bytes are counted
with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once) and attributed to the innermost part
running; forward times by module hooks (CUDA: synchronised). Prints a table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--C", type=int, default=256)
    ap.add_argument("--K", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from fastseg.bench.ops.ecenet import MSCAN_DIMS, ecenet_labels
    from fastseg.models import ECENetHead

    dev = torch.device(args.device)
    torch.manual_seed(0)
    dims = MSCAN_DIMS["t"]
    head = ECENetHead(in_channels=dims, channels=args.C, num_classes=args.K).to(dev).train()
    g = torch.Generator(device=dev).manual_seed(0)
    feats = [torch.randn(args.B, c, args.size // 2 ** (i + 2), args.size // 2 ** (i + 2), device=dev, generator=g)
             for i, c in enumerate(dims)]
    labels = ecenet_labels(args.B, args.size, args.size, args.K, g, dev)

    parts = {"FR (layer_slcts + norms)": [*head.layer_slcts, *head.norms], "laterals": list(head.laterals),
             "ECE (learner, token_emb)": [head.learner, *head.token_emb],
             "SAU updater (gated_tokens)": list(head.gated_tokens),
             "ghost upsampling": list(head.ghost_up_layers), "proj (3x3 ConvModule)": [head.proj],
             "conv_seg + dropout": [head.conv_seg] + ([head.dropout] if head.dropout is not None else [])}
    for i, t in enumerate(head.transfer):
        stride = 2 ** (i + 2)
        parts[f"SAU attention, stride {stride}"] = [t.cross_attn]
        parts[f"SAU MLP + norms, stride {stride}"] = [t.mlp, t.norm_low, t.norm_high, t.norm_mlp]
    stack, saved, fwd_t, seen = ["other (fusion, resizes, sums)"], defaultdict(int), defaultdict(float), set()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for name, mods in parts.items():
        for m in mods:
            def pre(_m, _i, name=name):
                sync()
                stack.append(name)
                fwd_t[name] -= time.perf_counter()

            def post(_m, _i, _o, name=name):
                sync()
                fwd_t[name] += time.perf_counter()
                stack.pop()
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            saved[stack[-1]] += t.untyped_storage().nbytes()
        return t

    def step(record: bool):
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack if record else (lambda t: t), lambda t: t):
            sync()
            t0 = time.perf_counter()
            out = head(feats)
            stack.append("losses (CE, focal + dice, diversity)")
            t1 = time.perf_counter()
            losses = head.losses(out, labels)
            sync()
            fwd_t["losses (CE, focal + dice, diversity)"] += time.perf_counter() - t1
            stack.pop()
            total = sum(losses.values())
            sync()
            t2 = time.perf_counter()
        total.backward()
        sync()
        return t2 - t0, time.perf_counter() - t2

    step(False)  # warm-up
    saved.clear()
    fwd_t.clear()
    f, b = step(True)
    tot_saved = sum(saved.values())
    print(f"ECENet head, MSCAN-T widths, B={args.B} {args.size}x{args.size} C={args.C} K={args.K} on {dev}")
    print(f"{'part':42s} {'fwd ms':>9s} {'saved MiB':>10s} {'saved %':>8s}")
    names = list(parts) + ["losses (CE, focal + dice, diversity)", "other (fusion, resizes, sums)"]
    for name in names:
        t = fwd_t.get(name)
        print(f"{name:42s} {'' if t is None else f'{t * 1e3:9.1f}':>9s} {saved[name] / 2**20:10.1f} "
              f"{100 * saved[name] / max(tot_saved, 1):7.1f}%")
    print(f"{'total':42s} {f * 1e3:9.1f} {tot_saved / 2**20:10.1f}   (backward {b * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
