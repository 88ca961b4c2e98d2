#!/usr/bin/env bash
# One call on a lent single-GPU machine for the open GPU targets (issues #22 and #24), stage by stage, each under
# its own time limit so that one slow stage cannot eat the call. Results -> $OUT (JSON per stage, session.log).
#   mamba         the fused selective scan beside the chunked scan: accuracy against float64, one layer's time,
#                 the 3.1M model's train steps with each, a profile, compiled blocks (benchmarks/mamba_scan_benchmark.py)
#   scan-cands    one layer's scan only (check + time, 20 repetitions), with the launch configurations of SCAN_CANDIDATES
#                 (a JSON list; default: the 1-warp shapes benchmarks/scan_sass.py counts fewer instructions for)
#                 checked against float64 and timed beside CONFIGS and the chunked scan
#   train51       train() at the SwiFT v1 reference configuration (51M, patch 6x6x6x1, windows 4x4x4x4, 96^3 x 20,
#                 micro-batch 16, bf16 autocast), product defaults (regional compile, CUDA graphs for the small
#                 stages, fused AdamW, DDP at world 1), inputs preloaded on the device: the model's own rate
#   train51-bf16  the same with SwiftConfig.bf16_residual=True
#   harness       benchmarks/swift_benchmark.py select-cgs at the same configuration (the harness ceiling)
#   paired        the bf16-residual decision: train() with and without bf16_residual, same seed, data order and masks,
#                 on the HDF5 synthetic cohort, STEPS (250) steps each, both runs at once (their compiles overlap)
#   loader        the product loader alone at 8 workers, pin_memory on and off (is the one pinning thread the cap?)
#   hdf5-51       train() at the v1 configuration fed by the HDF5 loader (the synthetic 96^3 cohort, HDF5_WORKERS
#                 loader workers, default 8): how input-bound training is with the product loader
#   train51-prof  train51 with a torch.profiler window of 10 steps (kernel and CPU tables under $OUT/prof51)
#   harness-fp32  the harness at the same configuration with the float32 residual stream (train()'s default)
#   preset51      the ladder --site polaris preset's 51M run re-planned for this H100, launched through
#                 study/scaling_law.py (benchmarks/preset_run.py; Ray etc. from gpu-bundle.sh on PYTHONPATH)
#   mamba-sizes   NeuroMamba's ladder sizes (MAMBA_SIZES) through train(), compiled, preloaded, with background
#                 removal on and off (MAMBA_BG), each at the micro-batch the run planner picks for 8 samples per
#                 H100; MAMBA_PROBES="size:on|off:mb ..." adds runs at a chosen micro-batch (the memory model's check)
#   mamba2        the 91M ladder size with the Mamba-2 mixer (SSD in matmul form) beside Mamba-1, through train() as
#                 mamba-sizes does (background removal on, micro-batch 4): SSD forms (NEUROMAMBA_SSD seg / segsum),
#                 head dims 32/64, chunks 64/128, micro-batch 8; MAMBA2_RUNS overrides the list
#                 ("name|NEUROMAMBA_SSD|micro-batch|overrides JSON" per line)
#   prof91        a torch.profiler window over the 91M Mamba-1 step (kernel and CPU tables under $OUT/prof91)
# Usage (device tool; carry .gpubundle for hdf5plugin):  bash benchmarks/gpu_targets_session.sh mamba train51
set -uo pipefail
OUT=${OUT:-/tmp/neurox_out}
mkdir -p "$OUT"
[[ -d .gpubundle/h5site ]] && export PYTHONPATH=$PWD/.gpubundle/h5site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
log=$OUT/session.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; nproc; } 2>&1 | tee -a "$log"
V1='"patch_size":[6,6,6,1],"window_size":[4,4,4,4],"mask_patch_size":[12,12,12,2]'
CANDS='[{"T_CHUNK":256,"BLOCK_E":16,"num_warps":1},{"T_CHUNK":256,"BLOCK_E":32,"num_warps":1},{"T_CHUNK":128,"BLOCK_E":32,"num_warps":1},{"T_CHUNK":512,"BLOCK_E":32,"num_warps":1},{"T_CHUNK":256,"BLOCK_E":32,"num_warps":2},{"T_CHUNK":128,"BLOCK_E":16,"num_warps":1}]'
COHORT=${COHORT:-/tmp/neurox_cohort96}
STEPS=${STEPS:-250}
speed=(--size 51M --mode weak --micro-batch 16 --dist ddp --compile --T 20 --log-every 10 --eval-windows 0
       --data preloaded --steps "${SPEED_STEPS:-80}" --warmup 10)
