"""CPU (Python) overhead of one masked-attention forward+backward at a small shape: cProfile top entries.

    cd benchmarks && python cpu_overhead_masked_attention.py
"""
import cProfile
import pstats
import time

import torch

from fastseg import ops


def main():
    dev = "cuda"
    B, H, Q, L, D = 8, 8, 100, 4096, 32
    q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=torch.float16).transpose(1, 2).requires_grad_()
               for n in (Q, L, L))
    allowed = torch.rand(B, 1, Q, L, device=dev) < 0.3
    packed = ops.pack_mask(allowed, batch=B, heads=H, num_queries=Q, num_keys=L)
    g = torch.randn(B, H, Q, D, device=dev, dtype=torch.float16)

    def step():
        torch.autograd.grad(ops.masked_attention(q, k, v, packed), (q, k, v), g)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    cpu = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    print(f"per fwd+bwd: CPU issue {cpu * 1e3:.3f} ms, wall {wall * 1e3:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
