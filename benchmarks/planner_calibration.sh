#!/usr/bin/env bash
# Measured peak memory and samples/s of train() per (size, micro-batch, compile, checkpointing) on one GPU: the rows
# the run planner's memory model is checked against and its throughput table is read from (study/planner.py).
# Usage (on a GPU machine; writes OUT/calibration_<mode>.jsonl, one row per configuration, and a log):
#   OUT=/tmp/cal bash benchmarks/planner_calibration.sh eager|compiled
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-eager}
out=${OUT:?set OUT}
tmp=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
run() {  # size micro compile(0/1) ckpt(0/1)
  local size=$1 micro=$2 comp=$3 ckpt=$4 tag="$1_mb$2_c$3_k$4"
  local ov='{}'; [[ $ckpt == 1 ]] && ov='{"use_checkpoint": true}'
  local extra=(); [[ $comp == 1 ]] && extra+=(--compile)
  local t0=$(date +%s)
  timeout 420 python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py \
    --size "$size" --mode weak --micro-batch "$micro" --dist ddp --warmup 3 --steps 6 --data preloaded \
    --overrides "$ov" --out "$tmp/$tag.json" "${extra[@]}" > "$tmp/$tag.log" 2>&1
  local rc=$?
  { echo "== $tag rc=$rc"; tail -40 "$tmp/$tag.log"; } >> "$out/calibration_$mode.log"
  [[ -f $tmp/$tag.json ]] && python -c "import json,sys;d=json.load(open('$tmp/$tag.json'));d['checkpointing']=bool($ckpt);print(json.dumps(d))" >> "$out/calibration_$mode.jsonl"
  echo "$tag rc=$rc $(( $(date +%s) - t0 ))s $(python -c "import json;d=json.load(open('$tmp/$tag.json'));print(round(d['samples_per_s'],1),'samples/s',round(d['peak_mem_gib'],2),'GiB')" 2>/dev/null || tail -3 "$tmp/$tag.log")"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $mode == eager ]]; then
  run 51M 16 0 0; run 51M 32 0 0; run 202M 16 0 0; run 806M 4 0 0; run 806M 8 0 0; run 3B 2 0 0; run 3B 4 0 0; run 3B 8 0 1
else
  run 51M 16 1 0; run 51M 32 1 0; run 806M 4 1 0; run 806M 8 1 0
fi
