"""Static resource report of fastseg's Triton kernels for an H100 (sm_90), built on a CPU: no GPU needed.

``fastseg inspect`` / ``python -m fastseg.bench.inspect`` runs each kernel family's *own launchers* on meta
tensors at the benchmark presets' shapes, with the Triton runtime's launch calls intercepted
(:func:`capture`): each launch's arguments, grid and constexprs come from the launcher itself. Every captured
launch is then compiled for sm_90 for each autotune config it can pick (after ``prune_configs_by``) and for
its ``FASTSEG_AUTOTUNE=0`` default, through Triton's own binder, so pointer / integer arguments get the same
divisibility-by-16 (and ``== 1``) specialisation as a real launch. Per compiled variant it reports registers,
spill bytes (ptxas -v), shared memory, wgmma / mma counts (PTX; SASS HGMMA / HMMA when nvdisasm runs) and
compile seconds. Identical binaries (same specialisation and options) are compiled once. Every ``*_kernel`` of
``fastseg.kernels`` is launched by some case (tests/test_inspect.py checks it: add a case with a new kernel).

``--counts`` adds launch and torch-op counts per fused op and module, forward and backward, measured under
the Triton interpreter (a child process with TRITON_INTERPRET=1) with a TorchDispatchMode that records every
aten op other than views / metadata (see :mod:`fastseg.bench.opcount`).

Notes: meta tensors have no device properties, so grid sizes that depend on the SM count are the CPU ones
(grids do not change the binary). fp32 dots are compiled as on a GPU with torch's TF32 switches at their
defaults where the launcher treats meta tensors like CUDA ones (MSCA does).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Launch", "capture", "compile_launch", "inspect_kernels", "CASES", "main", "SMEM_LIMIT"]

#: H100 / H200 shared memory per block (opt-in maximum), bytes.
SMEM_LIMIT = 227 * 1024
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Launch:
    """One intercepted kernel launch: the kernel object (JITFunction or Autotuner) and how it was called."""

    kernel: object
    args: tuple
    kwargs: dict
    grid: object = None

    @property
    def jit_fn(self):
        from triton.runtime.jit import JITFunction

        fn = self.kernel
        while not isinstance(fn, JITFunction):  # unwrap @triton.autotune / @triton.heuristics
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        fn = self.kernel
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotune / heuristics wrappers
            fn = fn.fn
        return fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__


@contextlib.contextmanager
def capture():
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of compiling / launching."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    try:  # kernels decorated under TRITON_INTERPRET=1 are InterpretedFunctions
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        InterpretedFunction = None
    launches: list[Launch] = []
    old_jit, old_at = JITFunction.run, Autotuner.run
    old_int = InterpretedFunction.run if InterpretedFunction is not None else None

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    def at_run(self, *args, **kwargs):
        kwargs = dict(kwargs)
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run, Autotuner.run = jit_run, at_run
    if InterpretedFunction is not None:
        InterpretedFunction.run = jit_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = old_jit, old_at
        if InterpretedFunction is not None:
            InterpretedFunction.run = old_int


# ------------------------------------------------------------------------------------------------ configs
def _config_kwargs(cfg) -> dict:
    kw = dict(cfg.all_kwargs())
    return {k: v for k, v in kw.items() if v is not None}


def _config_label(kw: dict, launch: Launch) -> str:
    meta = [f"{k}={v}" for k, v in kw.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg",
                                                            "num_buffers_warp_spec", "num_consumer_groups",
                                                            "reg_dec_producer", "reg_inc_consumer")]
    meta.append(f"w{kw.get('num_warps', launch.kwargs.get('num_warps', 4))}")
    meta.append(f"s{kw.get('num_stages', launch.kwargs.get('num_stages', 3))}")
    if kw.get("maxnreg"):
        meta.append(f"maxnreg={kw['maxnreg']}")
    if kw is not launch.kwargs:  # an autotune config: name the launch's own constexpr flags that are set
        meta += [f"+{k}" for k, v in launch.kwargs.items() if v is True and k not in kw]
    return " ".join(meta)


def _default_configs() -> dict:
    """{kernel name: [config kwargs]} of every autotuned fastseg kernel with FASTSEG_AUTOTUNE=0 (child process)."""
    code = ("import json, fastseg.kernels as K, pkgutil, importlib\n"
            "from triton.runtime.autotuner import Autotuner\n"
            "out = {}\n"
            "for m in pkgutil.iter_modules(K.__path__):\n"
            "    mod = importlib.import_module('fastseg.kernels.' + m.name)\n"
            "    for v in vars(mod).values():\n"
            "        if isinstance(v, Autotuner):\n"
            "            f = v.fn\n"
            "            while hasattr(f, 'fn') and not hasattr(f, 'arg_names'): f = f.fn\n"
            "            out[f.__name__] = [{k: x for k, x in c.all_kwargs().items() if x is not None}\n"
            "                               for c in v.configs]\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTSEG_AUTOTUNE"] = "0"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"could not read the FASTSEG_AUTOTUNE=0 configs:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs_of(launch: Launch, defaults: dict | None = None) -> list[tuple[str, dict]]:
    """[(tag, config kwargs)] a launch can run with: each config the autotuner may pick ("tune"), its
    FASTSEG_AUTOTUNE=0 default ("default", or "tune+default" when it is one of them); a plain kernel: "fixed"."""
    from triton.runtime.autotuner import Autotuner

    k = launch.kernel
    if not isinstance(k, Autotuner):
        return [("fixed", {})]
    k.nargs = dict(zip(k.arg_names, launch.args))
    try:
        pruned = k.prune_configs(launch.kwargs)
    finally:
        k.nargs = None
    out = [["tune", _config_kwargs(c)] for c in pruned]
    for d in (defaults or {}).get(launch.name, []):
        for row in out:
            if row[1] == d:
                row[0] = "tune+default"
                break
        else:
            out.append(["default", dict(d)])
    return [tuple(r) for r in out]


# ---------------------------------------------------------------------------------------------- compiling
def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


class _Mock:
    """What Triton's binder needs of a tensor argument: dtype and a 16-byte aligned data_ptr."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype

    @staticmethod
    def data_ptr():
        return 0


