"""The environment a benchmark ran in: device, versions, commit, date (written next to every result)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

__all__ = ["environment", "git_commit"]


def git_commit() -> str | None:
    """The commit of the fastseg checkout (``None`` when not a git checkout or git is missing)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


def environment(device: torch.device | str) -> dict:
    """A JSON-able dict: device name, torch/triton/python versions, interpreter flag, commit, UTC date."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from fastseg import __version__, _backend

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = props.name
        dev_mem = props.total_memory
    else:
        dev_name = platform.processor() or platform.machine() or "cpu"
        dev_name = f"CPU ({dev_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        dev_mem = None
    return {
        "device": str(device),
        "device_name": dev_name,
        "device_memory_bytes": dev_mem,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastseg": __version__,
        "triton_interpreter": _backend.interpreter_enabled(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
