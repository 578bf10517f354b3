#!/usr/bin/env bash
# Context Clusters GPU sweep (issue 5), one command:
#
#   python3 -m pip install --no-build-isolation --no-deps -e .      # once, on the GPU machine
#   bash benchmarks/context_cluster_sweep.sh                 # every step below, every dtype
#   DTYPES=bf16 bash benchmarks/context_cluster_sweep.sh module-224   # a part (e.g. to fit a 10-minute call)
#
# Steps (each dtype of $DTYPES is a separate command under `timeout $LIMIT`, default 540 s):
#   module-224  fastseg.nn.ContextCluster vs the eager reference Cluster vs torch.compile(Cluster), forward
#               (inference) and forward+backward, time and peak memory, at the four stage shapes of coc_tiny
#               (batch 128) and coc_medium (batch 64) at 224x224 (`fastseg bench context-cluster --preset
#               imagenet`; PRESET224=full adds batch 64 / 128 of each model and the 512 shapes to this step)
#   module-512  the same at a 512x512 segmentation input (coc_tiny and coc_medium stages, batch 16; preset ade)
#   model       a whole coc_tiny training step (forward + backward of all parameters; fp16/bf16 under autocast
#               with fp32 weights), fused model vs eager vs torch.compile, batch 128 at 224x224
#   tests       the context-cluster and CoC tests on the GPU (fp32 against the reference)
#
# A failing case (torch.compile failing inside Inductor, e.g. the bf16 adaptive_avg_pool2d backward of the
# reference on torch 2.11; out of memory) is a row with status error/OOM and the sweep goes on; every
# command writes its CSV/JSON after each case, so a step cut by its time limit keeps what it measured.
# Results: ${OUT:-benchmarks/results/context-cluster-sweep}/{module_224,module_512,model}_<dtype>.{csv,json,png}, sweep.log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/context-cluster-sweep}
DTYPES=${DTYPES:-fp16,bf16,fp32}
LIMIT=${LIMIT:-540}
PRESET224=${PRESET224:-imagenet}
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-200}
mkdir -p "$OUT"
log="$OUT/sweep.log"
failed=()
run() {
    echo "### $(date -u +%FT%TZ) $*" | tee -a "$log"
    timeout "$LIMIT" "$@" 2>&1 | grep -v -E "Warning: |warnings.warn\(" | tee -a "$log" | tail -40
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "--- rc=$rc: $*" | tee -a "$log"; failed+=("$* (rc=$rc)"); }
}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(module-224 module-512 model tests)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
for step in "${steps[@]}"; do
    for d in ${DTYPES//,/ }; do
        case "$step" in
        module-224) run python3 -m fastseg bench context-cluster --preset "$PRESET224" --dtype "$d" --mode both \
                        --no-progress --out "$OUT/module_224_$d" --plot "$OUT/module_224_$d.png" ;;
        module-512) run python3 -m fastseg bench context-cluster --preset ade --dtype "$d" --mode both \
                        --no-progress --out "$OUT/module_512_$d" --plot "$OUT/module_512_$d.png" ;;
        model) run python3 -m fastseg bench coc --shape model=tiny,B=128,H=224,W=224 --dtype "$d" --mode fwdbwd \
                   --no-progress --out "$OUT/model_$d" --plot "$OUT/model_$d.png" ;;
        tests) FASTSEG_AUTOTUNE=0 run python3 -m pytest -q -p no:warnings tests/test_context_cluster.py \
                   tests/test_coc.py
               break ;;  # the tests choose their own dtypes
        *) echo "unknown step '$step' (module-224, module-512, model, tests)" >&2; exit 2 ;;
        esac
    done
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'non-zero exit (a case with status error, a crash, or rc=124: the time limit): %s\n' "${failed[@]}" | tee -a "$log"
    exit 1
fi
echo "results in $OUT" | tee -a "$log"
