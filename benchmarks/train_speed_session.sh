#!/usr/bin/env bash
# One call on a lent single-GPU machine (issue #22 item 5): train() beside the benchmark harness at the SwiFT v1
# reference configuration (51M, patch 6x6x6x1, windows 4x4x4x4, 96^3 x 20, batch 16, bf16 autocast), and the
# bf16-residual decision from a paired loss comparison (same seed, data order and masks; 250 steps each).
#   train_bf16res: train() with the product defaults (regional compile, CUDA graphs for the small stages, fused
#                  AdamW) and SwiftConfig.bf16_residual=True, fed by the HDF5 loader with 8 workers
#   harness:       benchmarks/swift_benchmark.py select-cgs (the harness ceiling, synthetic input on the device)
#   train_fp32res: train() as train_bf16res with the float32 residual stream
#   loader_rate:   the product loader alone (benchmarks/loader_rate.py) at 2/4/8/14 workers, and CPU per window
# Usage (device tool, no carry needed: torch, h5py and the loader's codecs are in the image):
#   bash benchmarks/train_speed_session.sh            -> $OUT/{train_bf16res,harness,train_fp32res}.json, session.log
set -uo pipefail
# hdf5plugin (the loader's LZ4 filter) comes from the carried bundle (../shared/tools/gpu-bundle.sh .gpubundle)
if [[ -f .gpubundle/pydeps.tar.xz && ! -d /tmp/site/hdf5plugin ]]; then
  mkdir -p /tmp/site && tar -xJf .gpubundle/pydeps.tar.xz -C /tmp/site
fi
[[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# or only hdf5plugin, unpacked and stripped to its LZ4/Zstd/Blosc/bitshuffle filters (3 MiB)
[[ -d .gpubundle/h5site ]] && export PYTHONPATH=$PWD/.gpubundle/h5site${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/neurox_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpucache/inductor-train}
log=$OUT/session.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; nproc; } 2>&1 | tee -a "$log"
V1='"patch_size":[6,6,6,1],"window_size":[4,4,4,4],"mask_patch_size":[12,12,12,2]'
COHORT=${COHORT:-/tmp/neurox_cohort96}
STEPS=${STEPS:-240}
echo "== cohort $(date +%T)" | tee -a "$log"
python3 benchmarks/make_cohort96.py "$COHORT" 2>&1 | tail -2 | tee -a "$log"
echo "== loader $(date +%T)" | tee -a "$log"
timeout 90 python3 benchmarks/loader_rate.py --manifest "$COHORT/manifest.parquet" --workers 4 8 14 --batches 30 \
  --out "$OUT/loader_rate.json" 2>&1 | tail -6 | tee -a "$log"
common=(--size 51M --mode weak --micro-batch 16 --dist ddp --compile --T 20 --log-every 10 --lr 1e-3 --warmup-frac 0.1
        --eval-windows 2 --data hdf5 --manifest "$COHORT/manifest.parquet" --loader-workers 8 --steps "$STEPS" --warmup 10)
run_train() {  # name, overrides JSON body
  echo "== $1 $(date +%T)" | tee -a "$log"
  timeout "${TRAIN_S:-230}" python3 benchmarks/train_scaling.py "${common[@]}" --overrides "{$2}" --out "$OUT/$1.json" \
    2>&1 | grep -v -i -E "warn|detach" | tail -4 | cut -c1-1500 | tee -a "$log"
}
run_train train_bf16res "$V1,\"bf16_residual\":true"
run_train train_fp32res "$V1"
echo "== harness $(date +%T)" | tee -a "$log"
timeout "${HARNESS_S:-200}" python3 benchmarks/swift_benchmark.py --suite target --batches 16 --compile block-cgs --sdpa cudnn \
  --attn-impl auto --bf16-residual --select --steps 20 --warmup 3 --out "$OUT/harness.json" 2>&1 \
  | grep -v -i -E "warn|detach|row\[" | tail -3 | cut -c1-1500 | tee -a "$log"
echo "== done $(date +%T)" | tee -a "$log"
