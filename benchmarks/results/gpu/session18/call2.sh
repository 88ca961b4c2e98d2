#!/usr/bin/env bash
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; log=$OUT/session.log
t0=$(date +%s)
mkdir -p /tmp/site; [[ -d /tmp/site/ray ]] || tar -xJf .gpubundle/deps/pydeps.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache COHORT=/tmp/neurox_cohort96
[[ -f $COHORT/manifest.parquet ]] || python3 benchmarks/make_cohort96.py $COHORT 2>&1 | tail -1
echo "== study $(date +%T)" | tee -a "$log"; ts=$(date +%s); rm -rf /tmp/st
NEUROX_PRESET_STEPS=300 timeout 260 python3 study/scaling_law.py --preset benchmarks.preset_run:ladder_run \
  --manifest $COHORT/manifest.parquet --device-kind h100-80gb --cpus-per-device 8 --storage /tmp/st --study-name p51 \
  --no-report > "$OUT/study.log" 2>&1
echo "study rc $? wall $(( $(date +%s) - ts )) s" | tee -a "$log"
grep -v -i warn "$OUT/study.log" | grep -E "mb x|swift_v2|samples/s|rror|done" | tail -8 | cut -c1-400 | tee -a "$log"
python3 benchmarks/preset_run.py --storage /tmp/st --study-name p51 --out "$OUT/preset51.json" 2>&1 | tail -3 | tee -a "$log"
SPEED_STEPS=100 TRAIN_S=150 bash benchmarks/gpu_targets_session.sh train51 harness-fp32
left=$(( 575 - ($(date +%s) - t0) )); echo "left $left s" | tee -a "$log"
if (( left > 150 )); then
  SPEED_STEPS=100 TRAIN_S=$((left - 5)) HDF5_WORKERS=4 bash benchmarks/gpu_targets_session.sh hdf5-51
  mv "$OUT/hdf5_51.json" "$OUT/hdf5_51_w4.json" 2>/dev/null
fi
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$log"
