#!/usr/bin/env bash
# session 18 call 1: train() through the BufferRing (v1 config, HDF5, 4 and 8 workers) and the polaris preset's 51M
# run through study/scaling_law.py on one H100.
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; log=$OUT/session.log
t0=$(date +%s)
mkdir -p /tmp/site && tar -xJf .gpubundle/deps/pydeps.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
echo "unpacked in $(( $(date +%s) - t0 )) s" | tee -a "$log"
export COHORT=/tmp/neurox_cohort96
SPEED_STEPS=${SPEED_STEPS:-120} TRAIN_S=${TRAIN_S:-170} HDF5_WORKERS=4 bash benchmarks/gpu_targets_session.sh hdf5-51
mv "$OUT/hdf5_51.json" "$OUT/hdf5_51_w4.json" 2>/dev/null
echo "== study $(date +%T)" | tee -a "$log"
ts=$(date +%s)
NEUROX_PRESET_STEPS=${PRESET_STEPS:-300} timeout 300 python3 study/scaling_law.py --preset benchmarks.preset_run:ladder_run \
  --manifest $COHORT/manifest.parquet --device-kind h100-80gb --cpus-per-device 8 --storage /tmp/st --study-name p51 \
  --no-report > "$OUT/study.log" 2>&1
echo "study rc $? wall $(( $(date +%s) - ts )) s" | tee -a "$log"
grep -v -i warn "$OUT/study.log" | grep -E "mb x|swift_v2|samples/s|error|Error|done" | tail -12 | cut -c1-400 | tee -a "$log"
python3 benchmarks/preset_run.py --storage /tmp/st --study-name p51 --out "$OUT/preset51.json" 2>&1 | tail -3 | tee -a "$log"
left=$(( 560 - ($(date +%s) - t0) ))
echo "left $left s" | tee -a "$log"
if (( left > 200 )); then
  SPEED_STEPS=100 TRAIN_S=$((left - 20)) HDF5_WORKERS=8 bash benchmarks/gpu_targets_session.sh hdf5-51
  mv "$OUT/hdf5_51.json" "$OUT/hdf5_51_w8.json" 2>/dev/null
fi
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$log"
