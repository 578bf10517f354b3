"""The headline GPU check: GPU tests + the headline benchmark table in one command under a global time budget.

``python -m fastseg.bench.headline [--dry-run] [--out DIR] [--budget S] [--only a,b] [--skip a,b] [--list]``
(``benchmarks/gpu_check.sh`` installs the project and calls this). Each entry of :data:`STEPS` runs in its own
subprocess under its own time limit (so a stuck compile costs one step, not the call); a bench step appends
its rows to ``rows.jsonl`` after every case, and each case also has a SIGALRM limit. Failures, OOM and
timeouts become rows. At the end: ``headline.csv`` / ``headline.json`` (every row + environment + steps +
Triton cache report), ``headline.png``, and the summary table with the targets, printed last.

``--dry-run`` (or a machine without CUDA) runs every step at tiny shapes on the CPU: benchmarks through the
PyTorch path, the GPU tests under the Triton interpreter, the other kernel tests collected only, so a
broken step shows before GPU time is spent. To add an op (e.g. MSDeformAttn), append a :class:`Step` (and
its :class:`Target` rows) to :data:`STEPS` / :data:`TARGETS`; a step whose op is not registered yet gives
one ``unavailable`` row.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["Step", "Target", "STEPS", "TARGETS", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Step:
    """One entry of the check. ``kind`` "bench": ``op`` at ``shapes`` (``dry_shapes`` in a dry run), bf16,
    ``modes``, ``impls`` (compiled baselines are run after all the others, so a slow compile only loses its own
    rows). ``kind`` "pytest": ``args`` (``dry_args`` in a dry run; ``None`` = skipped there). ``env``: set in
    the step's process (a step with an ``env`` runs in a process of its own in a dry run too). ``rename``:
    registry impl name -> the impl name of its rows (a renamed row is a baseline, never its group's fastseg
    row); ``group``: the step whose rows these rows join for the ratios and the table (e.g. the same kernels
    under another ``env``: an A/B in two processes)."""

    name: str
    kind: str
    limit_s: int
    what: str
    op: str = ""
    shapes: list = field(default_factory=list)
    dry_shapes: list = field(default_factory=list)
    impls: tuple | None = None
    modes: tuple = ("fwd", "fwdbwd")
    case_limit_s: int = 90
    args: list = field(default_factory=list)
    dry_args: list | None = None
    env: dict = field(default_factory=dict)
    rename: dict = field(default_factory=dict)
    group: str = ""

    def row_impl(self, impl: str) -> str:
        return self.rename.get(impl, impl)


COMPILED = ("flex", "compile")  # baselines whose first call compiles (run last within a step)
_TEST_ENV = {"FASTSEG_AUTOTUNE": "0"}  # one kernel config per shape: autotuning every test shape would not fit

STEPS: list[Step] = [
    Step("gpu-tests", "pytest", 110, "fused kernels vs fp64 references, fp32/bf16/fp16, fwd + every gradient, "
         "poisoned allocator", args=["tests/gpu"], dry_args=["tests/gpu"], env=_TEST_ENV),
    Step("masked-attention", "bench", 150, "one Mask2Former cross-attention layer vs MHA / SDPA / Flex / compile",
         op="masked-attention",
         shapes=[{"B": 2, "Q": 200, "H": 128, "W": 256, "density": 0.3},   # 1024x2048 input, stride 8
                 {"B": 8, "Q": 100, "H": 64, "W": 64, "density": 0.3}],    # 512x512 input, stride 8
         dry_shapes=[{"B": 1, "Q": 12, "H": 8, "W": 8, "density": 0.3}],
         impls=("fastseg", "eager", "sdpa", "flex", "compile")),
    Step("msca", "bench", 80, "MSCA at MSCAN-T stage 1 and MSCAN-B stage 3 (512x512, batch 16)", op="msca",
         shapes=[{"B": 16, "C": 32, "H": 128, "W": 128}, {"B": 16, "C": 320, "H": 32, "W": 32}],
         dry_shapes=[{"B": 1, "C": 8, "H": 12, "W": 12}],
         impls=("fastseg", "fastseg-cl", "eager", "eager-cl", "compile"), env={"FASTSEG_MSCA_FUSED": "1"}),
    # ---- the MSCA A/B steps run right after the msca step (their rows join its group)
    # MSCA unfused at MSCAN-T stage 1, rows joining the msca step's (their ratio is the fused/unfused A/B).
    # ~15 s: start 6 s; the unfused kernels' 16 autotune configs (dw fwd, pw fwd / bwd, w3 bwd, dw bwd)
    # compile in 9.6 s if the msca step's C=320 rows (the same kernels) did not already; autotuning + 2 cases
    # ~2 s.
    Step("msca-unfused", "bench", 25, "MSCA at MSCAN-T stage 1 with FASTSEG_MSCA_FUSED=0 (the unfused kernels) "
         "as row fastseg-unfused next to the msca step's fastseg row (=1): the fused / unfused A/B",
         op="msca", shapes=[{"B": 16, "C": 32, "H": 128, "W": 128}], dry_shapes=[{"B": 1, "C": 8, "H": 12, "W": 12}],
         impls=("fastseg",), rename={"fastseg": "fastseg-unfused"}, group="msca", case_limit_s=20,
         env={"FASTSEG_MSCA_FUSED": "0"}),
    # The other two MSCA backwards at the same shape, rows joining the msca step's (default: the two-pass
    # backward, 2.81x the strict minimum bytes, benchmarks/results/notes/msca_bytes.md): the split backward
    # (FASTSEG_MSCA_TWOPASS=0, 3.15x, robust to L2 misses) and the opt-in one-kernel backward
    # (FASTSEG_MSCA_FUSED_BWD=1: 1.52x if its re-reads hit L2, up to 6.1x if not). No targets: decision rows.
    # ~12 s each: start 6 s; 4-5 kernels compile in ~5 s; 2 cases ~1 s.
    Step("msca-split-bwd", "bench", 25, "MSCA at MSCAN-T stage 1 with FASTSEG_MSCA_TWOPASS=0 (the split "
         "backward) as row fastseg-split-bwd next to the msca step's fastseg row (two-pass backward)",
         op="msca", shapes=[{"B": 16, "C": 32, "H": 128, "W": 128}], dry_shapes=[{"B": 1, "C": 8, "H": 12, "W": 12}],
         impls=("fastseg",), rename={"fastseg": "fastseg-split-bwd"}, group="msca", case_limit_s=20,
         env={"FASTSEG_MSCA_FUSED": "1", "FASTSEG_MSCA_TWOPASS": "0"}),
    Step("msca-fused-bwd", "bench", 25, "MSCA at MSCAN-T stage 1 with FASTSEG_MSCA_FUSED_BWD=1 (the one-kernel "
         "backward) as row fastseg-fused-bwd next to the msca step's fastseg row (two-pass backward)",
         op="msca", shapes=[{"B": 16, "C": 32, "H": 128, "W": 128}], dry_shapes=[{"B": 1, "C": 8, "H": 12, "W": 12}],
         impls=("fastseg",), rename={"fastseg": "fastseg-fused-bwd"}, group="msca", case_limit_s=20,
         env={"FASTSEG_MSCA_FUSED": "1", "FASTSEG_MSCA_FUSED_BWD": "1"}),
    Step("context-cluster", "bench", 50, "context cluster at coc_tiny stage 1 (224x224, batch 128)",
         op="context-cluster",
         shapes=[{"B": 128, "dim": 32, "H": 56, "W": 56, "proposal": 2, "fold": 8, "heads": 4, "head_dim": 24}],
         dry_shapes=[{"B": 1, "dim": 8, "H": 8, "W": 8, "proposal": 2, "fold": 2, "heads": 2, "head_dim": 8}],
         impls=("fastseg", "eager", "compile")),
    Step("mask2former-decoder", "bench", 70, "Mask2Former decoder training step (9 layers, criterion)",
         op="mask2former-decoder", modes=("fwdbwd",), case_limit_s=60,
         shapes=[{"B": 2, "Q": 200, "H": 1024, "W": 2048}, {"B": 2, "Q": 100, "H": 1024, "W": 2048},
                 {"B": 8, "Q": 100, "H": 512, "W": 512}, {"B": 8, "Q": 200, "H": 512, "W": 512}],
         dry_shapes=[{"B": 1, "Q": 4, "H": 32, "W": 32}], impls=("fastseg", "reference")),
    Step("mscan", "bench", 30, "MSCAN-T training step (512x512, batch 16)", op="mscan", modes=("fwdbwd",),
         shapes=[{"model": "t", "B": 16, "H": 512, "W": 512}], dry_shapes=[{"model": "t", "B": 2, "H": 32, "W": 32}],
         impls=("fastseg", "fastseg-all", "eager")),
    Step("coc", "bench", 30, "coc_tiny training step (224x224, batch 128)", op="coc", modes=("fwdbwd",),
         shapes=[{"model": "tiny", "B": 128, "H": 224, "W": 224}],
         dry_shapes=[{"model": "tiny", "B": 1, "H": 32, "W": 32}], impls=("fastseg", "eager")),
    Step("ms-deform-attn", "bench", 60, "multi-scale deformable attention core (Mask2Former encoder: strides "
         "8/16/32, 8 heads, 4 points, D=32) vs the grid_sample path and its torch.compile", op="ms-deform-attn",
         shapes=[{"B": 2, "H": 1024, "W": 2048}, {"B": 8, "H": 512, "W": 512}],
         dry_shapes=[{"B": 1, "H": 64, "W": 64, "heads": 2, "D": 8, "points": 2}],
         impls=("fastseg", "eager", "compile")),
    Step("cac", "bench", 40, "CAC context-aware classifier (decoder features -> logits; training: oracle, "
         "distillation, upsampled CEs), ADE20K 512x512 batch 16 and COCO-Stuff 1024x2048 batch 2", op="cac",
         shapes=[{"B": 16, "C": 512, "K": 150, "H": 64, "W": 64, "stride": 8},
                 {"B": 2, "C": 512, "K": 171, "H": 128, "W": 256, "stride": 8}],
         dry_shapes=[{"B": 1, "C": 8, "K": 5, "H": 4, "W": 4, "stride": 2}], impls=("fastseg", "eager", "compile")),
    Step("kernel-tests", "pytest", 100, "every kernel test file on the GPU (fp32, odd shapes), poisoned allocator",
         args=["-p", "poison", "tests/test_masked_attention.py", "tests/test_attention_mask.py",
               "tests/test_msca.py", "tests/test_mlp_dwconv.py", "tests/test_context_cluster.py",
               "tests/test_ms_deform_attn.py"],
         dry_args=["--collect-only", "-p", "poison", "tests/test_masked_attention.py", "tests/test_attention_mask.py",
                   "tests/test_msca.py", "tests/test_mlp_dwconv.py", "tests/test_context_cluster.py",
                   "tests/test_ms_deform_attn.py"],
         env={**_TEST_ENV, "PYTHONPATH": "tests/gpu"}),
    # ---- added after the headline steps, each small, so the steps above run first. GPU-second estimates
    # (H100/H200, no prebuilt Triton cache; a process start with the torch import and CUDA init is ~6 s;
    # compile times from benchmarks/prebuild_triton_cache.py for sm_90 on the project's CPU, 2026-12-02):
    # ~18 s: start 6 s; FASTSEG_AUTOTUNE=0, one config per kernel: 10 compiles (fwd with / without dropout,
    # dq, dk/dv, at both shapes) 7.4 s; 12 cases (sub-ms to few-ms ops: build + do_bench) ~4 s. With
    # autotuning it would be ~4x the compiles. No torch.compile row (Inductor alone would be ~30-60 s).
    Step("atm-attention", "bench", 30, "SegViT ATM cross-attention (output + head-mean logits), one decoder "
         "layer, ADE20K: ViT-B 384/12 at 512x512 batch 8, ViT-L 512/16 at 640x640 batch 2 (dropout 0.1 in "
         "training), vs the official layer and SDPA + logits matmul; default kernel configs",
         op="atm-attention",
         shapes=[{"B": 8, "K": 150, "H": 32, "W": 32, "C": 384, "heads": 12},
                 {"B": 2, "K": 150, "H": 40, "W": 40, "C": 512, "heads": 16}],
         dry_shapes=[{"B": 1, "K": 5, "H": 4, "W": 4, "C": 16, "heads": 2}],
         impls=("fastseg", "eager", "sdpa"), case_limit_s=20, env={"FASTSEG_AUTOTUNE": "0"}),
    # ~15 s: start 6 s; the ATM kernels mostly hit the Triton cache written by atm-attention (same env, bf16
    # under autocast, head dim 32, dropout), else ~1 s a kernel; 2 ViT-B builds ~3 s; ~20 steps of ~50 ms.
    Step("segvit", "bench", 25, "SegViT-B training step (512x512, batch 4): ATM cross-attention layers patched "
         "vs the official layers (default kernel configs)", op="segvit", modes=("fwdbwd",),
         shapes=[{"model": "b", "B": 4, "img": 512, "K": 150}],
         dry_shapes=[{"model": "t", "B": 1, "img": 64, "K": 5}], impls=("fastseg", "eager"), case_limit_s=20,
         env={"FASTSEG_AUTOTUNE": "0"}),
    # ~35 s: start 6 s; FASTSEG_AUTOTUNE=0: fused attention with dropout (fwd, dq, dk/dv), mask loss fwd / bwd,
    # matcher costs, ~10 compiles at ~1 s; 4 model builds ~5 s; ~9 training steps a case (warm-up, do_bench's
    # 5-run estimate + 1-2 reps, the memory run) of ~0.1-0.5 s, ~10 s.
    Step("maskformer", "bench", 55, "MaskFormer head training step (R50-shaped features, 6 decoder layers, "
         "Hungarian matcher, full-resolution focal + dice on every layer): Cityscapes 1024x2048 Q=100 B=2 and "
         "ADE20K 512x512 B=8, set_fused(True) vs the reference (default kernel configs)",
         op="maskformer", modes=("fwdbwd",), case_limit_s=30,
         shapes=[{"B": 2, "Q": 100, "H": 1024, "W": 2048, "T": 30, "K": 19},
                 {"B": 8, "Q": 100, "H": 512, "W": 512, "T": 20, "K": 150}],
         dry_shapes=[{"B": 1, "Q": 8, "H": 32, "W": 32, "T": 2, "K": 5}], impls=("fastseg", "reference"),
         env={"FASTSEG_AUTOTUNE": "0"}),
]


@dataclass
class Target:
    """A headline target: ``metric`` ("speedup" = t_baseline / t_fastseg, "mem" = peak_baseline / peak_fastseg)
    of ``baseline`` over fastseg, at least ``at_least``, for ``op`` rows in ``mode`` whose shape label contains
    ``shape`` (empty: every shape)."""

    text: str
    op: str
    baseline: str
    metric: str
    at_least: float
    mode: str = "fwdbwd"
    shape: str = ""


TARGETS: list[Target] = [
    Target("masked attention fwd+bwd >= 4x eager", "masked-attention", "eager", "speedup", 4),
    Target("masked attention fwd+bwd >= 2x SDPA (bool mask)", "masked-attention", "sdpa", "speedup", 2),
    Target("masked attention fwd+bwd >= 3x Flex (BlockMask counted)", "masked-attention", "flex", "speedup", 3),
    Target("masked attention peak memory <= 1/5 of eager", "masked-attention", "eager", "mem", 5),
    Target("MSCA fwd+bwd >= 3x eager", "msca", "eager", "speedup", 3),
    Target("MSCA fwd+bwd >= 1.5x torch.compile", "msca", "compile", "speedup", 1.5),
    Target("MSCA fwd >= 3x eager", "msca", "eager", "speedup", 3, mode="fwd"),
    Target("MSCA fwd >= 1.5x torch.compile", "msca", "compile", "speedup", 1.5, mode="fwd"),
    Target("context cluster fwd+bwd >= 8x eager", "context-cluster", "eager", "speedup", 8),
    Target("context cluster fwd+bwd >= 2x torch.compile", "context-cluster", "compile", "speedup", 2),
    Target("context cluster peak memory <= 1/10 of eager", "context-cluster", "eager", "mem", 10),
    Target("decoder training step >= 1.5x at 1024x2048", "mask2former-decoder", "reference", "speedup", 1.5,
           shape="1024x2048"),
    Target("decoder training step <= 1/2 memory at 1024x2048", "mask2former-decoder", "reference", "mem", 2,
           shape="1024x2048"),
    Target("MSDeformAttn fwd+bwd >= 5x the grid_sample path", "ms-deform-attn", "eager", "speedup", 5),
    Target("MSDeformAttn peak memory <= 1/4 of the grid_sample path", "ms-deform-attn", "eager", "mem", 4),
    # issue 16's targets (training step at 1024x2048 Q=100 B=2 and 512x512 B=8)
    Target("MaskFormer training step peak memory <= 1/3 of the reference", "maskformer", "reference", "mem", 3),
    Target("MaskFormer training step at least as fast as the reference", "maskformer", "reference", "speedup", 1),
    # issues 12 / 17 / 18 set no number for these: 1x = the fused path is not slower (not larger) than the one
    # it replaces
    Target("MSCA fused kernels fwd+bwd >= 1x the unfused (FASTSEG_MSCA_FUSED=0; no issue number)", "msca",
           "fastseg-unfused", "speedup", 1),
    Target("MSCA fused kernels fwd >= 1x the unfused (FASTSEG_MSCA_FUSED=0; no issue number)", "msca",
           "fastseg-unfused", "speedup", 1, mode="fwd"),
    Target("ATM attention fwd+bwd >= 1x the official layer (no issue number)", "atm-attention", "eager",
           "speedup", 1),
    Target("ATM attention peak memory <= the official layer's (no issue number)", "atm-attention", "eager",
           "mem", 1),
    Target("CAC classifier training step >= 1x the reference block (no issue number)", "cac", "eager",
           "speedup", 1),
    Target("CAC classifier training step peak memory <= the reference's (no issue number)", "cac", "eager",
           "mem", 1),
]


# ------------------------------------------------------------------------------------------------ child side
def _alarm(seconds: int):
    def handler(signum, frame):
        raise TimeoutError(f"case time limit ({seconds} s) reached")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def _row(spec, shape, dtype, mode, impl, m, device, backend, step: Step, kernels: str = "") -> dict:
    from .registry import DTYPE_NAMES

    status = m.status
    if status == "error" and m.note.startswith("TimeoutError"):
        status = "timeout"
    name = step.row_impl(impl.name)
    return {"op": spec.name, "shape": spec.shape_label(shape), "params": json.dumps(shape, sort_keys=True),
            "dtype": DTYPE_NAMES[dtype], "mode": mode, "impl": name, "fastseg": impl.fastseg and name == impl.name,
            "backend": backend if impl.name.startswith("fastseg") else "pytorch", "status": status,
            "time_ms": m.time_ms, "peak_bytes": m.peak_bytes,
            "peak_mib": None if m.peak_bytes is None else round(m.peak_bytes / 2**20, 3), "note": m.note,
            "device": str(device), "group": step.group or step.name, "env": _env_label(step, actual=True),
            "kernels": kernels}


def _env_label(step: Step, actual: bool = False) -> str:
    """``K=V ...`` of the step's env (``actual``: the values this process really has)."""
    return " ".join(f"{k}={os.environ.get(k) if actual else v}" for k, v in sorted(step.env.items())
                    if k != "PYTHONPATH")


