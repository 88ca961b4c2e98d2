export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/mamba_scan_benchmark.py --out $OUT/scan3 --sections scan --budget-s 120 2>&1 | grep -v -i warn | tail -2
grep fused $OUT/scan3/mamba_scan_benchmark.md
