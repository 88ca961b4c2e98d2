#!/usr/bin/env bash
# session 17: the tile backward of the fused scan on an H100: accuracy at the model's shapes, every config's time,
# then train() 91M (bg on, mb4) with the old default config and the fastest one
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name --format=csv,noheader
NEUROMAMBA_SCAN_CONFIG=4 timeout 110 python3 benchmarks/mamba_scan_benchmark.py --out $OUT/chk4 --sections check --budget-s 90 2>&1 | grep -v -i warn | tail -3
python3 -c "import json; r=json.load(open('$OUT/chk4/mamba_scan_benchmark.json'))['sections']['check']; print('check', r.get('fused_ok'), r.get('worst_over_tolerance'))"
timeout 150 python3 benchmarks/mamba_scan_benchmark.py --out $OUT/scan --sections scan --budget-s 120 2>&1 | grep -v -i warn | tail -2
best=$(python3 -c "
import json; r=json.load(open('$OUT/scan/mamba_scan_benchmark.json'))['sections']['scan']
for k, v in r.items():
    if isinstance(v, dict): print(k, v.get('fwd_ms'), v.get('fwd_bwd_ms'), v.get('error', '')[:200], file=__import__('sys').stderr)
print(r['best_fused'][5:])")
echo "best=$best"
for k in $best 2; do
  NEUROMAMBA_SCAN_CONFIG=$k timeout 100 python3 benchmarks/train_scaling.py --family neuromamba --size 91M --mode weak \
    --micro-batch 4 --dist ddp --zero 0 --compile --T 20 --log-every 1 --eval-windows 0 --data preloaded --steps 8 \
    --warmup 3 --overrides '{"remove_background": true}' --out $OUT/m91_cfg$k.json > $OUT/m91_cfg$k.log 2>&1
  python3 -c "import json; d=json.load(open('$OUT/m91_cfg$k.json')); print('cfg $k', round(d['samples_per_s'],2), round(d['tflops_per_gpu'],1), round(d['peak_mem_gib'],2), d['train_loss_all'][-1])" || tail -3 $OUT/m91_cfg$k.log
done
