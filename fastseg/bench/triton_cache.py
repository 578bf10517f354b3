"""Triton's on-disk kernel cache across machines: the key that decides a hit, and a log of hits and misses.

Triton 3.6 stores a compiled kernel under ``TRITON_CACHE_DIR/<sha256(key)>/`` with
``key = triton_key() - src.hash() - backend.hash() - options.hash() - env vars`` (``triton.compiler.compile``):
``triton_key()`` hashes the Triton version, its compiler/backends/language sources and ``libtriton`` (a
Python-ABI-specific binary), ``src.hash()`` the kernel's source and dependencies, its signature (dtypes),
the specialisation (pointer alignment to 16 bytes, integers divisible by 16 or equal to 1) and constexprs,
``backend.hash()`` the bundled ptxas version and the arch (sm_90 for H100 and H200 alike), ``options`` the
launch options (num_warps, num_stages, ...). A kernel compiled elsewhere hits only when all of them match.
"""
from __future__ import annotations

import atexit
import hashlib
import sys

__all__ = ["current_triton_key", "install_listener", "compile_log"]

compile_log: list[tuple[str, bool, float]] = []  # (kernel name, cache hit, seconds) in this process


def current_triton_key() -> str | None:
    """First 16 hex digits of sha256(triton_key()) of this install (None without Triton)."""
    try:
        from triton.runtime.cache import triton_key
    except Exception:  # noqa: BLE001
        return None
    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


def install_listener(tag: str = "", verbose_misses: bool = True) -> bool:
    """Record every Triton compile call of this process (hit or miss, time); print each miss and, at exit, one
    ``[triton]`` summary line. Returns False where this Triton has no compilation listener."""
    try:
        from triton import knobs
    except Exception:  # noqa: BLE001
        return False
    if not hasattr(knobs, "compilation") or not hasattr(knobs.compilation, "listener"):
        return False

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        name = getattr(getattr(src, "fn", None), "__name__", None) or metadata.get("name", "?")
        secs = times.total / 1e6
        compile_log.append((name, bool(cache_hit), secs))
        if verbose_misses and not cache_hit:
            print(f"[triton] miss {name}: compiled in {secs:.1f} s", flush=True)

    knobs.compilation.listener = listener

    def summary():
        if not compile_log:
            return
        hits = sum(1 for _, h, _ in compile_log if h)
        miss = [s for _, h, s in compile_log if not h]
        print(f"[triton] {tag}: {len(compile_log)} compile calls: {hits} cache hits, {len(miss)} misses "
              f"({sum(miss):.1f} s compiling)", file=sys.stdout, flush=True)

    atexit.register(summary)
    return True


def relocate(cache_dir: str, strip: bool = False) -> dict:
    """Make a copied Triton file cache usable at ``cache_dir``: each entry's group file (``__grp__*.json``) lists
    its files by absolute path, and Triton 3.6 treats a group whose paths do not exist as a miss, so a cache
    built in another folder (or machine) never hits until its paths are rewritten. ``strip``: keep only the
    binary and metadata (``cubin``, ``json``, as ``TRITON_STORE_BINARY_ONLY=1`` does) and delete the IR files.
    Returns counts of the groups rewritten and the bytes left."""
    import json
    import os

    cache_dir = os.path.abspath(cache_dir)
    groups = removed = 0
    for entry in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, entry)
        if not os.path.isdir(d):
            continue
        for f in os.listdir(d):
            if not (f.startswith("__grp__") and f.endswith(".json")):
                continue
            path = os.path.join(d, f)
            with open(path) as fh:
                children = json.load(fh).get("child_paths") or {}
            new = {}
            for name in children:
                local = os.path.join(d, name)
                if strip and os.path.splitext(name)[1] not in (".cubin", ".json"):
                    if os.path.exists(local):
                        os.remove(local)
                        removed += 1
                    continue
                new[name] = local
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"child_paths": new}, fh)
            os.replace(tmp, path)
            groups += 1
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cache_dir) for f in fs)
    return {"groups": groups, "files_removed": removed, "bytes": size}
