"""Prebuild Triton's kernel cache for `benchmarks/gpu_check.sh` on a CPU machine (sm_90, Triton's bundled ptxas).

    python benchmarks/prebuild_triton_cache.py [--cache-dir benchmarks/triton_cache] [--target-python PY312]

The kernels are compiled exactly as a real launch on the GPU would compile them: the workloads of the check
(the GPU tests with FASTSEG_AUTOTUNE=0; the fastseg rows of the headline benchmarks with autotuning, every
autotune config) run on CPU tensors that report themselves as CUDA tensors (``.device`` / ``.is_cuda``;
factory calls for "cuda" are served on the CPU), with a stand-in Triton driver reporting an sm_90 target
(H100 and H200 alike, 132 SMs) and ``JITFunction.run`` in warm-up mode: Triton's own binder computes the
specialisation (dtypes, 16-byte alignment, divisibility of the integer arguments, constexprs), compiles and
writes the cache, and nothing is launched. Results of the skipped launches are garbage and never used.

The cache key includes ``triton_key()``, which hashes ``libtriton`` — a binary built per Python ABI: a cache
built by this venv's Python 3.11 Triton could never hit on the GPU machine's Python 3.12. ``--target-python``
(a Python 3.12 that imports the same Triton 3.6.0 wheel, cp312 build) gives the GPU machine's
``triton_key()``, used in place of this one's: the two builds produce byte-identical PTX and cubin (checked
by ``--check-identical``), only the key's libtriton hash differs. The GPU run (headline.py) prints how many
compiles hit the cache, and whether its own key matches the manifest's. Bench steps with an ``env`` of their
own (e.g. ``FASTSEG_MSCA_FUSED=0``, ``FASTSEG_AUTOTUNE=0``: read when the kernel modules are imported) are
compiled in a process with that env, as the check runs them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMS = 132  # H100 SXM and H200 both have 132 SMs


def target_triton_key(python: str, extra_path: str | None) -> str:
    code = ("import sys\n" + (f"sys.path.insert(0, {extra_path!r})\n" if extra_path else "")
            + "from triton.runtime.cache import triton_key; sys.stdout.write(triton_key())")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"--target-python failed: {out.stderr[-2000:]}")
    return out.stdout


def install_fake_cuda():
    """CPU tensors that say they are on cuda:0, a Triton driver with an sm_90 target, launches skipped."""
    import torch
    import triton
    from torch.overrides import TorchFunctionMode
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    fake = torch.device("cuda", 0)
    real_device = torch._C.TensorBase.device.__get__

    torch.Tensor.device = property(lambda self: fake if real_device(self).type == "cpu" else real_device(self))
    torch.Tensor.is_cuda = property(lambda self: True)

    def cpu(d):
        if isinstance(d, torch.device) and d.type == "cuda":
            return torch.device("cpu")
        if isinstance(d, str) and d.startswith("cuda"):
            return "cpu"
        if isinstance(d, int) and not isinstance(d, bool):
            return "cpu"
        return d

    class CudaOnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            name = getattr(func, "__name__", "")
            if name in ("to", "cuda"):
                args = tuple(cpu(a) for a in args)
            if name == "cuda":
                return args[0]
            return func(*args, **kwargs)

    mode = CudaOnCpu()
    mode.__enter__()
    # the mode is not active inside autograd's backward: wrap the factories there too
    for n in ("empty", "zeros", "ones", "full", "empty_strided", "arange", "randn", "rand", "randint", "tensor",
              "as_tensor", "linspace", "eye", "zeros_like", "empty_like", "ones_like", "full_like"):
        f = getattr(torch, n)

        def wrapped(*a, _f=f, **k):
            if "device" in k:
                k["device"] = cpu(k["device"])
            return _f(*a, **k)
        setattr(torch, n, wrapped)
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        if "device" in k:
            k["device"] = cpu(k["device"])
        return real_to(self, *(cpu(x) if isinstance(x, (str, torch.device)) else x for x in a), **k)
    torch.Tensor.to = to

    real_gen = torch.Generator

    class Generator(real_gen):  # torch.Generator(device="cuda") -> a CPU generator
        def __new__(cls, device=None):
            return real_gen()

        def __init__(self, device=None):
            pass
    torch.Generator = Generator  # type: ignore[misc]

    props = types.SimpleNamespace(multi_processor_count=SMS, name="NVIDIA H200 (stand-in for the prebuild)",
                                  total_memory=140 << 30, major=9, minor=0)
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.get_device_properties = lambda *a, **k: props
    c.get_device_capability = lambda *a, **k: (9, 0)
    c.get_device_name = lambda *a, **k: props.name
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda *a, **k: None
    c.mem_get_info = lambda *a, **k: (64 << 20, 140 << 30)
    for n in ("memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
        setattr(c, n, lambda *a, **k: 0)
    c.manual_seed = lambda *a, **k: None
    c.manual_seed_all = lambda *a, **k: None

    real_autocast = torch.autocast

    class autocast(real_autocast):
        def __init__(self, device_type, *a, **k):
            super().__init__("cpu" if device_type == "cuda" else device_type, *a, **k)
    torch.autocast = autocast  # type: ignore[misc]
    for n in ("is_autocast_enabled", "get_autocast_dtype"):
        realf = getattr(torch, n)
        setattr(torch, n, (lambda f: lambda dev="cuda", *a: f("cpu" if dev == "cuda" else dev, *a))(realf))

    target = GPUTarget("cuda", 90, 32)

    class StandInDriver:
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            def bench(fn, quantiles=None, **kw):
                fn()  # compiles this autotune config
                return [1.0, 1.0, 1.0] if quantiles else 1.0
            return bench

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandInDriver())
    # the skipped launches leave garbage (NaN) in the outputs: keep the matcher of the criterion going
    import numpy as np
    import scipy.optimize

    real_lsa = scipy.optimize.linear_sum_assignment

    def linear_sum_assignment(cost, *a, **k):
        return real_lsa(np.nan_to_num(np.asarray(cost, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), *a, **k)
    scipy.optimize.linear_sum_assignment = linear_sum_assignment
    for mod in ("fastseg.models.matcher", "fastseg.models.maskformer"):
        try:
            __import__(mod)
            sys.modules[mod].linear_sum_assignment = linear_sum_assignment
        except Exception:  # noqa: BLE001
            pass
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return real_run(self, *args, grid=grid, warmup=True, **kwargs)
    JITFunction.run = run
    return triton


def workload_tests():
    """The pytest steps of the check (GPU tests, kernel test files), FASTSEG_AUTOTUNE=0 as there."""
    import pytest

    from fastseg.bench.headline import STEPS

    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import helpers  # the launches' outputs are garbage: a failed comparison must not stop a test before its
    import torch.testing  # backward (whose kernels would then never compile)

    helpers.assert_close = lambda *a, **k: None
    torch.testing.assert_close = lambda *a, **k: None
    for step in STEPS:
        if step.kind == "pytest":
            args = [a for a in step.args if a not in ("-p", "poison")]
            print(f"prebuild: {step.name}: pytest {' '.join(args)} (results meaningless: launches are skipped)",
                  flush=True)
            pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "--no-header",
                         "-o", "addopts=", *[os.path.join(ROOT, a) if a.startswith("tests") else a for a in args]])


def workload_bench(model_batch: int, only: set | None = None):
    """Every fastseg row of the headline bench steps, once (models at a smaller batch: CPU time)."""
    import torch

    from fastseg.bench.headline import STEPS
    from fastseg.bench.registry import DTYPES, all_ops

    ops = all_ops()
    for step in STEPS:
        if step.kind != "bench" or step.op not in ops or (only and step.name not in only):
            continue
        spec = ops[step.op]
        for shape in step.shapes:
            s = spec.full_shape(shape)
            if spec.heavy:
                if s.get("H", 0) * s.get("W", 0) > 512 * 512:
                    print(f"prebuild: {step.op} {spec.shape_label(s)}: skipped (too slow on a CPU)", flush=True)
                    continue
                s = dict(s, B=min(s["B"], model_batch))
            for name in step.impls or [i.name for i in spec.impls]:
                if not name.startswith("fastseg"):
                    continue
                for mode in step.modes:
                    t = time.time()
                    try:
                        prepared = spec.impl(name).prepare(s, DTYPES["bf16"], torch.device("cuda"), mode)
                        prepared.run()
                        status = "ok"
                    except Exception as exc:  # noqa: BLE001
                        status = f"{type(exc).__name__}: {str(exc)[:160]}"
                    finally:
                        prepared = None
                    print(f"prebuild: {step.op} {spec.shape_label(s)} {mode} {name}: {status} "
                          f"({time.time() - t:.1f} s)", flush=True)


def bench_env_groups(only: set | None = None) -> list[tuple[dict, list[str]]]:
    """The check's bench steps (``only``: these) grouped by their ``env``: [(env, step names)], no-env first."""
    from fastseg.bench.headline import STEPS

    groups: dict = {}
    for step in STEPS:
        if step.kind == "bench" and (not only or step.name in only):
            groups.setdefault(tuple(sorted(step.env.items())), []).append(step.name)
    return [(dict(k), v) for k, v in sorted(groups.items(), key=lambda kv: len(kv[0]))]