def _bind(launch: Launch, cfg: dict):
    """(fn, signature, constexprs, attrs, options, key) exactly as JITFunction.run would build them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_fn
    backend = make_backend(_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Mock(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: (_Mock(v) if isinstance(v, torch.Tensor) else v) for k, v in {**launch.kwargs, **cfg}.items()}
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    key = (fn.__name__, str(spec), str(sorted(options.__dict__.items())))
    return fn, signature, constexprs, attrs, options, key


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _sass_counts(cubin: bytes) -> dict | None:
    try:
        from triton.backends.nvidia.compiler import get_nvdisasm  # noqa: F401
        nvdisasm = get_nvdisasm().path if callable(get_nvdisasm) else None
    except Exception:
        nvdisasm = None
    if nvdisasm is None:
        base = os.path.dirname(__import__("triton.backends.nvidia", fromlist=["x"]).__file__)
        cand = os.path.join(base, "bin", "nvdisasm")
        nvdisasm = cand if os.path.exists(cand) else None
    if nvdisasm is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    sass = proc.stdout
    return {"hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.", sass))}


def compile_launch(launch: Launch, cfg: dict, sass: bool = True) -> dict:
    """Compile one launch with one config for sm_90 -> {regs, spill_bytes, smem, wgmma, mma, ... seconds}."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options, _ = _bind(launch, cfg)
    log = io.StringIO()
    t0 = time.time()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True  # ptxas must run: its -v log is where registers / spills are
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(),
                               options=options.__dict__)
    secs = time.time() - t0
    regs, spill = _REGS.search(log.getvalue()), _SPILL.search(log.getvalue())
    ptx = k.asm["ptx"]
    row = {
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": max(int(spill.group(2)), int(spill.group(3))) if spill else None,
        "stack": int(spill.group(1)) if spill else None,
        "smem": int(k.metadata.shared),
        "wgmma": len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
        "mma": len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        # tt.dot ops with fp16 / bf16 operands in the Triton IR: each must become wgmma / mma (violations())
        "half_dots": len(re.findall(r"tt\.dot\b[^\n]*:\s*tensor<[^>]*x(?:bf16|f16)\b", k.asm.get("ttir", ""))),
        "dots_fp": _dot_dtypes(ptx),
        "num_warps": options.num_warps, "num_stages": options.num_stages,
        "compile_s": round(secs, 1),
    }
    if sass and "cubin" in k.asm:
        row["sass"] = _sass_counts(k.asm["cubin"])
    return row