def run_bench_step(step: Step, dry: bool, rows_path: str) -> int:
    """Measure every (shape, mode, impl) of ``step``; append one JSON line per case to ``rows_path``. In a dry
    run each case runs once (built, warmed up), neither timed nor memory-profiled: it checks the step works."""
    import torch

    from .triton_cache import install_listener

    if not dry:
        install_listener(step.name)

    from fastseg._backend import launches

    from .measure import Measurement, measure
    from .registry import DTYPES, all_ops
    from .runner import fastseg_backend

    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    dtype = DTYPES["fp32" if device.type == "cpu" else "bf16"]  # bf16 CPU eager is slow and not the point
    ops = all_ops()

    def emit(row):
        row["step"] = step.name
        with open(rows_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        t = "-" if row["time_ms"] is None else f"{row['time_ms']:.3f} ms"
        p = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f} MiB"
        k = f" [kernels: {row['kernels']}]" if step.env and row.get("kernels") else ""
        print(f"  {row['op']} | {row['shape']} | {row['mode']} | {row['impl']}: {row['status']} {t} {p} "
              f"{row['note'][:120]}{k}", flush=True)

    if step.op not in ops:
        emit({"op": step.op, "shape": "-", "params": "{}", "dtype": "-", "mode": "-",
              "impl": step.row_impl("fastseg"), "fastseg": not step.rename, "backend": "-", "status": "unavailable",
              "time_ms": None, "peak_bytes": None, "peak_mib": None,
              "note": f"op {step.op!r} is not registered in fastseg.bench in this build", "device": str(device),
              "group": step.group or step.name, "env": _env_label(step, actual=True), "kernels": ""})
        return 0
    spec = ops[step.op]
    backend = fastseg_backend(device)
    names = list(step.impls or [i.name for i in spec.impls])
    impls = [spec.impl(n) for n in names]
    shapes = [spec.full_shape(s) for s in (step.dry_shapes if dry else step.shapes)]
    order = [i for i in impls if i.name not in COMPILED] + [i for i in impls if i.name in COMPILED]
    for impl in order:
        for shape in shapes:
            for mode in step.modes:
                before = dict(launches)
                if impl.gpu_only and device.type != "cuda":
                    m = Measurement("skipped", note="GPU-only baseline (compiled); skipped on CPU")
                else:
                    _alarm(step.case_limit_s)
                    try:
                        m = measure(lambda: impl.prepare(shape, dtype, device, mode), device, timing=not dry,
                                    memory=not dry)
                    except TimeoutError as exc:  # raised outside measure's own try (e.g. in cleanup)
                        m = Measurement("timeout", note=f"TimeoutError: {exc}")
                    finally:
                        signal.alarm(0)
                # the fastseg kernels this case launched (fastseg.launches): which path really ran, e.g. an A/B
                ran = " ".join(sorted(k for k, n in launches.items() if n > before.get(k, 0)))
                emit(_row(spec, shape, dtype, mode, impl, m, device, backend, step, ran))
    return 0


