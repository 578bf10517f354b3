#!/usr/bin/env bash
# One short GPU session (about 5 minutes on an H100, compiles included): benchmark tables for every op
# at real shapes and a memory profile into ${OUT:-benchmarks/results}, then the context-cluster GPU tests.
#   python3 -m pip install --no-build-isolation --no-deps -e . && bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu_session.log"
run() { echo "### $*" | tee -a "$log"; "$@" 2>&1 | grep -v -i "warn" | tee -a "$log" | tail -30; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
git log -1 --format="commit %H %cd" 2>/dev/null | tee -a "$log"
run timeout 110 python3 -m fastseg bench masked-attention --no-progress --dtype bf16 \
    --shape B=2,Q=200,H=128,W=256,density=0.3 --shape B=2,Q=200,H=128,W=256,density=0.05 \
    --shape B=2,Q=200,H=128,W=256,density=1.0 --shape B=8,Q=100,H=64,W=64,density=0.3 \
    --out "$OUT/masked_attention.json"
run timeout 65 python3 benchmarks/bench_context_cluster_kernel.py --stages 0,2 --batch 64 --dtype bf16 \
    --out "$OUT/context_cluster.json"
run timeout 70 python3 benchmarks/bench_msca_kernel.py --formats nchw --batch 16 --dtype bf16 \
    --shapes T.s1@512,B.s1@512x683,T.s3@512 --out "$OUT/msca.json"
run timeout 22 python3 -m fastseg memprof --no-progress --queries 100,200 --resolutions 512x512,1024x2048 \
    --batch 2 --budget 80GB --plot "$OUT/memprof.png" --out "$OUT/memprof.json"
