#!/usr/bin/env bash
# The whole headline check in one GPU call (<= 8 minutes on one H100/H200, compiles included):
# install, GPU correctness tests of every kernel family, the headline benchmark table (bf16, fwd and
# fwd+bwd, peak memory, every baseline), results + summary table with the targets (printed last).
#   bash benchmarks/gpu_check.sh              # on the GPU machine (device tool: run, carry benchmarks/triton_cache.tgz)
#   bash benchmarks/gpu_check.sh --dry-run    # CPU: every step at tiny shapes (tests/test_gpu_check_dryrun.py)
# Output: $OUT (else benchmarks/results/<gpu>-<date>/): headline.csv, headline.json, headline.png, tests.log,
# rows.jsonl, gpu_check.log. Each step has its own time limit inside a global budget (GPU_CHECK_BUDGET_S,
# default 470 s); failures, OOM and timeouts are rows. The commit is `git rev-parse HEAD`, or $FASTSEG_COMMIT
# where the copy has no .git; the sources' hash is always recorded.
# A Triton cache prebuilt on a CPU (benchmarks/prebuild_triton_cache.py) in benchmarks/triton_cache (shipped packed as
# benchmarks/triton_cache.tgz, unpacked here) is used when present (TRITON_CACHE_DIR); the log says how many compiles hit it.
set -u
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -f benchmarks/triton_cache.tgz ] && [ ! -d benchmarks/triton_cache ] && [ "$DRY" = 0 ]; then
    mkdir -p benchmarks/triton_cache && tar -C benchmarks/triton_cache -xzf benchmarks/triton_cache.tgz \
        && echo "unpacked benchmarks/triton_cache.tgz ($(du -sh benchmarks/triton_cache | cut -f1))"
fi
if [ -d benchmarks/triton_cache ] && [ -z "${TRITON_CACHE_DIR:-}" ] && [ "$DRY" = 0 ]; then
    export TRITON_CACHE_DIR="$PWD/benchmarks/triton_cache"
fi
if [ -z "${FASTSEG_COMMIT:-}" ]; then
    FASTSEG_COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
    export FASTSEG_COMMIT
fi
if [ -z "${OUT:-}" ]; then
    if [ "$DRY" = 1 ]; then tag=dry-run; else
        tag=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/ .*//' | tr 'A-Z' 'a-z')
    fi
    OUT="benchmarks/results/${tag:-gpu}-$(date -u +%Y-%m-%d)"
fi
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
: > "$log"
{
    echo "gpu_check: $(date -u +%FT%TZ) commit=${FASTSEG_COMMIT:-unknown} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-unset}"
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
        t0=$(date +%s)
        $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -i "warn" | tail -5
        echo "install: $(( $(date +%s) - t0 )) s"
    else
        echo "dry run: install skipped (CPU, tiny shapes)"
    fi
    $PY -m fastseg.bench.headline --out "$OUT" "$@"
} 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
