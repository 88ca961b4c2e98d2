#!/usr/bin/env bash
# One call on a lent multi-GPU machine: unpack the carried Python deps, then run the training
# scaling matrix (1/2/4 GPUs, strong + weak) and the 16-worker loader benchmark. Results -> $OUT.
# Usage (device tool): carry .gpubundle and .whl; command: bash benchmarks/gpu_session.sh [stages...]
# Stages: scaling loader input (default: all three).
set -uo pipefail
OUT=${OUT:-/tmp/neurox_out}
mkdir -p "$OUT" /tmp/site
if [[ -f .gpubundle/pydeps.tar.xz ]]; then tar -xJf .gpubundle/pydeps.tar.xz -C /tmp/site; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
stages=${*:-scaling loader input}
log=$OUT/session.log
for s in $stages; do
  case $s in
    scaling|scaling-51M|scaling-806M)
      sizes="51M 806M"; [[ $s == scaling-* ]] && sizes=${s#scaling-}
      steps="--steps 6 --warmup 2"; [[ $sizes == 51M ]] && steps="--steps 40 --warmup 10 --log-every 10"
      python3 benchmarks/train_scaling.py --driver --sizes $sizes $steps --micro-51m 8 --micro-806m 2 \
        --out-dir "$OUT/$s" --timeout 240 2>&1 | grep -v Warning | tee -a "$log" ;;
    loader)
      python3 benchmarks/loader_benchmark.py --root /tmp/nxload --grid 96 --subjects 16 --frames 60 \
        --workers 0 2 16 --out-json "$OUT/loader.json" --out-md "$OUT/loader.md" 2>&1 | tail -40 | tee -a "$log" ;;
    input)
      python3 -c "import sys; sys.path.insert(0,'.'); from benchmarks.train_scaling import ensure_cohort; print(ensure_cohort(__import__('pathlib').Path('/tmp/nxcohort'), 24, 60))" 2>&1 | tail -2 | tee -a "$log"
      for d in hdf5 preloaded; do
        python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py --size 51M \
          --mode weak --micro-batch 8 --steps 8 --warmup 3 --data $d --loader-workers 14 \
          --manifest /tmp/nxcohort/manifest.parquet --out "$OUT/input-$d.json" 2>&1 | tail -3 | tee -a "$log"
      done ;;
  esac
done