# ----------------------------------------------------------------------------------------------- parent side
def _source_hash() -> str:
    """sha256 (first 16 hex digits) of fastseg's and the kernels' Python sources: identifies the code run even
    where the copy has no .git."""
    h = hashlib.sha256()
    for top in ("fastseg", "kernels"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(ROOT, top))):
            dirnames.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    h.update(os.path.relpath(p, ROOT).encode())
                    with open(p, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def _commit() -> str | None:
    from .env import git_commit

    return os.environ.get("FASTSEG_COMMIT") or git_commit()


def _environment(device: str) -> dict:
    import torch

    from .env import environment

    env = environment(device)
    env["commit"] = _commit()
    env["source_sha256"] = _source_hash()
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:  # noqa: BLE001
            env["driver"] = None
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    env["FASTSEG_AUTOTUNE"] = os.environ.get("FASTSEG_AUTOTUNE")
    env["TRITON_CACHE_DIR"] = os.environ.get("TRITON_CACHE_DIR")
    return env


def _cache_entries(cache_dir: str | None) -> set:
    if not cache_dir or not os.path.isdir(cache_dir):
        return set()
    return {d for d in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, d))}


def _run_in_process(step: Step, rows_path: str) -> dict:
    """A dry-run bench step in this process (saves the ~5 s import of a fresh process per step)."""
    t0 = time.time()
    try:
        run_bench_step(step, True, rows_path)
        status = "ok"
    except Exception as exc:  # noqa: BLE001
        print(f"  {step.name}: {type(exc).__name__}: {exc}", flush=True)
        status = "failed"
    return {"status": status, "rc": 0 if status == "ok" else 1, "wall_s": round(time.time() - t0, 1),
            "limit_s": None, "summary": "in process (dry run)"}


