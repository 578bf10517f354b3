#!/usr/bin/env bash
# SegNeXt MSCA / MSCAN GPU sweep (issue 4) in one command; results (JSON after every case, CSV, PNG) go to
# ${OUT:-benchmarks/results/msca-sweep}. Errors and out-of-memory cases are recorded as rows; the sweep goes on.
#   bash benchmarks/msca_sweep.sh              # both parts (hours with every torch.compile baseline)
#   bash benchmarks/msca_sweep.sh module       # MSCA module: every MSCAN-T/B stage at 512x512 (B=16),
#                                              # 1024x1024 (B=8), 512x683 (B=16) x fp32/fp16/bf16 x NCHW/channels_last,
#                                              # fused vs eager (cuDNN) / channels_last eager / torch.compile,
#                                              # peak memory, forward roofline (bandwidth + compute floors)
#   bash benchmarks/msca_sweep.sh models       # MSCAN-T/B training step (fwd+bwd) and eval forward at the same
#                                              # image sizes: fused=True, fused='all', eager, torch.compile
# Split further by hand, e.g.  python benchmarks/bench_msca_kernel.py --sweep full --dtypes bf16 --formats cl \
#   --shapes T.s1@512,T.s2@512 --out part.json   (see --help).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/msca-sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
rc=0
if [ "$what" = all ] || [ "$what" = module ]; then
    python benchmarks/bench_msca_kernel.py --sweep full --out "$OUT/msca_module.json" 2>&1 | tee "$OUT/msca_module.log" \
        || rc=1
fi
if [ "$what" = all ] || [ "$what" = models ]; then
    python -m fastseg bench mscan --preset full --dtype bf16,fp16,fp32 --mode both --no-progress \
        --out "$OUT/bench_mscan" --plot "$OUT/bench_mscan.png" 2>&1 | tee "$OUT/bench_mscan.log" || rc=1
fi
case "$what" in all|module|models) ;; *) echo "usage: $0 [all|module|models]" >&2; exit 2 ;; esac
exit $rc
