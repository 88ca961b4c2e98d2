#!/usr/bin/env bash
# One call on a lent multi-GPU machine: unpack the carried Python deps, then run the training
# scaling matrix (1/2/4 GPUs, strong + weak) and the 16-worker loader benchmark. Results -> $OUT.
# Usage (device tool): carry .gpubundle and .whl; command: bash benchmarks/gpu_session.sh [stages...]
# Stages: scaling scaling-51M scaling-806M scaling-51M-compiled scaling-51M-zero0 overlap-51M weak-806M train-profile train-compile
# train-compile-zero train-flex train-defaults scaling-diag inline-gpu overhead loader input save-inductor-cache (default: scaling loader input).
# Compiled runs share one Inductor cache (/tmp/inductor-cache); a carried .gpucache/inductor.tar.xz (written by the
# save-inductor-cache stage of an earlier call, same torch/Triton and GPU model) seeds it, so ranks skip the ~3 min
# compile. Environment: MICRO_51M, STEPS_51M, GLOBAL_BATCH (strong mode), GPU_COUNTS, GC_EVERY (RunSpec.gc_every).
set -uo pipefail
OUT=${OUT:-/tmp/neurox_out}
mkdir -p "$OUT" /tmp/site
if [[ -f .gpubundle/pydeps.tar.xz ]]; then tar -xJf .gpubundle/pydeps.tar.xz -C /tmp/site; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
if [[ -f .gpucache/inductor.tar.xz ]]; then tar -xJf .gpucache/inductor.tar.xz -C /tmp && echo "inductor cache seeded: $(du -sh /tmp/inductor-cache | cut -f1)"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
stages=${*:-scaling loader input}
NG=$(nvidia-smi -L | wc -l)  # GPUs on this machine
OVERLAP='{"zero_optimization": {"overlap_comm": true, "contiguous_gradients": true}}'
scaling() {  # stage name, then train_scaling.py driver arguments; per-run files stay in /tmp, the table comes back
  local name=$1; shift
  python3 benchmarks/train_scaling.py --driver "$@" --micro-51m "${MICRO_51M:-8}" --micro-806m 2 --out-dir "/tmp/scal/$name" \
    ${GC_EVERY:+--gc-every $GC_EVERY} ${GLOBAL_BATCH:+--global-batch $GLOBAL_BATCH} --timeout "${SCALING_TIMEOUT:-240}" 2>&1 | grep -v Warning | tee -a "$log"
  cp "/tmp/scal/$name/train_scaling.json" "$OUT/$name.json" 2>/dev/null
}
log=$OUT/session.log
for s in $stages; do
  case $s in
    scaling|scaling-51M|scaling-806M)
      sizes="51M 806M"; [[ $s == scaling-* ]] && sizes=${s#scaling-}
      steps="--steps 6 --warmup 2"; [[ $sizes == 51M ]] && steps="--steps 30 --warmup 10 --log-every 10"
      scaling "$s" --sizes $sizes $steps ;;
    scaling-51M-compiled)  # the 51M matrix with compiled blocks and ZeRO-0 (the host-bound step's remedy; each
      # rank compiles ~3 min on a fresh machine, then Inductor's cache serves later runs)
      SCALING_TIMEOUT=480 scaling "$s" --sizes 51M --steps "${STEPS_51M:-30}" --warmup 10 --log-every 10 --compile \
        --zero 0 ${GPU_COUNTS:+--gpu-counts $GPU_COUNTS} ;;
    scaling-51M-zero0)  # the 51M matrix, eager, ZeRO-0; MICRO_51M=32 GLOBAL_BATCH=128 gives each GPU enough work per
      # micro-step to hide the host (session 5: 4 GPUs strong 95.8%, weak 97.1%; at 16 per GPU 81-99% run to run)
      scaling "$s" --sizes 51M --steps "${STEPS_51M:-30}" --warmup 10 --log-every 10 --zero 0 \
        ${GPU_COUNTS:+--gpu-counts $GPU_COUNTS} ;;
    overlap-51M)  # DeepSpeed reducing gradients during the backward pass, all GPUs (compare with scaling-51M's 1 GPU)
      scaling "$s" --sizes 51M --steps 30 --warmup 10 --log-every 10 --gpu-counts "$NG" --ds-config "$OVERLAP" ;;
    weak-806M)  # 806M weak scaling, 1 and all GPUs
      scaling "$s" --sizes 806M --modes weak --steps 6 --warmup 2 --gpu-counts 1 "$NG" ;;
    weak-806M-overlap)  # the same with DeepSpeed's overlapped reduction, all GPUs
      scaling "$s" --sizes 806M --modes weak --steps 6 --warmup 2 --gpu-counts "$NG" --ds-config "$OVERLAP" ;;
    train-profile)  # 1 GPU, 51M micro-batch 8: where a train() step goes (DeepSpeed ZeRO-1 profiled; DDP and ZeRO-0)
      for v in "deepspeed 1" "ddp 1" "deepspeed 0"; do
        set -- $v
        python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py --size 51M \
          --mode weak --micro-batch 8 --steps 12 --warmup 6 --dist "$1" --zero "$2" --out "/tmp/tp-$1-$2.json" \
          $([[ $v == "deepspeed 1" ]] && echo --profile-dir "$OUT") 2>&1 | grep '^{' | tee -a "$log"
      done ;;
    train-compile)  # 1 GPU, 51M micro-batch 8 through train(): eager vs RunSpec.compile (DDP, then DeepSpeed ZeRO-1)
      for v in "ddp" "ddp --compile" "deepspeed --compile"; do
        timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py \
          --size 51M --mode weak --micro-batch 8 --steps 20 --warmup 10 --log-every 10 --dist $v \
          --out "/tmp/tc.json" 2>&1 | grep '^{' | tee -a "$log"
      done ;;
    train-compile-zero)  # 1 GPU, 51M micro-batch 8 through train(), all compiled: DeepSpeed ZeRO-0 vs ZeRO-1 vs DDP
      for v in "deepspeed --zero 0" "deepspeed --zero 1" "ddp"; do
        timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py \
          --size 51M --mode weak --micro-batch 8 --steps 20 --warmup 10 --log-every 10 --compile --dist $v \
          --out "/tmp/tcz.json" 2>&1 | grep '^{' | tee -a "$log"
      done ;;
    train-flex)  # 1 GPU, 51M (v2 ladder) micro-batch 16 through train(), compiled, ZeRO-0: SDPA vs attn_impl=auto
      for a in sdpa auto; do
        timeout 330 python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py \
          --size 51M --mode weak --micro-batch 16 --steps 20 --warmup 10 --log-every 10 --compile --dist deepspeed \
          --zero 0 --attn-impl $a --out "/tmp/tf.json" 2>&1 | grep '^{' | tee -a "$log"
      done ;;
    train-defaults)  # 1 GPU, 51M (v2 ladder) micro-batch 16 through train(), compiled, ZeRO-0, the model's defaults
      # (token selection, fused head, FlexAttention): as is, with the bf16 residual, and with the fused MLP too
      # TRAIN_OVERRIDES: a '|'-separated list of the JSON overrides to run instead
      IFS='|' read -r -a overrides <<< "${TRAIN_OVERRIDES:-{\}|{\"bf16_residual\": true\}|{\"bf16_residual\": true, \"fused_mlp\": true\}}"
      for o in "${overrides[@]}"; do
        timeout "${TRAIN_S:-200}" python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/train_scaling.py \
          --size 51M --mode weak --micro-batch 16 --steps 20 --warmup 10 --log-every 10 --compile --dist deepspeed \
          --zero 0 --overrides "$o" --out "/tmp/td.json" 2>&1 | grep '^{' | tee -a "$log"
      done ;;
    scaling-diag)  # why all GPUs lose per-GPU rate on the 51M (eager, ZeRO-0, MICRO_51M per GPU, weak): GPU clocks
      # and power every second; each GPU's rate with all of them busy in independent 1-GPU runs (no collective);
      # kernel tables of every rank for 1 GPU and all GPUs (a rank waiting for a slower one shows it as
      # all-reduce time); then 1 GPU and all GPUs with RunSpec.gc_every (collector by hand, same step on all ranks)
      nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
        --format=csv -l 1 > "$OUT/smi.csv" 2>&1 & smi=$!
      one=(benchmarks/train_scaling.py --size 51M --mode weak --micro-batch "${MICRO_51M:-16}" --zero 0 --log-every 10)
      pids=(); for i in $(seq 0 $((NG - 1))); do
        CUDA_VISIBLE_DEVICES=$i timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 1 "${one[@]}" \
          --steps 30 --warmup 10 --out "/tmp/ind-$i.json" > "/tmp/ind-$i.log" 2>&1 & pids+=($!)
      done; wait "${pids[@]}"
      for i in $(seq 0 $((NG - 1))); do echo "independent GPU $i: $(python3 -c "import json; r=json.load(open('/tmp/ind-$i.json')); print(round(r['samples_per_s'],1), [round(x,1) for x in r['samples_per_s_all']])" 2>&1 | tail -1)" | tee -a "$log"; done
      for g in 1 "$NG"; do
        timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$g" "${one[@]}" --steps 30 --warmup 10 \
          --profile-dir /tmp/prof --profile-all-ranks --out "/tmp/prof-$g.json" 2>&1 | grep '^{' | tee -a "$log"
      done
      tar -czf "$OUT/profiles.tar.gz" -C /tmp prof
      for g in 1 "$NG"; do for gc in 0 10; do
        timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$g" "${one[@]}" --steps 40 --warmup 10 \
          --gc-every $gc --out "/tmp/gc-$g-$gc.json" 2>&1 | grep '^{' | cut -c1-400 | tee -a "$log"
        python3 -c "import json; r=json.load(open('/tmp/gc-$g-$gc.json')); print('gpus $g gc_every $gc windows', [round(x,1) for x in r['samples_per_s_all']])" | tee -a "$log"
      done; done
      kill $smi ;;
    save-inductor-cache)  # the compiled kernels of this call, for the next call to carry as .gpucache/inductor.tar.xz
      tar -I "xz -T0 -6" -cf "$OUT/inductor.tar.xz" -C /tmp inductor-cache && ls -la "$OUT/inductor.tar.xz" | tee -a "$log" ;;
    inline-gpu)  # the smoke-gpu study on this machine's GPUs: one-worker trials inline in reused Tune actors,
      # then the same plan with a TorchTrainer per trial; rows, devices and trial processes per launcher.
      # INLINE_CONCURRENT (default 1) caps trials at once, so that a multi-GPU host also reuses an actor for
      # a second DeepSpeed trial (session 5 on 4 GPUs ran the 3 trials at once: no reuse was exercised)
      for l in inline ray-train; do
        export NEUROX_TRACE_FILE=/tmp/trace-$l.jsonl; rm -f "$NEUROX_TRACE_FILE"; t0=$(date +%s)
        timeout 240 python3 study/scaling_law.py --preset smoke-gpu --storage /tmp/nxst --study-name "smoke-gpu-$l" \
          --trial-launcher $l --max-concurrent "${INLINE_CONCURRENT:-1}" --no-report 2>&1 | grep -E "launcher|done [0-9]|error|Error" | tail -6 | tee -a "$log"
        echo "$l: study wall $(( $(date +%s) - t0 )) s" | tee -a "$log"
        python3 -c "
from analysis.store import read_table; from study.trace import read
df = read_table('/tmp/nxst/smoke-gpu-$l/store', 'train')
print(df[['run_id', 'step', 'train_loss', 'val_loss', 'device_kind', 'device_count', 'is_final']].to_string())
m = [x for x in read('$NEUROX_TRACE_FILE') if x['what'] == 'train_start']
print('$l: train_start pids', [x['pid'] for x in m])" 2>&1 | tail -12 | tee -a "$log"
      done ;;
    overhead)  # trial orchestration overhead on this host's cores (CPU trials; the CPU box has 2 cores)
      timeout 290 python3 benchmarks/study_overhead.py --skip-asha --trials 3 --target-s 30 --variants inline ray-train+stage \
        --out /tmp/so 2>&1 | grep -v -i warn | tail -30 | tee -a "$log"
      cp /tmp/so/study_overhead.json "$OUT/overhead.json" 2>/dev/null; cp /tmp/so/study_overhead.md "$OUT/overhead.md" 2>/dev/null ;;
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
