export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
NEUROMAMBA_SCAN_CONFIG=4 timeout 110 python3 benchmarks/mamba_scan_benchmark.py --out $OUT/chk4 --sections check --budget-s 90 2>&1 | grep -v -i warn | grep -i tolerance
k=4
NEUROMAMBA_SCAN_CONFIG=$k timeout 150 python3 benchmarks/train_scaling.py --family neuromamba --size 91M --mode weak \
    --micro-batch 4 --dist ddp --zero 0 --compile --T 20 --log-every 1 --eval-windows 0 --data preloaded --steps 8 \
    --warmup 3 --overrides '{"remove_background": true}' --out $OUT/m91_cfg$k.json > $OUT/m91_cfg$k.log 2>&1
python3 -c "import json; d=json.load(open('$OUT/m91_cfg$k.json')); print('cfg $k', round(d['samples_per_s'],2), round(d['tflops_per_gpu'],1), round(d['peak_mem_gib'],2), d['train_loss_all'][-1])" || tail -3 $OUT/m91_cfg$k.log
