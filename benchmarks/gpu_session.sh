#!/usr/bin/env bash
# GPU measurements in two calls of under 9 minutes each on an H100 (first-time compiles included: the
# FlexAttention / torch.compile baselines take ~20 s per new shape, the MSCA backward kernel ~40 s per
# dtype and memory format). Results (JSON written after every case) go to ${OUT:-benchmarks/results}.
#   python3 -m pip install --no-build-isolation --no-deps -e .
#   bash benchmarks/gpu_session.sh attention      # masked attention table + memprof
#   bash benchmarks/gpu_session.sh convs          # MSCA and context cluster tables, their GPU tests
#   bash benchmarks/gpu_session.sh mask2former    # issue 7: decoder memprof, training step + inference
#   bash benchmarks/gpu_session.sh mask2former-model   # issue 7: whole Mask2Former + MSCAN-T, bench + memprof
#   bash benchmarks/gpu_session.sh maskformer     # issue 16: MaskFormer head, fused training path, bench + memprof
# (memprof/bench JSON is rewritten after every setting, so a call cut short keeps what it measured)
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
mask2former)
    # decoder (9 layers + heads + criterion), reference vs fused, bf16: training step over Q x input x batch
    # (B=2 first: 1024x2048 Q=200 is the target), then inference incl. semantic inference at the input size
    run timeout 330 python3 -m fastseg memprof --op mask2former-decoder --no-progress --dtype bf16 --mode fwdbwd \
        --queries 100,200,400,800 --resolutions 512x512,1024x1024,1024x2048 --batch 2,8,16 --budget 80GB \
        --out "$OUT/memprof_m2f_decoder_train" --plot "$OUT/memprof_m2f_decoder_train.png"
    run timeout 200 python3 -m fastseg memprof --op mask2former-decoder --no-progress --dtype bf16 --mode fwd \
        --queries 100,200,400 --resolutions 512x512,1024x1024,1024x2048 --batch 2 --budget 80GB \
        --out "$OUT/memprof_m2f_decoder_infer" --plot "$OUT/memprof_m2f_decoder_infer.png"
    ;;
mask2former-model)
    # whole model with an MSCAN-T backbone: bench (time + peak, train step and inference) and memprof
    run timeout 250 python3 -m fastseg bench mask2former --no-progress --dtype bf16 --preset default \
        --out "$OUT/bench_mask2former"
    run timeout 250 python3 -m fastseg memprof --op mask2former --no-progress --dtype bf16 --mode fwdbwd \
        --queries 100,200 --resolutions 512x512,1024x1024,1024x2048 --batch 2,8 --budget 80GB \
        --out "$OUT/memprof_m2f_model_train" --plot "$OUT/memprof_m2f_model_train.png"
    ;;
maskformer)
    # MaskFormer head (FPN + DETR decoder + full-resolution focal/dice criterion, R50-shaped features), reference
    # vs set_fused(True), bf16: kernel tests, bench (ADE20K 512² B=8, COCO 1024², Cityscapes 1024x2048 B=2), memprof
    FASTSEG_AUTOTUNE=0 run timeout 120 python3 -m pytest -q -p no:warnings tests/test_mask_loss.py
    run timeout 200 python3 -m fastseg bench maskformer --no-progress --dtype bf16 --preset default \
        --out "$OUT/bench_maskformer"
    run timeout 200 python3 -m fastseg memprof --op maskformer --no-progress --dtype bf16 --mode fwdbwd \
        --queries 100,200 --resolutions 512x512,1024x1024,1024x2048 --batch 2,8 --budget 80GB \
        --out "$OUT/memprof_maskformer_train" --plot "$OUT/memprof_maskformer_train.png"
    ;;
*) echo "usage: $0 attention|convs|mask2former|mask2former-model|maskformer" >&2; exit 2 ;;
esac