def _run_child(step: Step, dry: bool, limit: float, out_dir: str, rows_path: str, test_log: str) -> dict:
    env = dict(os.environ)
    env.update(step.env)
    env["PYTHONUNBUFFERED"] = "1"
    if dry and step.kind == "pytest":
        env["TRITON_INTERPRET"] = "1"
        env["FASTSEG_GPU_DRYRUN"] = "1"
    if step.kind == "pytest":
        args = step.dry_args if dry else step.args
        if args is None:
            return {"status": "skipped", "note": "not run in a dry run"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "triton_compile_log",
               *args]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "tests", "gpu"),
                                                           env.get("PYTHONPATH")]))
    else:
        cmd = [sys.executable, "-m", "fastseg.bench.headline", "--child", step.name, "--rows", rows_path]
        if dry:
            cmd.append("--dry-run")
    t0 = time.time()
    status, rc = "ok", None
    log = open(test_log, "a") if step.kind == "pytest" else None
    if log:
        log.write(f"\n===== {step.name}: {' '.join(cmd)}\n")
        log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tail: list[str] = []
    try:
        deadline = t0 + limit
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, limit)
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if log:
                log.write(line)
                log.flush()
            tail = (tail + [line.rstrip()])[-40:]
            if step.kind == "bench" or "passed" in line or "failed" in line or "error" in line.lower() \
                    or "[triton]" in line:
                print("  " + line.rstrip() if step.kind == "pytest" else line.rstrip(), flush=True)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if log:
            log.write(f"===== {step.name}: {status} (rc {rc}) after {time.time() - t0:.1f} s\n")
            log.close()

    summary = next((t for t in reversed(tail) if re.search(r"\d+ (passed|failed|errors?|skipped|tests? collected)", t)),
                   "")
    res = {"status": status, "rc": rc, "wall_s": round(time.time() - t0, 1), "limit_s": round(limit, 1),
           "summary": summary.strip("= ")}
    for line in tail:  # the compile listener's line (fastseg.bench.triton_cache): hits and misses of this step
        m = re.search(r"\[triton\] \S+: (\d+) compile calls: (\d+) cache hits, (\d+) misses \(([\d.]+) s", line)
        if m:
            res["triton"] = {"compile_calls": int(m[1]), "cache_hits": int(m[2]), "misses": int(m[3]),
                             "compile_s": float(m[4])}
    return res