def child(args):
    os.environ.pop("TRITON_INTERPRET", None)
    triton = install_fake_cuda()
    from triton.runtime import cache as tcache

    if args.key_file:
        key = open(args.key_file).read()
        tcache.triton_key = lambda: key  # the GPU machine's key (see the module docstring)
    from fastseg.bench import triton_cache

    triton_cache.install_listener(args.workload, verbose_misses=False)
    t0 = time.time()
    if args.workload == "tests":
        workload_tests()
    else:
        workload_bench(args.model_batch, set(args.steps.split(",")) if args.steps else None)
    log = [{"kernel": n, "hit": h, "s": round(s, 2)} for n, h, s in triton_cache.compile_log]
    with open(args.log, "w") as f:
        json.dump({"workload": args.workload, "wall_s": round(time.time() - t0, 1), "compiles": log}, f)
    os._exit(0)  # skip atexit handlers of the faked torch.cuda


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=os.path.join(ROOT, "benchmarks", "triton_cache"))
    p.add_argument("--target-python", help="a Python 3.12 whose Triton 3.6.0 is the GPU machine's (its key is used)")
    p.add_argument("--target-path", help="extra sys.path entry for --target-python (e.g. an unpacked cp312 wheel)")
    p.add_argument("--model-batch", type=int, default=2)
    p.add_argument("--keep-ir", action="store_true", help="keep the IR files (ttir, ttgir, llir, ptx) in the cache")
    p.add_argument("--workloads", default="tests,bench")
    p.add_argument("--steps", help="only these bench steps of the check (comma-separated)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--key-file", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import triton

    os.makedirs(args.cache_dir, exist_ok=True)
    key_file = None
    if args.target_python:
        key = target_triton_key(args.target_python, args.target_path)
        key_file = os.path.join(args.cache_dir, ".triton_key")
        with open(key_file, "w") as f:
            f.write(key)
    else:
        from triton.runtime.cache import triton_key

        key = triton_key()
        print("prebuild: no --target-python: the cache is keyed for this Python's Triton build only", flush=True)
    manifest = {"triton": triton.__version__, "triton_key": hashlib.sha256(key.encode()).hexdigest()[:16],
                "target": "cuda sm_90, warp 32", "built_on": f"python {sys.version.split()[0]}",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workloads": {}}
    try:
        manifest["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip() or None
    except Exception:  # noqa: BLE001
        manifest["commit"] = None
    from fastseg.bench.headline import _source_hash

    manifest["source_sha256"] = _source_hash()
    t0 = time.time()
    old = os.path.join(args.cache_dir, "manifest.json")
    if os.path.exists(old):  # an update of an existing cache (e.g. --steps): keep what it recorded
        manifest["workloads"] = json.load(open(old)).get("workloads", {})
    runs = []  # (workload, extra env, --steps or None): the bench steps in one process per distinct step env
    for w in args.workloads.split(","):
        if w != "bench":
            runs.append((w, {}, args.steps))
            continue
        for extra, names in bench_env_groups(set(args.steps.split(",")) if args.steps else None):
            runs.append((w, extra, ",".join(names)))
    for i, (w, extra, steps) in enumerate(runs):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSEG_AUTOTUNE")}
        env["TRITON_CACHE_DIR"] = os.path.abspath(args.cache_dir)
        if w == "tests":
            env["FASTSEG_AUTOTUNE"] = "0"  # as the check's pytest steps
        env.update(extra)
        tag = " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
        log = os.path.join(args.cache_dir, f".log_{w}_{i}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--workload", w, "--log", log,
               "--model-batch", str(args.model_batch)] + (["--key-file", key_file] if key_file else []) \
            + (["--steps", steps] if steps else [])
        t = time.time()
        subprocess.run(cmd, env=env, cwd=ROOT)
        doc = json.load(open(log)) if os.path.exists(log) else {"compiles": []}
        miss = [c for c in doc["compiles"] if not c["hit"]]
        key = w + (f" ({steps})" if steps and (args.steps or tag) else "") + (f" [{tag}]" if tag else "")
        manifest["workloads"][key] = {"wall_s": round(time.time() - t, 1), "compile_calls": len(doc["compiles"]),
                                      "compiled": len(miss), "compile_s": round(sum(c["s"] for c in miss), 1),
                                      "slowest": sorted(miss, key=lambda c: -c["s"])[:8]}
        print(f"prebuild: {key}: {doc.get('wall_s')} s, {len(miss)} kernels compiled", flush=True)
    from fastseg.bench.triton_cache import relocate

    full = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.cache_dir) for f in fs)
    stripped = relocate(args.cache_dir, strip=not args.keep_ir)  # the check needs cubin + metadata only
    manifest["bytes_with_ir"] = full
    print(f"prebuild: {full / 2**20:.1f} MiB with the IR files; {stripped}", flush=True)
    entries = [d for d in os.listdir(args.cache_dir) if os.path.isdir(os.path.join(args.cache_dir, d))]
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.cache_dir) for f in fs)
    manifest.update(entries=len(entries), bytes=size, wall_s=round(time.time() - t0, 1))
    with open(os.path.join(args.cache_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"prebuild: {len(entries)} cache entries, {size / 2**20:.1f} MiB in {args.cache_dir} "
          f"({manifest['wall_s']} s)", flush=True)
    tgz = os.path.abspath(args.cache_dir).rstrip("/") + ".tgz"  # what the device call carries (cubins pack ~4x)
    subprocess.run(["tar", "-C", args.cache_dir, "-czf", tgz, "."], check=True)
    print(f"prebuild: packed {tgz} ({os.path.getsize(tgz) / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
