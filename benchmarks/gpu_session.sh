#!/usr/bin/env bash
# GPU measurements in two calls of under 9 minutes each on an H100 (first-time compiles included: the
# FlexAttention / torch.compile baselines take ~20 s per new shape, the MSCA backward kernel ~40 s per
# dtype and memory format). Results (JSON written after every case) go to ${OUT:-benchmarks/results}.
#   python3 -m pip install --no-build-isolation --no-deps -e .
#   bash benchmarks/gpu_session.sh attention      # masked attention table + memprof
#   bash benchmarks/gpu_session.sh convs          # MSCA and context cluster tables, their GPU tests
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu_session_${1:-attention}.log"
run() { echo "### $*" | tee -a "$log"; "$@" 2>&1 | grep -v -i "warn" | tee -a "$log" | tail -30; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
case "${1:-attention}" in
attention)
    run timeout 330 python3 -m fastseg bench masked-attention --no-progress --dtype bf16 \
        --shape B=2,Q=200,H=128,W=256,density=0.3 --shape B=2,Q=200,H=128,W=256,density=0.05 \
        --shape B=2,Q=200,H=128,W=256,density=1.0 --shape B=8,Q=100,H=64,W=64,density=0.3 \
        --out "$OUT/masked_attention.json"
    run timeout 150 python3 -m fastseg memprof --no-progress --queries 100,200 \
        --resolutions 512x512,1024x2048 --batch 2 --budget 80GB --plot "$OUT/memprof.png" --out "$OUT/memprof.json"
    ;;
convs)
    run timeout 200 python3 benchmarks/bench_msca_kernel.py --formats nchw --batch 16 --dtype bf16 \
        --impls fused,eager \
        --shapes T.s1@512,B.s1@512x683,T.s3@512 --out "$OUT/msca.json"
    run timeout 150 python3 benchmarks/bench_context_cluster_kernel.py --stages 0,2 --batch 64 --dtype bf16 \
        --out "$OUT/context_cluster.json"
    FASTSEG_AUTOTUNE=0 run timeout 150 python3 -m pytest -q -p no:warnings tests/test_context_cluster.py tests/test_msca.py
    ;;
*) echo "usage: $0 attention|convs" >&2; exit 2 ;;
esac
