"""Where the time of the fused masked attention goes (CUDA): per-kernel GPU time from the profiler,
CPU-inclusive time (do_bench) and GPU-only time (CUDA-graph replay) of the op.

    cd benchmarks && python profile_masked_attention.py
"""
import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench, do_bench_cudagraph

from fastseg import ops

from fastseg.bench.ops.masked_attention import blob_mask


def main():
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for B, Q, h, w, dt, dens in [(2, 200, 128, 256, torch.float16, 0.3), (2, 200, 128, 256, torch.float16, None),
                                 (8, 100, 64, 64, torch.float16, 0.3)]:
        H, D, L = 8, 32, h * w
        q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
                   for n in (Q, L, L))
        packed = None
        if dens is not None:
            allowed = blob_mask(B, Q, h, w, dens, gen, torch.device(dev))
            packed = ops.pack_mask(allowed.unsqueeze(1), batch=B, heads=H, num_queries=Q, num_keys=L)
        fwd = lambda: ops.masked_attention(q, k, v, packed)  # noqa: E731
        out = fwd()
        g = torch.randn_like(out)

        def fwdbwd():
            torch.autograd.grad(ops.masked_attention(q, k, v, packed), (q, k, v), g)

        fwdbwd()
        with torch.no_grad():
            t_fwd, t_fwd_graph = do_bench(fwd, return_mode="median"), do_bench_cudagraph(fwd, return_mode="median")
        t_fb = do_bench(fwdbwd, return_mode="median")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwdbwd()
            torch.cuda.synchronize()
        flops = 4 * B * H * Q * L * D
        print(f"\n== B={B} Q={Q} L={L} {dt} density={dens}: fwd {t_fwd:.3f} ms (GPU only, graph: {t_fwd_graph:.3f} ms, "
              f"{flops / t_fwd_graph / 1e9:.0f} TFLOP/s), fwd+bwd {t_fb:.3f} ms", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
