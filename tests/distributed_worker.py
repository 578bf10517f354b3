"""Worker processes for tests/test_distributed.py (2 CPU ranks, gloo on 127.0.0.1).

Kept free of a top-level ``fastseg`` import: each worker sets ``TRITON_INTERPRET`` first (the interpreter
state is frozen when fastseg is imported), so a run takes either the CPU torch path or the interpreter.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import warnings

import torch

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrap(model, wrap: str):
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard
        return fully_shard(model)
    raise ValueError(wrap)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 keeps DTensor shards


def worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1" if cfg["interpret"] else "0"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    import fastseg
    from fastseg.bench import convergence as cv

    dtype = getattr(torch, cfg["dtype"])
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)  # NMF2D draws its bases with torch.rand in the default dtype
    image_size, batch, _ = cv.SIZES["ci"][cfg["model"]]
    result = {"interpreter": fastseg._backend.interpreter_enabled()}
    for patched in (False, True):
        model = cv.build(cfg["model"], seed=0).to(dtype).train()  # same initial weights on every rank
        if patched:
            model, report = fastseg.patch(model)
            result["replaced"] = report.count()
        model = _wrap(model, cfg["wrap"])
        opt = torch.optim.SGD(model.parameters(), lr=cfg.get("lr", 0.05))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        fastseg.launches.clear()
        grads, losses = [], []
        for step in range(cfg["steps"]):
            images, labels = cv.synthetic_batch(batch, image_size, 4, g, dtype)
            torch.manual_seed(1000 * step + rank)
            loss = cv.loss_fn(cfg["model"], model, images, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads.append({n: _full(p.grad).detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None})
            losses.append(loss.item())
            opt.step()
        result["patched" if patched else "reference"] = {
            "grads": grads, "losses": losses, "launches": sum(fastseg.launches.values()),
            "params": {n: _full(p).detach().clone() for n, p in model.named_parameters()}}
    dist.barrier()  # every rank finished
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(cfg: dict, out_dir: str, world: int = 2) -> list[dict]:
    """Spawn ``world`` ranks running ``cfg``; returns each rank's result. Bounded by TIMEOUT_S."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, free_port(), cfg, out_dir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run {cfg} did not finish in {TIMEOUT_S} s")
    except mp.ProcessExitedException as e:
        # a crash during gloo's teardown, after every rank wrote its result past the final barrier
        files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
        if e.signal_name is None or not all(os.path.exists(f) for f in files):
            raise
        warnings.warn(f"a rank exited with {e.signal_name} after the run finished: {e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
