#!/usr/bin/env bash
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; log=$OUT/session.log
t0=$(date +%s)
mkdir -p /tmp/site; [[ -d /tmp/site/ray ]] || tar -xJf .gpubundle/deps/pydeps.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache COHORT=/tmp/neurox_cohort96
[[ -f $COHORT/manifest.parquet ]] || python3 benchmarks/make_cohort96.py $COHORT 2>&1 | tail -1
echo "== scan $(date +%T)" | tee -a "$log"
timeout 200 python3 benchmarks/mamba_scan_benchmark.py --out "$OUT/mamba" --sections scan --reps 10 --budget-s 150 2>&1 \
  | grep -v -i warn | tail -20 | tee -a "$log"
python3 -c "
import json,glob
f=glob.glob('$OUT/mamba/*.json'); r=json.load(open(f[0]))
s=r['sections'].get('scan',{})
for k,v in s.items():
    if isinstance(v,dict) and 'fwd_bwd_ms' in v: print(k, v.get('config'), 'fwd', round(v['fwd_ms'],3), 'fwd+bwd', round(v['fwd_bwd_ms'],3), 'peak', v.get('peak_gib'))
    elif isinstance(v,dict): print(k, v)
" 2>&1 | tee -a "$log"
echo "== study $(date +%T)" | tee -a "$log"; ts=$(date +%s); rm -rf /tmp/st
NEUROX_PRESET_STEPS=300 timeout 280 python3 study/scaling_law.py --preset benchmarks.preset_run:ladder_run \
  --manifest $COHORT/manifest.parquet --device-kind h100-80gb --cpus-per-device 8 --storage /tmp/st --study-name p51 \
  --no-report > "$OUT/study.log" 2>&1
echo "study rc $? wall $(( $(date +%s) - ts )) s" | tee -a "$log"
grep -v -i warn "$OUT/study.log" | grep -E "done [0-9]|rror" | tail -4 | cut -c1-300 | tee -a "$log"
python3 benchmarks/preset_run.py --storage /tmp/st --study-name p51 --out "$OUT/preset51.json" 2>&1 | tail -3 | tee -a "$log"
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$log"
