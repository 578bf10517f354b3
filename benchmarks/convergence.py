"""Loss curves with and without ``fastseg.patch`` from the same seed (longer than tests/test_convergence.py).

    python benchmarks/convergence.py --out DIR [--models mask2former,segnext,coc] [--steps 100] [--replot]
                                     [--size bench|ci] [--steps-for segnext=30]

Writes ``DIR/<model>.png`` (loss per step, patched vs unpatched, and their relative difference) and
``DIR/convergence.json`` (losses, environment, settings). CPU only (the models are built on the CPU):
set ``TRITON_INTERPRET=1`` before running for the patched models to run the Triton kernels under the
interpreter (slow: ~1 s per kernel launch), leave it unset for fastseg's CPU torch path. The JSON and the
plots say which ran. Models, task and sizes: :mod:`fastseg.bench.convergence`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def plot(name: str, ref: list, pat: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(ref) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.9))
    a.plot(steps, ref, label="unpatched (reference)", lw=2.2, alpha=0.7)
    a.plot(steps, pat, label="fastseg.patch", lw=1.0, ls="--", color="k")
    a.set_xlabel("step"), a.set_ylabel("training loss"), a.set_title(f"{name}: loss"), a.legend()
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ref, pat)]
    b.semilogy(steps, [max(r, 1e-9) for r in rel], marker=".", lw=0.8)
    b.set_xlabel("step"), b.set_ylabel("|patched - reference| / reference (floor 1e-9)")
    b.set_title(f"{name}: relative difference")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(name: str, results: dict, row: dict) -> str:
    env = results["environment"]
    return (f"{name} ({results['size']}: {row['image']}x{row['image']}, batch {row['batch']}), AdamW lr "
            f"{results['lr']}, fp32, CPU; patched: {results['patched_path']}\n"
            f"torch {env['torch']}, triton {env['triton']}, commit {str(env['commit'])[:12]}, {env['date']}")


def replot(out: str) -> None:
    """Redraw the PNGs of ``out`` from its convergence.json."""
    with open(os.path.join(out, "convergence.json")) as f:
        results = json.load(f)
    for name, row in results["models"].items():
        plot(name, row["reference"], row["patched"], os.path.join(out, f"{name}.png"), _title(name, results, row))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="mask2former,segnext,coc")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--steps-for", default="", help="per-model step counts, e.g. segnext=30,coc=50")
    p.add_argument("--size", default="bench", choices=["bench", "ci"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="only redraw the PNGs from DIR/convergence.json")
    args = p.parse_args(argv)
    if args.replot:
        replot(args.out)
        return 0

    torch.set_num_threads(args.threads)
    from fastseg import _backend
    from fastseg.bench import convergence as cv
    from fastseg.bench.env import environment

    os.makedirs(args.out, exist_ok=True)
    per_model = dict(kv.split("=") for kv in args.steps_for.split(",") if kv)
    env = environment("cpu")
    path_name = "Triton kernels under TRITON_INTERPRET=1" if _backend.interpreter_enabled() else "CPU torch path"
    results = {"environment": env, "patched_path": path_name, "size": args.size, "lr": args.lr, "models": {}}
    for name in args.models.split(","):
        steps = int(per_model.get(name, args.steps))
        image, batch, opts = cv.SIZES[args.size][name]
        t0 = time.perf_counter()
        ref = cv.train(name, False, steps, size=args.size, lr=args.lr)
        t1 = time.perf_counter()
        _backend.launches.clear()
        pat = cv.train(name, True, steps, size=args.size, lr=args.lr)
        t2 = time.perf_counter()
        rel = [abs(x - y) / abs(x) for x, y in zip(ref.losses, pat.losses)]
        row = {"steps": steps, "image": image, "batch": batch, "options": opts, "reference": ref.losses,
               "patched": pat.losses, "replaced_modules": pat.replaced,
               "triton_launches": sum(_backend.launches.values()), "max_rel_diff": max(rel),
               "final_rel_diff": rel[-1], "seconds_reference": round(t1 - t0, 1), "seconds_patched": round(t2 - t1, 1)}
        results["models"][name] = row
        plot(name, ref.losses, pat.losses, os.path.join(args.out, f"{name}.png"), _title(name, results, row))
        print(f"{name}: {steps} steps, loss {ref.losses[0]:.4f} -> {ref.losses[-1]:.4f} (patched "
              f"{pat.losses[-1]:.4f}), max rel diff {max(rel):.2e}, launches {row['triton_launches']}, "
              f"{row['seconds_reference']} s / {row['seconds_patched']} s", flush=True)
        with open(os.path.join(args.out, "convergence.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