cohort() {
  [[ -f "$COHORT/manifest.parquet" ]] && return 0
  echo "== cohort $(date +%T)" | tee -a "$log"
  python3 benchmarks/make_cohort96.py "$COHORT" 2>&1 | tail -2 | tee -a "$log"
}
quiet() { grep -v -i -E "warn|detach|row\[" | cut -c1-1500; }
mamba_run() {  # dir name size micro-batch overrides-JSON timeout-s steps [extra train_scaling args]: NeuroMamba
  # through train(), compiled, preloaded (the SSD form from $NEUROMAMBA_SSD; prefix the call to choose it)
  local dir=$1 name=$2 size=$3 mb=$4 ov=$5 to=$6 steps=$7; shift 7
  mkdir -p "$dir"
  echo "-- $name size=$size mb=$mb ssd=${NEUROMAMBA_SSD:-seg} $ov $(date +%T)" | tee -a "$log"
  timeout "$to" python3 benchmarks/train_scaling.py --family neuromamba --size "$size" --mode weak --micro-batch "$mb" \
    --dist ddp --zero 0 --compile --T 20 --log-every 1 --eval-windows 0 --data preloaded --steps "$steps" --warmup 3 \
    --overrides "$ov" --out "$dir/$name.json" "$@" >"$dir/$name.log" 2>&1
  echo "   rc=$? $(python3 -c "import json; d = json.load(open('$dir/$name.json'))
print(round(d['samples_per_s'], 2), 'samples/s', round(d['tflops_per_gpu'], 1), 'TFLOP/s', round(d['peak_mem_gib'], 2), 'GiB')" \
    2>/dev/null || quiet <"$dir/$name.log" | tail -2)" | tee -a "$log"
}
M2='"remove_background": true, "mixer": "mamba2"'
MAMBA2_RUNS=${MAMBA2_RUNS:-"m1|seg|4|{\"remove_background\": true}
m2_q64_hd64|seg|4|{$M2, \"scan_chunk\": 64, \"headdim\": 64}
m2_q64_hd64_segsum|segsum|4|{$M2, \"scan_chunk\": 64, \"headdim\": 64}
m2_q64_hd32|seg|4|{$M2, \"scan_chunk\": 64, \"headdim\": 32}
m2_q128_hd64|seg|4|{$M2, \"scan_chunk\": 128, \"headdim\": 64}
m2_q64_hd64_mb8|seg|8|{$M2, \"scan_chunk\": 64, \"headdim\": 64}"}
for s in ${*:-mamba train51}; do
  echo "== $s $(date +%T)" | tee -a "$log"
  case $s in
    mamba)
      timeout "${MAMBA_S:-250}" python3 benchmarks/mamba_scan_benchmark.py --out "$OUT/mamba" \
        --budget-s "${MAMBA_BUDGET_S:-190}" 2>&1 | quiet | tail -25 | tee -a "$log" ;;
    scan-cands)
      timeout "${MAMBA_S:-250}" python3 benchmarks/mamba_scan_benchmark.py --out "$OUT/scan_cands" --sections check,scan \
        --reps 20 --budget-s "${MAMBA_BUDGET_S:-190}" --candidates "${SCAN_CANDIDATES:-$CANDS}" 2>&1 | quiet | tail -25 \
        | tee -a "$log" ;;
    train51)
      timeout "${TRAIN_S:-330}" python3 benchmarks/train_scaling.py "${speed[@]}" --overrides "{$V1}" \
        --out "$OUT/train51.json" 2>&1 | quiet | tail -6 | tee -a "$log" ;;
    train51-bf16)
      timeout "${TRAIN_S:-330}" python3 benchmarks/train_scaling.py "${speed[@]}" \
        --overrides "{$V1,\"bf16_residual\":true}" --out "$OUT/train51_bf16.json" 2>&1 | quiet | tail -6 | tee -a "$log" ;;
    harness)
      timeout "${HARNESS_S:-200}" python3 benchmarks/swift_benchmark.py --suite target --batches 16 --compile block-cgs \
        --sdpa cudnn --attn-impl auto --bf16-residual --select --steps 20 --warmup 3 --out "$OUT/harness.json" 2>&1 \
        | quiet | tail -3 | tee -a "$log" ;;
    paired)
      cohort
      common=(--size 51M --mode weak --micro-batch 16 --dist ddp --compile --T 20 --log-every 10 --lr 1e-3
              --warmup-frac 0.1 --eval-windows 2 --data hdf5 --manifest "$COHORT/manifest.parquet" --loader-workers 7
              --steps "$STEPS" --warmup 10)
      for v in fp32res bf16res; do
        ov="{$V1}"; [[ $v == bf16res ]] && ov="{$V1,\"bf16_residual\":true}"
        timeout "${PAIRED_S:-420}" python3 benchmarks/train_scaling.py "${common[@]}" --overrides "$ov" \
          --out "$OUT/paired_$v.json" >"$OUT/paired_$v.log" 2>&1 &
      done
      wait
      for v in fp32res bf16res; do echo "-- $v"; quiet <"$OUT/paired_$v.log" | tail -4; done | tee -a "$log" ;;
    loader)
      cohort
      timeout "${LOADER_S:-120}" python3 benchmarks/loader_rate.py --manifest "$COHORT/manifest.parquet" --workers 8 \
        --pin both --batches 30 --out "$OUT/loader_rate.json" 2>&1 | tail -4 | tee -a "$log" ;;
    hdf5-51)
      cohort
      timeout "${TRAIN_S:-330}" python3 benchmarks/train_scaling.py "${speed[@]/preloaded/hdf5}" --overrides "{$V1}" \
        --manifest "$COHORT/manifest.parquet" --loader-workers "${HDF5_WORKERS:-8}" --out "$OUT/hdf5_51.json" 2>&1 \
        | quiet | tail -3 | cut -c1-900 | tee -a "$log" ;;
    train51-prof)
      timeout "${TRAIN_S:-330}" python3 benchmarks/train_scaling.py "${speed[@]}" --overrides "{$V1}" \
        --profile-dir "$OUT/prof51" --out "$OUT/train51_prof.json" 2>&1 | quiet | tail -3 | tee -a "$log" ;;
    harness-fp32)
      timeout "${HARNESS_S:-200}" python3 benchmarks/swift_benchmark.py --suite target --batches 16 --compile block-cgs \
        --sdpa cudnn --attn-impl auto --select --steps 20 --warmup 3 --out "$OUT/harness_fp32.json" 2>&1 \
        | quiet | tail -3 | tee -a "$log" ;;
    mamba-sizes)
      mkdir -p "$OUT/mamba_sizes"
      runs=()
      for bg in ${MAMBA_BG:-on off}; do
        for size in ${MAMBA_SIZES:-1.4M 3.1M 12M 41M 91M}; do
          mb=$(python3 -c "
from study.spec import RunSpec; from study.planner import plan_run
s = RunSpec(study='b', family='neuromamba', size='$size', grid=(96,) * 3, sequence_length=20, batch_size=8,
            budget=10, precision='bf16', model_overrides={'remove_background': '$bg' == 'on'})
print(plan_run(s, 'H100', workers=1)[1].micro_batch)" 2>/dev/null)
          runs+=("$size:$bg:${mb:-1}")
        done
      done
      for r in "${runs[@]}" ${MAMBA_PROBES:-}; do
        IFS=: read -r size bg mb <<<"$r"
        b=false; [[ $bg == on ]] && b=true
        mamba_run "$OUT/mamba_sizes" "${size}_bg${bg}_mb$mb" "$size" "$mb" "{\"remove_background\": $b}" \
          "${MSIZE_S:-120}" "${MAMBA_STEPS:-6}"
      done ;;
    preset51)  # the ladder preset's 51M run through study/scaling_law.py (benchmarks/preset_run.py), HDF5 loader;
      # needs Ray, DeepSpeed, Optuna and mup: ../shared/tools/gpu-bundle.sh's pydeps.tar.xz unpacked on PYTHONPATH
      cohort; rm -rf /tmp/nxpreset
      NEUROX_PRESET_STEPS=${PRESET_STEPS:-300} timeout "${PRESET_S:-280}" python3 study/scaling_law.py \
        --preset benchmarks.preset_run:ladder_run --manifest "$COHORT/manifest.parquet" --device-kind h100-80gb \
        --cpus-per-device "${PRESET_CPUS:-8}" --storage /tmp/nxpreset --study-name p51 --no-report >"$OUT/preset51.log" 2>&1
      echo "study rc $?" | tee -a "$log"
      python3 benchmarks/preset_run.py --storage /tmp/nxpreset --study-name p51 --out "$OUT/preset51.json" 2>&1 \
        | tail -2 | cut -c1-600 | tee -a "$log" ;;
    mamba2)
      while IFS='|' read -r name ssd mb ov; do
        [[ -n $name ]] && NEUROMAMBA_SSD=$ssd mamba_run "$OUT/m91" "$name" 91M "$mb" "$ov" "${M91_S:-150}" "${MAMBA_STEPS:-8}"
      done <<<"$MAMBA2_RUNS" ;;
    prof91)
      mamba_run "$OUT/m91" prof91 91M 4 '{"remove_background": true}' "${M91_S:-150}" "${MAMBA_STEPS:-8}" \
        --profile-dir "$OUT/prof91"
      head -45 "$OUT"/prof91/*.txt 2>/dev/null | cut -c1-200 | tee -a "$log" ;;
    *) echo "unknown stage $s" | tee -a "$log" ;;
  esac
done
echo "== done $(date +%T)" | tee -a "$log"