def _load_rows(rows_path: str) -> list[dict]:
    rows = []
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return rows


def _fill_missing(step: Step, rows: list[dict], dry: bool, reason: str) -> list[dict]:
    """Rows for the cases of a bench step that never reported (its process timed out, crashed or never ran)."""
    try:
        from .registry import all_ops

        spec = all_ops().get(step.op)
    except Exception:  # noqa: BLE001
        spec = None
    have = {(r["shape"], r["mode"], r["impl"]) for r in rows if r.get("step") == step.name}
    out = []
    if spec is None:
        return out
    for s in (step.dry_shapes if dry else step.shapes):
        label = spec.shape_label(spec.full_shape(s))
        for mode in step.modes:
            for impl in (step.impls or [i.name for i in spec.impls]):
                name = step.row_impl(impl)
                if (label, mode, name) not in have:
                    out.append({"step": step.name, "op": step.op, "shape": label,
                                "params": json.dumps(spec.full_shape(s), sort_keys=True), "dtype": "bf16",
                                "mode": mode, "impl": name, "fastseg": name == "fastseg", "backend": "-",
                                "status": reason, "time_ms": None, "peak_bytes": None, "peak_mib": None,
                                "note": f"step {step.name} {reason} before this case", "device": "-",
                                "group": step.group or step.name, "env": _env_label(step), "kernels": ""})
    return out