def _dot_dtypes(ptx: str) -> str:
    kinds = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)", ptx))
    kinds |= set(re.findall(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.(\w+)\.(\w+)", ptx))
    return ",".join(sorted(f"{a}.{b}" for a, b in kinds))


# ------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A kernel family at one shape / dtype / layout: ``run()`` calls the family's launchers (on meta tensors)."""

    family: str
    shape: str
    dtype: str
    layout: str
    run: Callable[[], None]
    meta: dict = field(default_factory=dict)


def _meta(shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _distinct(shapes, key, defaults: dict | None = None):
    """(shape, key(shape)) for each shape dict of ``shapes`` (``defaults`` filled in) whose key was not seen
    before: the benchmark presets repeat shapes the kernels compile identically for."""
    seen = set()
    for s in shapes:
        s = {**(defaults or {}), **s}
        k = key(s)
        if k not in seen:
            seen.add(k)
            yield s, k


def _msca_cases(preset: str):
    from fastseg.bench.ops.msca import PRESETS
    from fastseg.kernels import msca as K

    for s, key in _distinct(PRESETS[preset], lambda s: (s["C"], s["H"], s["W"])):
        for dn, dt in DTYPES.items():
            for layout in ("nchw", "cl"):
                def run(s=s, dt=dt, cl=layout == "cl"):
                    N, C, H, W = s["B"], s["C"], s["H"], s["W"]
                    x = _meta((N, C, H, W), dt, cl)
                    wp = torch.empty(C, K.WPACK, device="meta")
                    w3 = torch.empty(C, C, dtype=dt, device="meta")
                    b3 = torch.empty(C, device="meta")
                    if K.use_fused_fwd(x):  # the kernels the op dispatches to (fastseg.ops.msca)
                        _, sm = K.msca_fused_fwd(x, wp, w3, b3)
                    else:
                        sm = K.msca_dw_fwd(x, wp)
                        K.msca_pw_fwd(sm, x, w3, b3)
                    if C <= K.FUSED_BWD_CAP_C:  # the opt-in one-kernel backward (FASTSEG_MSCA_FUSED_BWD=1)
                        K.msca_fused_bwd(x, x, sm, wp, w3, b3)
                        K.msca_twopass_bwd(x, x, sm, wp, w3, b3)  # the default (C <= 64)
                    if C <= K.PW_FUSED_MAX_C:
                        ds, dxd, _ = K.msca_pw_w3_bwd(x, x, sm, w3, b3)
                    else:
                        ds, dxd = K.msca_pw_bwd(x, x, sm, w3, b3)
                        K.msca_w3_bwd(x, x, sm)
                    K.msca_dw_bwd(x, ds, dxd, wp)
                yield Case("msca", f"B={s['B']} C={s['C']} {s['H']}x{s['W']}", dn, layout, run)


def _mlp_cases(preset: str):
    from fastseg.bench.ops.msca import MLP_PRESETS
    from fastseg.kernels import mlp_dwconv as K

    for s, key in _distinct(MLP_PRESETS[preset], lambda s: (s["hidden"], s["H"], s["W"])):
        for dn, dt in DTYPES.items():
            for layout in ("nchw", "cl"):
                def run(s=s, dt=dt, cl=layout == "cl"):
                    N, C, H, W = s["B"], s["hidden"], s["H"], s["W"]
                    x = _meta((N, C, H, W), dt, cl)
                    w = torch.empty(C, 9, device="meta")
                    b = torch.empty(C, device="meta")
                    K.dwconv3x3_gelu_fwd(x, w, b)
                    K.dwconv3x3_gelu_bwd(x, x, w, b)
                yield Case("mlp_dwconv", f"B={s['B']} C={s['hidden']} {s['H']}x{s['W']}", dn, layout, run)


def _attention_cases(preset: str):
    """Masked attention (forward, backward, tile lists, mask packing, need_weights' weights and their backward,
    the dropout keep mask) and the sign-pack mask kernels (with the empty-row reset). These
    call the kernel modules' public launchers; a launcher whose signature changed shows up as an error row."""
    import math

    from fastseg.bench.ops.masked_attention import PRESETS, SHAPE_KEYS
    from fastseg.kernels import attention_mask as AM
    from fastseg.kernels import masked_attention as K

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["Q"], s["H"], s["W"], s["E"], s["heads"]), SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt):
                B, Q, E, h = s["B"], s["Q"], s["E"], s["heads"]
                P = s["H"] * s["W"]
                D = E // h
                q = _meta((B, h, Q, D), dt)
                kv = _meta((B, h, P, D), dt)
                bits = torch.empty(B, 1, Q, math.ceil(P / 32), dtype=torch.int32, device="meta")
                am = torch.empty(B, 1, Q, P, dtype=torch.bool, device="meta")
                K.pack(am, None, attn_masked=True, kpm_masked=True, batch=B, heads=h, n_q=Q, n_k=P)
                K.pack_with_tile_lists(am, None, attn_masked=True, kpm_masked=True, batch=B, heads=h, n_q=Q, n_k=P)
                o, lse, blocks, counts, flags = K.forward(q, kv, kv, bits, D ** -0.5)
                K.backward(o, q, kv, kv, o, lse, bits, blocks, counts, flags, D ** -0.5)
                seed = torch.empty(1, dtype=torch.int64, device="meta")  # attention dropout variants
                for sd, p in ((None, 0.0), (seed, 0.1)):  # need_weights: weights + their backward
                    for avg in (True, False):  # averaged over the heads (B, Q, P) or per head (B, h, Q, P)
                        w = K.weights(q, kv, lse, bits, D ** -0.5, avg, sd, p)
                        K.weights_backward(w, q, kv, lse, bits, D ** -0.5, avg, sd, p)
                o, lse, blocks, counts, flags = K.forward(q, kv, kv, bits, D ** -0.5, seed=seed, dropout_p=0.1)
                K.backward(o, q, kv, kv, o, lse, bits, blocks, counts, flags, D ** -0.5, seed=seed, dropout_p=0.1)
                K.keep_mask(seed, B * h * Q, P, 0.1)  # fastseg.ops.dropout_keep_mask
                emb = _meta((B, Q, E), dt)
                feat = _meta((B, E, P), dt)
                # fp32: both precisions the op can pick (exact by default, TF32 when matmuls allow it)
                for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
                    AM.sign_pack(emb, feat, prec, reset_empty=True)
                if dt != torch.float32:  # fp32 level features with 16-bit embeddings (rounded in the kernel)
                    AM.sign_pack(emb, _meta((B, E, P), torch.float32), "ieee", reset_empty=True)
            yield Case("masked_attention", f"B={s['B']} Q={s['Q']} {s['H']}x{s['W']} E={s['E']}/{s['heads']}h",
                       dn, "bhmd", run)


def _cc_cases(preset: str):
    from fastseg.bench.ops.context_cluster import PRESETS, SHAPE_KEYS
    from fastseg.kernels import context_cluster as K
    from fastseg.ops.context_cluster import effective_folds

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["heads"], s["head_dim"], s["H"], s["W"], s["fold"], s["proposal"]),
                            SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt):
                B, h, c = s["B"], s["heads"], s["head_dim"]
                x = _meta((B, h * c, s["H"], s["W"]), dt)
                a = torch.empty(1, device="meta")
                folds = effective_folds(s["fold"], s["fold"])
                props = (s["proposal"], s["proposal"])
                out, saved = K.cluster_forward(x, x, a, a, h, folds, props, False)
                K.cluster_backward(out, x, x, a, saved, h, folds, props, False)
            yield Case("context_cluster", f"B={s['B']} {s['heads']}x{s['head_dim']} {s['H']}x{s['W']} "
                       f"fold={s['fold']}", dn, "nchw", run)


