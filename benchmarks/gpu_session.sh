#!/usr/bin/env bash
# One short GPU session (about 5 minutes on an H100): GPU correctness of the kernels, then benchmark
# tables for every op at real shapes, a memory profile, into ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu_session.sh            (after: pip install --no-build-isolation --no-deps -e .)
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu_session.log"
run() { echo "### $*" | tee -a "$log"; "$@" 2>&1 | grep -v -i "warn" | tee -a "$log" | tail -40; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
FASTSEG_AUTOTUNE=0 run timeout 70 python3 -m pytest -q -p no:warnings tests/test_context_cluster.py tests/test_msca.py
run timeout 100 python3 -m fastseg bench masked-attention --no-progress --dtype bf16 \
    --shape B=2,Q=200,H=128,W=256,density=0.3 --shape B=2,Q=200,H=128,W=256,density=0.05 \
    --shape B=2,Q=200,H=128,W=256,density=1.0 --shape B=8,Q=100,H=64,W=64,density=0.3 \
    --out "$OUT/masked_attention.json"
run timeout 50 python3 -m fastseg bench context-cluster --no-progress --dtype bf16 \
    --shape B=64,dim=32,H=56,W=56,proposal=2,fold=8,heads=4,head_dim=24 \
    --shape B=64,dim=196,H=14,W=14,proposal=2,fold=2,heads=8,head_dim=24 \
    --out "$OUT/context_cluster.json"
run timeout 50 python3 -m fastseg bench msca --no-progress --dtype bf16 \
    --shape B=16,C=32,H=128,W=128 --shape B=16,C=160,H=32,W=32 --shape B=16,C=32,H=128,W=171 \
    --out "$OUT/msca.json"
run timeout 35 python3 -m fastseg memprof --no-progress --queries 100,200 --resolutions 512x512,1024x2048 --batch 2 \
    --budget 80GB --plot "$OUT/memprof.png" --out "$OUT/memprof.json"