def add_ratios(rows: list[dict]) -> None:
    """speedup / mem_ratio of each row against fastseg's, within (group, shape, mode) (a step's group is the
    step itself unless :attr:`Step.group` names another), as ``fastseg bench`` computes them
    (:func:`fastseg.bench.runner._add_ratios`); fastseg's own rows carry none."""
    from .runner import _add_ratios

    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("group") or r.get("step"), r["shape"], r["mode"]), []).append(r)
    for group in groups.values():
        _add_ratios(group)
        for r in group:
            if r["vs"] == r["impl"]:
                r["speedup"] = r["mem_ratio"] = r["vs"] = None


def evaluate_targets(rows: list[dict], targets: list[Target], dry: bool) -> list[dict]:
    out = []
    for t in targets:
        cands = [r for r in rows if r["op"] == t.op and r["mode"] == t.mode and r["impl"] == t.baseline
                 and t.shape in r["shape"]]
        key = "speedup" if t.metric == "speedup" else "mem_ratio"
        if not cands:
            out.append({"target": t.text, "shape": "-", "value": None,
                        "verdict": "DRY RUN" if dry else "NOT MEASURED", "why": "no such row"})
            continue
        for r in cands:
            v = r.get(key)
            if v is None:
                verdict, why = "NOT MEASURED", f"{t.baseline}: {r['status']} {r['note'][:80]}".strip()
                grp = r.get("group") or r.get("step")
                fast = [x for x in rows if (x.get("group") or x.get("step")) == grp and x["shape"] == r["shape"]
                        and x["mode"] == r["mode"] and x["impl"] == "fastseg"]
                if fast and fast[0]["status"] != "ok":
                    why = f"fastseg: {fast[0]['status']} {fast[0]['note'][:80]}".strip()
            else:
                verdict, why = ("met" if v >= t.at_least else "MISSED"), ""
            if dry:
                verdict, why = "DRY RUN", f"{t.baseline}: {r['status']} (CPU, tiny shapes, not timed)"
            out.append({"target": t.text, "shape": r["shape"], "value": v, "verdict": verdict, "why": why})
    return out


