"""Where the time of the fused masked attention goes (CUDA): pack, forward, backward, whole module.

    python benchmarks/profile_masked_attention.py
"""
import torch
from triton.testing import do_bench

from fastseg import ops
from fastseg.kernels import masked_attention as K

from bench_masked_attention import coherent_mask


def main():
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for B, Q, h, w, dt in [(2, 200, 128, 256, torch.float16), (8, 100, 64, 64, torch.float16)]:
        H, D, L = 8, 32, h * w
        q = torch.randn(B, Q, H, D, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(B, L, H, D, device=dev, dtype=dt).transpose(1, 2)
        v = torch.randn(B, L, H, D, device=dev, dtype=dt).transpose(1, 2)
        for dens in (0.05, 0.3, 1.0):
            allowed = coherent_mask(B, Q, h, w, dens, dev, gen)
            masked_rep = (~allowed).unsqueeze(1).expand(B, H, Q, L).contiguous()
            t_pack = do_bench(lambda: ops.pack_mask(masked_rep, batch=B, heads=H, num_queries=Q, num_keys=L, masked=True), return_mode="median")
            packed = ops.pack_mask(allowed.unsqueeze(1), batch=B, heads=H, num_queries=Q, num_keys=L)
            bits = packed.bits
            t_fwd = do_bench(lambda: K.forward(q, k, v, bits, D ** -0.5), return_mode="median")
            o, lse, blocks, counts = K.forward(q, k, v, bits, D ** -0.5)
            do = torch.randn_like(o)
            t_bwd = do_bench(lambda: K.backward(do, q, k, v, o, lse, bits, blocks, counts, D ** -0.5), return_mode="median")
            t_nomask = do_bench(lambda: K.forward(q, k, v, None, D ** -0.5), return_mode="median")
            t_lists = do_bench(lambda: K.tile_lists(bits, Q, L), return_mode="median")
            nonempty = counts.sum().item() / counts.numel() / blocks.shape[-1]
            sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1)), return_mode="median")
            sdpa_nomask = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), return_mode="median")
            flops = 4 * B * H * Q * L * D
            print(f"B={B} Q={Q} L={L} {dt} dens={dens}: tiles non-empty {nonempty:.2f} (lists {t_lists:.3f} ms) | "
                  f"pack(per-head bool) {t_pack:.3f} ms | fwd {t_fwd:.3f} "
                  f"({flops / t_fwd / 1e9:.0f} TFLOP/s dense-equiv) | fwd no mask {t_nomask:.3f} | bwd {t_bwd:.3f} | "
                  f"sdpa fwd {sdpa:.3f} (no mask {sdpa_nomask:.3f})", flush=True)


if __name__ == "__main__":
    main()