def _msda_cases(preset: str):
    """Multi-scale deformable attention: the plain op and the module's FUSED variant (softmax + locations in
    the kernel), forward and backward, at the encoder shapes of the benchmark preset."""
    from fastseg.bench.ops.ms_deform_attn import PRESETS, SHAPE_KEYS, level_shapes
    from fastseg.kernels import ms_deform_attn as K

    for s, _ in _distinct(PRESETS.get(preset, PRESETS["default"]),
                          lambda s: (s["B"], tuple(level_shapes(s)), s["heads"], s["D"], s["points"]), SHAPE_KEYS):
        shapes = level_shapes(s)
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt, shapes=shapes):
                N, M, D, P, L = s["B"], s["heads"], s["D"], s["points"], len(shapes)
                S = sum(h * w for h, w in shapes)
                Lq = S  # the encoder's queries are its own pixels
                value = _meta((N, S, M, D), dt)
                ss = torch.empty(L, 2, dtype=torch.int64, device="meta")
                start = torch.empty(L, dtype=torch.int64, device="meta")
                loc = _meta((N, Lq, M, L, P, 2), dt)
                attn = _meta((N, Lq, M, L, P), dt)
                go = _meta((N, Lq, M * D), dt)
                K.ms_deform_attn_bwd(value, ss, start, loc, attn, go)
                K.ms_deform_attn_fwd(value, ss, start, loc, attn)
                ref = _meta((N, Lq, L, 2), dt)
                _, stats = K.ms_deform_attn_fwd(value, ss, start, loc, attn, reference_points=ref)
                K.ms_deform_attn_bwd(value, ss, start, loc, attn, go, reference_points=ref, stats=stats)
            yield Case("ms_deform_attn", f"B={s['B']} {s['H']}x{s['W']} {s['heads']}h D={s['D']} P={s['points']}",
                       dn, "nsmd", run)