def _plot(rows: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    bars = [r for r in rows if r.get("speedup") or r.get("mem_ratio")]
    if not bars:
        bars = []
    fig, axes = plt.subplots(1, 2, figsize=(15, max(3.0, 0.22 * len(bars) + 1.5)), sharey=True)
    labels = [f"{r['op']} {r['shape'][:38]} {r['mode']} vs {r['impl']}" for r in bars]
    ys = list(range(len(bars)))
    for ax, key, name in ((axes[0], "speedup", "fastseg speed-up (baseline time / fastseg time)"),
                          (axes[1], "mem_ratio", "peak memory: baseline / fastseg")):
        vals = [r.get(key) or 0 for r in bars]
        ax.barh(ys, vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log") if any(v > 0 for v in vals) else None
        ax.set_xlabel(name)
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _print_summary(rows, step_results, verdicts, env, cache, dry, console):
    from rich.table import Table

    from .measure import fmt_bytes

    t = Table(title="steps", title_justify="left")
    for c in ("step", "status", "wall s", "limit s", "Triton compiles: hits / misses (s)", "result"):
        t.add_column(c)
    for name, res in step_results.items():
        tr = res.get("triton")
        tr = f"{tr['cache_hits']} / {tr['misses']} ({tr['compile_s']:.0f} s)" if tr else "-"
        t.add_row(name, res["status"], str(res.get("wall_s", "-")), str(res.get("limit_s", "-")), tr,
                  res.get("summary", "") or res.get("note", ""))
    console.print(t)
    bt = Table(title="headline table (" + ("DRY RUN: CPU, tiny shapes, not measurements" if dry else
                                           f"{env.get('device_name')}, bf16") + ")", title_justify="left")
    for c, j in (("op", "left"), ("shape", "left"), ("mode", "left"), ("impl", "left"), ("ms", "right"),
                 ("speed-up", "right"), ("peak", "right"), ("mem ratio", "right"), ("status", "left")):
        bt.add_column(c, justify=j)
    prev = None
    for r in rows:
        key = (r["op"], r["shape"], r["mode"])
        if prev is not None and key != prev:
            bt.add_section()
        first, prev = key != prev, key
        bt.add_row(r["op"] if first else "", r["shape"] if first else "", r["mode"] if first else "", r["impl"],
                   "-" if r["time_ms"] is None else f"{r['time_ms']:.3f}",
                   "" if r.get("speedup") is None else f"{r['speedup']:.2f}x",
                   fmt_bytes(r["peak_bytes"]), "" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.2f}x",
                   "" if r["status"] == "ok" else f"{r['status']} {r['note'][:50]}")
    console.print(bt)
    if cache is not None:
        console.print(f"Triton cache: {cache['summary']}")
    vt = Table(title="targets (speed-up / memory ratio = baseline / fastseg)", title_justify="left")
    for c in ("target", "shape", "value", "verdict", "why"):
        vt.add_column(c)
    for v in verdicts:
        style = {"met": "green", "MISSED": "bold red"}.get(v["verdict"], "yellow")
        vt.add_row(v["target"], v["shape"], "-" if v["value"] is None else f"{v['value']:.2f}x",
                   f"[{style}]{v['verdict']}[/]", v["why"])
    console.print(vt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastseg.bench.headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, every step (a CI check of the steps)")
    p.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results/<gpu>-<date>)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 470)),
                   help="seconds for all steps together (default 470, or $GPU_CHECK_BUDGET_S)")
    p.add_argument("--only", help="comma-separated step names")
    p.add_argument("--skip", help="comma-separated step names not to run (e.g. to leave the budget to later steps)")
    p.add_argument("--list", action="store_true", help="list the steps and targets")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = {s.name: s for s in STEPS}
    if args.child:
        return run_bench_step(steps[args.child], args.dry_run, args.rows)
    if args.list:
        for s in STEPS:
            tag = f" [{_env_label(s)}]" if _env_label(s) else ""
            print(f"{s.name:22s} {s.kind:6s} limit {s.limit_s:4d} s  {s.what}{tag}")
        for t in TARGETS:
            print(f"target: {t.text}")
        return 0
    started = time.time()
    import torch
    from rich.console import Console

    console = Console(width=200)
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        console.print("[yellow]No CUDA device: running the dry run (CPU, tiny shapes). Nothing here is a GPU "
                      "measurement.[/]")
    device = "cpu" if dry else "cuda"
    env = _environment(device)
    out = args.out or os.environ.get("OUT")
    if not out:
        name = (env["device_name"].split("(")[0].strip().replace(" ", "-").lower() if not dry else "dry-run")
        out = os.path.join(ROOT, "benchmarks", "results", f"{name}-{datetime.date.today().isoformat()}")
    os.makedirs(out, exist_ok=True)
    rows_path = os.path.join(out, "rows.jsonl")
    test_log = os.path.join(out, "tests.log")
    for pth in (rows_path, test_log):
        if os.path.exists(pth):
            os.remove(pth)
    skip = set(args.skip.split(",")) if args.skip else set()
    chosen = [s for s in STEPS if (not args.only or s.name in args.only.split(",")) and s.name not in skip]
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    cache_before = _cache_entries(cache_dir)
    if cache_before:
        from .triton_cache import relocate

        moved = relocate(cache_dir)
        console.print(f"Triton cache {cache_dir}: {len(cache_before)} entries, {moved['bytes'] / 2**20:.1f} MiB; "
                      f"{moved['groups']} group files pointed at this folder", highlight=False)
    console.print(f"gpu_check: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit "
                  f"{env['commit']} | sources {env['source_sha256']} | budget {args.budget:.0f} s | out {out}")
    step_results: dict = {}
    first_bench = next((s for s in chosen if s.kind == "bench"), None)  # a dry run runs it as the GPU run does
    for step in chosen:
        left = args.budget - (time.time() - started) - 5  # a few seconds for the summary
        limit = min(step.limit_s, left)
        if limit < 8:
            step_results[step.name] = {"status": "skipped", "note": "global budget spent", "limit_s": 0}
            console.print(f"[yellow]### {step.name}: skipped, global budget spent[/]")
            continue
        tag = f" [{_env_label(step)}]" if _env_label(step) else ""
        console.print(f"### {step.name} ({step.kind}, limit {limit:.0f} s): {step.what}{tag}", highlight=False,
                      markup=False)
        if dry and step.kind == "bench" and step is not first_bench and not step.env:
            res = _run_in_process(step, rows_path)
        else:
            res = _run_child(step, dry, limit, out, rows_path, test_log)
        step_results[step.name] = res
        console.print(f"### {step.name}: {res['status']} in {res.get('wall_s')} s {res.get('summary', '')}",
                      highlight=False)
    rows = _load_rows(rows_path)
    for step in chosen:
        res = step_results.get(step.name, {})
        if step.kind == "bench" and res.get("status") != "ok":
            rows += _fill_missing(step, rows, dry, res.get("status", "skipped"))
    order = {s.name: i for i, s in enumerate(STEPS)}
    impl_order = {}  # (group, row impl) -> position: a group's impls in step order, then each step's impls
    for s in STEPS:
        for name in s.impls or ():
            key = (s.group or s.name, s.row_impl(name))
            impl_order.setdefault(key, sum(1 for k in impl_order if k[0] == key[0]))
    shape_order = {}
    for r in rows:
        r.setdefault("group", r.get("step"))
        shape_order.setdefault((r["group"], r["shape"]), len(shape_order))
    rows.sort(key=lambda r: (order.get(r["group"], 99), shape_order[(r["group"], r["shape"])],
                             r["mode"] != "fwd", impl_order.get((r["group"], r["impl"]), 99)))
    add_ratios(rows)
    verdicts = evaluate_targets(rows, TARGETS, dry)
    cache = None
    if cache_dir:
        after = _cache_entries(cache_dir)
        manifest = os.path.join(cache_dir, "manifest.json")
        built = json.load(open(manifest)) if os.path.exists(manifest) else {}
        new = len(after - cache_before)
        from .triton_cache import current_triton_key

        key = current_triton_key()
        cache = {"dir": cache_dir, "entries_shipped": len(cache_before), "entries_compiled_here": new,
                 "triton_key_here": key, "triton_key_of_cache": built.get("triton_key"),
                 "built": {k: v for k, v in built.items() if k != "entries"}}
        match = "same" if key == built.get("triton_key") else "DIFFERENT (no hits possible)"
        hits = sum(r.get("triton", {}).get("cache_hits", 0) for r in step_results.values())
        miss = sum(r.get("triton", {}).get("misses", 0) for r in step_results.values())
        cache.update(hits=hits, misses=miss)
        cache["summary"] = (f"{len(cache_before)} entries shipped, {new} new entries after the run; fastseg "
                            f"kernel compiles: {hits} cache hits, {miss} misses (steps table); triton key of "
                            f"this install vs the cache's: {match}")
    env["wall_s"] = round(time.time() - started, 1)
    from .report import write_results

    doc_extra = {"steps": step_results, "targets": verdicts, "triton_cache": cache, "dry_run": dry,
                 "budget_s": args.budget}
    write_results(os.path.join(out, "headline"), rows, env, command=sys.argv, extra=doc_extra)
    png = _plot(rows, os.path.join(out, "headline.png"),
                f"fastseg headline check: {env['device_name']} torch {env['torch']} triton {env['triton']} "
                f"commit {env['commit']} {env['date']}" + (" (DRY RUN: CPU, not measurements)" if dry else ""))
    _print_summary(rows, step_results, verdicts, env, cache, dry, console)
    console.print(f"wrote {out}: headline.csv, headline.json, {os.path.basename(png) if png else '(no png)'}, "
                  f"tests.log, rows.jsonl; total {env['wall_s']} s", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