def _upce_cases(preset: str):
    """CAC's fused bilinear upsample + cross-entropy (forward and backward) at the CAC benchmark shapes."""
    from fastseg.bench.ops.cac import PRESETS, SHAPE_KEYS
    from fastseg.kernels import upsample_ce as K

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["B"], s["K"], s["H"], s["W"], s["stride"]), SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt):
                B, Kc, h, w = s["B"], s["K"], s["H"], s["W"]
                x = _meta((B, Kc, h, w), dt)
                t = torch.empty(B, h * s["stride"], w * s["stride"], dtype=torch.int64, device="meta")
                _, lse = K.upsample_ce_fwd(x, t, False, 255)
                K.upsample_ce_bwd(x, t, lse, lse, False, 255)
            yield Case("upsample_ce", f"B={s['B']} K={s['K']} {s['H']}x{s['W']} x{s['stride']}", dn, "nchw", run)


def _mask_loss_cases(preset: str):
    """MaskFormer's fused mask losses (forward and backward) at the maskformer benchmark shapes: T = B·targets
    matched pairs, stride-4 logits, targets (uint8) at the image size."""
    from fastseg.bench.ops.maskformer import PRESETS, SHAPE_KEYS
    from fastseg.kernels import mask_loss as K

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["B"] * s["T"], s["H"], s["W"]), SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt, key=key):
                T, H, W = key
                x = _meta((T, -(-H // 4), -(-W // 4)), dt)
                t = torch.empty(T, H, W, dtype=torch.uint8, device="meta")
                rows = torch.empty(T, dtype=torch.int64, device="meta")
                K.mask_loss_fwd(x, t, rows, 0.25, 2.0)
                K.mask_loss_bwd(x, t, rows, torch.empty(T, 3, device="meta"), 0.25, 2.0)
            yield Case("mask_loss", f"T={key[0]} {key[1]}x{key[2]}", dn, "nchw", run)
def _mask_cost_cases(preset: str):
    """MaskFormer's fused matcher costs (one launch per batch): Q=100, T=30 targets per image, stride-4 logits
    of 512² (ADE20K, B=8) and 1024² (COCO, B=2) images, from the logits ("qhw") or from the mask embeddings x
    mask features ("emb", C=256). fp32 also with TF32 allowed (layout suffix "-tf32")."""
    from fastseg.kernels import mask_cost as K

    shapes = [(8, 100, 30, 512, 256)] + ([(2, 100, 30, 1024, 256)] if preset != "default" else [])
    for B, Q, T, S, C in shapes:
        for dn, dt in DTYPES.items():
            for layout in ("qhw", "emb") + (("qhw-tf32", "emb-tf32") if dt == torch.float32 else ()):
                def run(B=B, Q=Q, T=T, S=S, C=C, dt=dt, layout=layout):
                    h = S // 4
                    tgts = [torch.empty(T, S, S, dtype=torch.uint8, device="meta") for _ in range(B)]
                    old = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = layout.endswith("tf32")
                    try:
                        if layout.startswith("emb"):
                            K.mask_costs(tgts, (S, S), embeds=_meta((B, Q, C), dt), features=_meta((B, C, h, h), dt))
                        else:
                            K.mask_costs(tgts, (S, S), logits=_meta((B, Q, h, h), dt))
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = old
                yield Case("mask_cost", f"B={B} Q={Q} T={T} {S // 4}x{S // 4} (image {S}²)", dn, layout, run)


def _cac_cases(preset: str):
    """CAC's fused classifier (kernels/cac.py): soft and label prototypes, cosine classifier, distillation,
    forward and backward, at the CAC benchmark shapes."""
    from fastseg.bench.ops.cac import PRESETS, SHAPE_KEYS
    from fastseg.kernels import cac as K

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["B"], s["C"], s["K"], s["H"], s["W"]), SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt):
                B, C, Kc, h, w = s["B"], s["C"], s["K"], s["H"], s["W"]
                f = _meta((B, C, h, w), dt)
                z = _meta((B, Kc, h, w), dt)
                y = torch.empty(B, h * w, dtype=torch.int64, device="meta")
                acc = torch.float32
                a, d, lse = K.soft_proto_fwd(f, z)
                K.soft_proto_bwd(f, z, lse, a, d)
                a, _ = K.label_proto_fwd(f, y, Kc, 255)
                K.label_proto_bwd(f, y, a, 255)
                for q, clamp in ((_meta((B, Kc, C), dt), False), (_meta((1, Kc, C), dt), True)):
                    rq = torch.empty(q.shape[0], Kc, dtype=acc, device="meta")
                    out, nf = K.cos_fwd(f, q, rq, 15.0, 1e-12, clamp)
                    K.cos_bwd(f, q, rq, nf, out, out, 15.0, 1e-12, clamp)
                _, stats = K.distill_fwd(z, z, y, 0.5, 255, 0.0)
                K.distill_bwd(z, z, y, stats, torch.empty(Kc, dtype=acc, device="meta"), 0.5, 255, 0.0)
            yield Case("cac", f"B={s['B']} C={s['C']} K={s['K']} {s['H']}x{s['W']}", dn, "nchw", run)


def _atm_cases(preset: str):
    """SegViT's ATM attention (forward with the head-mean logits, backward from both outputs, with and
    without attention dropout) at the atm-attention benchmark shapes."""
    from fastseg.bench.ops.segvit import PRESETS, SHAPE_KEYS
    from fastseg.kernels import masked_attention as K

    for s, key in _distinct(PRESETS.get(preset, PRESETS["default"]),
                            lambda s: (s["B"], s["K"], s["H"], s["W"], s["C"], s["heads"]), SHAPE_KEYS):
        for dn, dt in DTYPES.items():
            def run(s=s, dt=dt):
                B, Kc, h = s["B"], s["K"], s["heads"]
                N, D = s["H"] * s["W"], s["C"] // s["heads"]
                q = _meta((B, h, Kc, D), dt)
                kv = _meta((B, h, N, D), dt)
                dl = torch.empty(B, Kc, N, dtype=torch.float32, device="meta")
                seed = torch.empty(1, dtype=torch.int64, device="meta")
                for sd, p in ((None, 0.0), (seed, 0.1)):
                    o, lse, _ = K.atm_forward(q, kv, kv, D ** -0.5, sd, p)
                    K.atm_backward(o, dl, q, kv, kv, o, lse, D ** -0.5, sd, p)
            yield Case("atm_attention", f"B={s['B']} K={s['K']} {s['H']}x{s['W']} C={s['C']}/{s['heads']}h",
                       dn, "bhmd", run)


#: family -> case generator(preset). Add a family here when it gets kernels.
CASES = {"msca": _msca_cases, "mlp_dwconv": _mlp_cases, "masked_attention": _attention_cases,
         "context_cluster": _cc_cases, "ms_deform_attn": _msda_cases, "upsample_ce": _upce_cases,
         "mask_loss": _mask_loss_cases, "mask_cost": _mask_cost_cases, "cac": _cac_cases,
         "atm_attention": _atm_cases}


def inspect_kernels(families=None, preset: str = "default", dtypes=None, kernel: str | None = None,
                    layouts=None, sass: bool = True, defaults: bool = True, max_shapes: int | None = None,
                    config_filter: Callable[[str, dict], bool] | None = None, log=None) -> list[dict]:
    """Rows of the resource report (see the module docstring). ``kernel``: substring filter on kernel names."""
    import triton

    defaults_map = _default_configs() if defaults else {}
    rows, done = [], {}
    for fam in families or CASES:
        n_shapes = {}
        for case in CASES[fam](preset):
            if case is None or (dtypes and case.dtype not in dtypes) or (layouts and case.layout not in layouts):
                continue
            n_shapes.setdefault(case.shape, len(n_shapes))
            if max_shapes is not None and n_shapes[case.shape] >= max_shapes:
                continue
            base = dict(family=fam, shape=case.shape, dtype=case.dtype, layout=case.layout)
            try:
                with capture() as launches:
                    case.run()
            except Exception as e:  # a launcher that changed or cannot run on meta tensors: report it
                rows.append({**base, "kernel": "?", "config": "", "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            for launch in launches:
                if kernel and kernel not in launch.name:
                    continue
                for tag, cfg in configs_of(launch, defaults_map):
                    label = _config_label(cfg or launch.kwargs, launch)
                    if config_filter and not config_filter(launch.name, {**launch.kwargs, **cfg}):
                        continue
                    row = {**base, "kernel": launch.name, "config": label, "pick": tag}
                    try:
                        key = _bind(launch, cfg)[-1]
                        if key in done:
                            row.update({k: v for k, v in done[key].items() if k != "compile_s"}, compile_s=0.0,
                                       same_as=done[key]["_where"])
                        else:
                            res = compile_launch(launch, cfg, sass=sass)
                            res["_where"] = f"{case.shape} {case.dtype} {case.layout}"
                            done[key] = res
                            row.update(res)
                    except (triton.CompilationError, Exception) as e:
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    row.pop("_where", None)
                    rows.append(row)
                    if log:
                        log(_fmt_row(row))
    return rows


# ------------------------------------------------------------------------------------------------ output
_COLS = ("kernel", "config", "pick", "dtype", "layout", "shape", "regs", "spill_bytes", "smem", "wgmma", "mma",
         "compile_s")


def _fmt(v):
    return "" if v is None else str(v)


def _fmt_row(r: dict) -> str:
    cells = [_fmt(r.get(c)) for c in _COLS]
    if r.get("smem") is not None and r["smem"] > SMEM_LIMIT:
        cells[_COLS.index("smem")] += " (>227K)"
    if r.get("sass"):
        cells[_COLS.index("wgmma")] += f"/{r['sass']['hgmma']}"
        cells[_COLS.index("mma")] += f"/{r['sass']['hmma']}"
    if r.get("error"):
        cells.append("ERROR " + r["error"])
    elif r.get("same_as"):
        cells.append("(same binary as " + r["same_as"] + ")")
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(_COLS) + " | note |\n|" + "---|" * (len(_COLS) + 1) + "\n"
    return head + "\n".join(_fmt_row(r) + ("" if r.get("error") or r.get("same_as") else " |") for r in rows)


def violations(rows: list[dict], fp32_spill: int = 256) -> list[str]:
    """The rules of issue 12 for rows that compiled: 0 spill bytes in fp16/bf16, <= 256 B in fp32, shared
    memory within 227 KB, and a tensor-core instruction wherever a fp16/bf16 kernel has a dot."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append(f"{r['kernel']} {r['config']} {r['dtype']} {r['layout']}: {r['error']}")
            continue
        lim = fp32_spill if r["dtype"] == "fp32" else 0
        if r["spill_bytes"] is None or r["spill_bytes"] > lim:
            out.append(f"{r['kernel']} {r['config']} {r['dtype']} {r['layout']}: spills {r['spill_bytes']} B")
        if r["smem"] > SMEM_LIMIT:
            out.append(f"{r['kernel']} {r['config']} {r['dtype']} {r['layout']}: {r['smem']} B shared memory")
        if r.get("half_dots") and not (r["wgmma"] or r["mma"]):
            out.append(f"{r['kernel']} {r['config']} {r['dtype']} {r['layout']}: {r['half_dots']} fp16/bf16 dots "
                       "without tensor-core instructions")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastseg inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", action="append", choices=sorted(CASES), help="kernel family (repeatable)")
    p.add_argument("--kernel", help="only kernels whose name contains this")
    p.add_argument("--preset", default="default", help="benchmark preset whose shapes are used (default)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    p.add_argument("--layout", action="append", choices=["nchw", "cl", "bhmd", "nsmd", "qhw", "emb", "qhw-tf32",
                                                             "emb-tf32"])
    p.add_argument("--max-shapes", type=int, default=None, help="at most this many shapes per family")
    p.add_argument("--no-sass", action="store_true", help="skip nvdisasm (PTX counts only)")
    p.add_argument("--no-default", action="store_true", help="skip the FASTSEG_AUTOTUNE=0 configs")
    p.add_argument("--counts", action="store_true", help="also count launches and torch ops per op / module")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON ('-' for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 when a row breaks the spill / smem rules")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("fastseg inspect compiles for the GPU: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    quiet = a.json == "-"
    if not quiet:
        print("| " + " | ".join(_COLS) + " | note |\n|" + "---|" * (len(_COLS) + 1), flush=True)
    rows = inspect_kernels(a.family, a.preset, a.dtype, a.kernel, a.layout, sass=not a.no_sass,
                           defaults=not a.no_default, max_shapes=a.max_shapes,
                           log=None if quiet else (lambda s: print(s, flush=True)))
    out = {"rows": rows}
    if a.counts:
        from .opcount import count_all

        out["counts"] = count_all()
        if not quiet:
            print()
            print(counts_markdown(out["counts"]))
    bad = violations(rows)
    if not quiet and bad:
        print("\nrule violations (spills > 0 B fp16/bf16 or > 256 B fp32, smem > 227 KB, errors):")
        print("\n".join("  " + b for b in bad))
    if a.json:
        text = json.dumps(out, indent=1, default=str)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)
    return 1 if (a.check and bad) else 0


def counts_markdown(counts: dict) -> str:
    lines = ["| what | dtype | pass | launches | torch ops | ops |", "|---|---|---|---|---|---|"]
    for c in counts:
        if "error" in c:
            lines.append(f"| {c['what']} | {c['dtype']} | | | | ERROR {c['error'][:200]} |")
            continue
        for ph in ("forward", "backward"):
            d = c[ph]
            ops = ", ".join(f"{k}×{v}" for k, v in sorted(d["aten"].items()))
            lines.append(f"| {c['what']} | {c['dtype']} | {ph} | {d['launches']} | {sum(d['aten'].values())} | {ops} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
