#!/usr/bin/env bash
# One call on a lent single-GPU machine: the SwiFT v2 speed/memory benchmarks of issue #3.
# Usage (device tool, no carry needed: torch is in the image): bash benchmarks/swift_gpu_session.sh [stages...]
# Stages: target (compiled + eager v1 reference config, b16/b8, two kernel profiles), attention (SDPA backends on
# the block shapes), cuda-graphs (compiled b16 with CUDA graphs and cuDNN attention), best-attention (compiled
# b16 with the fastest non-default backend, if any), revised (memory vs T of the factorized variant, eager, with
# and without activation checkpointing), ladder (sizes 51M..3B, eager), ladder-compiled, blocks (per-block fwd+bwd
# of every attention implementation + the FlexAttention numerics check: swift_blocks.py), flex (compiled b16 with
# CUDA graphs, attn_impl=auto: FlexAttention for stages 1-2, cuDNN for the rest), best (+ bf16 residual),
# baseline (session 3's best), regions (patch embedding / decoder + loss, dense vs token selection), check (GPU
# numerics: FlexAttention, token selection, fused head), select (token selection, CUDA graphs everywhere), select-cgs
# (the current defaults: token selection, fused Triton head, Triton window attention, the epilogue MLP kernels,
# CUDA graphs for the small stages only), select-cgs-torchhead (the same with the PyTorch head), fmlp-blocks (stage-1/2 blocks with and
# without the fused Triton MLP, 30-kernel profiles, and the numerics check of the fused MLP), select-cgs-fmlp
# (select-cgs with SwiftConfig.fused_mlp), attn-blocks (every window block under FlexAttention and the Triton window
# attention, profiled, after the kernel-level numerics checks), attn-check (the model numerics check with the Triton
# window attention, which attn_impl=auto runs), select-cgs-triton (select-cgs with attn_impl=triton), mlp-blocks
# (every block kind with the PyTorch MLP and with SwiftConfig.mlp_impl=epilogue, profiled, after the kernel-level
# numerics checks), mlp-check (the model numerics check with mlp_impl=epilogue), select-cgs-gmlp (select-cgs with
# mlp_impl=epilogue; the same as select-cgs since mlp_impl=auto became the default). "best" and "baseline" pin the older paths
# (PyTorch head, PyTorch's FlexAttention tiles) so they reproduce session 6's numbers.
# Inductor's cache lives in .gpucache/inductor-swift (git-ignored), so a warm machine's later call reuses it.
# Results -> $OUT (JSON per stage, profiles, session.log; at most 8 files come back).
set -uo pipefail
OUT=${OUT:-/tmp/neurox_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpucache/inductor-swift}
log=$OUT/session.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; nproc; } | tee -a "$log"
bench() { local t=$1; shift; timeout "$t" python3 benchmarks/swift_benchmark.py "$@" 2>&1 | grep -v -i -E "warn|detach|row\[" | tee -a "$log"; }
for s in ${*:-target revised ladder}; do
  echo "== $s $(date +%T)" | tee -a "$log"
  case $s in
    target) bench "${TARGET_S:-330}" --suite target --compile block --variants eager --steps 10 --warmup 3 \
              --time-budget "${TARGET_BUDGET_S:-240}" --profile v1cfg-51M-b16,v1cfg-51M-b8-eager --out "$OUT/target.json" ;;
    attention) timeout 120 python3 benchmarks/attention_backends.py --batch 16 8 --out "$OUT/attention.json" 2>&1 | tee -a "$log" ;;
    best-attention)
      best=$(python3 -c "
import json; r=[x for x in json.load(open('$OUT/attention.json'))['rows'] if x['batch']==16]
t={b: sum(x[b]*x['calls'] for x in r) for b in ('flash','efficient','cudnn') if all(isinstance(x[b], float) for x in r)}
print(min(t, key=t.get))")
      echo "fastest SDPA backend over a b16 step: $best" | tee -a "$log"
      [[ $best == flash ]] || bench 300 --suite target --batches 16 --compile block --sdpa "$best" --steps 10 --warmup 3 \
        --profile v1cfg-51M-b16 --out "$OUT/target_$best.json" ;;
    revised) bench 150 --suite seqlen_revised --seqlen-compile none --steps 6 --out "$OUT/revised.json"
             bench 100 --suite seqlen_revised --seqlen-compile none --use-checkpoint --batches 8 --steps 6 \
               --out "$OUT/revised_ckpt.json" ;;
    cuda-graphs) bench 330 --suite target --batches 16 --compile block-cg --sdpa cudnn --steps 10 --warmup 3 \
                   --out "$OUT/target_cg.json" ;;
    blocks) plan=${BLOCK_PLAN:-s1:sdpa-cudnn,s1:flex,s1-shift:sdpa-cudnn,s1-shift:flex,s2:sdpa-cudnn,s2:flex,s2-shift:sdpa-cudnn,s2-shift:flex,s3:sdpa-cudnn,s3:flex,s3-shift:sdpa-cudnn,s3-shift:flex,s4-full:sdpa-cudnn,s1:flex-bf16,s1-shift:flex-bf16,s2:flex-bf16,s2-shift:flex-bf16}
            timeout "${BLOCKS_S:-450}" python3 benchmarks/swift_blocks.py ${BLOCK_CHECK---check} ${BLOCK_PROFILE:+--profile} --plan "$plan" \
              --time-budget "${BLOCKS_BUDGET_S:-400}" --out "$OUT/blocks.json" --md "$OUT/blocks.md" 2>&1 \
              | grep -v -i -E "warn" | tee -a "$log" ;;
    flex) bench "${FLEX_S:-400}" --suite target --batches 16 --compile block-cg --sdpa cudnn --attn-impl auto --steps 10 \
            --warmup 3 --profile v1cfg-51M-b16-auto --out "$OUT/target_flex.json" ;;
    best) bench "${BEST_S:-300}" --suite target --batches 16 --compile block-cg --sdpa cudnn --attn-impl auto --bf16-residual \
            --no-fused-head --flex-options pytorch --steps 20 --warmup 3 \
            --profile v1cfg-51M-b16-bf16res-auto-torchhead-ptflex --out "$OUT/target_best.json" ;;
    baseline) bench "${BASELINE_S:-330}" --suite target --batches 16 --compile block-cg --sdpa cudnn --no-fused-head \
                --flex-options pytorch --steps 20 --warmup 3 \
                --out "$OUT/target_baseline.json" ;;
    regions) timeout "${REGIONS_S:-240}" python3 benchmarks/swift_blocks.py --profile \
               --plan "${REGION_PLAN:-embed:dense,embed:select,head:dense,head:fused}" --time-budget 200 \
               --out "$OUT/regions.json" --md "$OUT/regions.md" 2>&1 | grep -v -i -E "warn" | tee -a "$log" ;;
    check) timeout "${CHECK_S:-300}" python3 benchmarks/swift_blocks.py --check --plan none --out "$OUT/check.json" 2>&1 \
             | grep -v -i -E "warn" | tee -a "$log" ;;
    select) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cg --sdpa cudnn --attn-impl auto \
              --bf16-residual --select --steps 20 --warmup 3 --profile v1cfg-51M-b16-bf16res-auto-select \
              --out "$OUT/target_select.json" ;;
    select-cgs) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cgs --sdpa cudnn --attn-impl auto \
                  --bf16-residual --select --steps 20 --warmup 3 --profile v1cfg-51M-b16-bf16res-auto-select \
                  --out "$OUT/target_select_cgs.json" ;;
    select-cgs-torchhead) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cgs --sdpa cudnn \
                  --attn-impl auto --bf16-residual --select --no-fused-head --steps 20 --warmup 3 \
                  --out "$OUT/target_select_cgs_torchhead.json" ;;
    fmlp-blocks) timeout "${BLOCKS_S:-300}" python3 benchmarks/swift_blocks.py --profile --top 30 \
               --check-runs sdpa:fp32,flex:bf16res-select,flex:bf16res-select-fmlp \
               --plan "${BLOCK_PLAN:-s1:flex-bf16res-fmlp,s1:flex-bf16res,s2:flex-bf16res-fmlp,s2:flex-bf16res,s1-shift:flex-bf16res-fmlp}" \
               --time-budget "${BLOCKS_BUDGET_S:-250}" --out "$OUT/blocks.json" --md "$OUT/blocks.md" 2>&1 \
               | grep -v -i -E "warn" | tee -a "$log" ;;
    select-cgs-fmlp) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cgs --sdpa cudnn --attn-impl auto \
                  --bf16-residual --select --fused-mlp --steps 20 --warmup 3 --out "$OUT/target_select_cgs_fmlp.json" ;;
    attn-blocks) timeout "${BLOCKS_S:-420}" python3 benchmarks/swift_blocks.py --profile --top 16 --check-kernels \
               --plan "${BLOCK_PLAN:-s1:triton-bf16res,s1:flex-bf16res,s1-shift:triton-bf16res,s1-shift:flex-bf16res,s3:triton-bf16res,s3:flex-bf16res,s3-shift:triton-bf16res,s3-shift:flex-bf16res,s2:triton-bf16res,s2:flex-bf16res,s2-shift:triton-bf16res,s2-shift:flex-bf16res}" \
               --time-budget "${BLOCKS_BUDGET_S:-360}" --out "$OUT/blocks.json" --md "$OUT/blocks.md" 2>&1 \
               | grep -v -i -E "warn" | tee -a "$log" ;;
    attn-check) timeout "${CHECK_S:-300}" python3 benchmarks/swift_blocks.py --plan none \
                  --check-runs sdpa:fp32,flex:bf16res-select,auto:bf16res-select --out "$OUT/check.json" 2>&1 \
                  | grep -v -i -E "warn" | tee -a "$log" ;;
    select-cgs-triton) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cgs --sdpa cudnn \
                  --attn-impl triton --bf16-residual --select --steps 20 --warmup 3 \
                  --out "$OUT/target_select_cgs_triton.json" ;;
    mlp-blocks) timeout "${BLOCKS_S:-420}" python3 benchmarks/swift_blocks.py --profile --top 16 --check-kernels \
               --plan "${BLOCK_PLAN:-s1:triton-bf16res-gmlp,s1:triton-bf16res,s2-shift:triton-bf16res-gmlp,s2-shift:triton-bf16res,s3:triton-bf16res-gmlp,s3:triton-bf16res,s4-full:triton-bf16res-gmlp,s4-full:triton-bf16res,s1-shift:triton-bf16res-gmlp,s1-shift:triton-bf16res}" \
               --time-budget "${BLOCKS_BUDGET_S:-360}" --out "$OUT/blocks.json" --md "$OUT/blocks.md" 2>&1 \
               | grep -v -i -E "warn" | tee -a "$log" ;;
    mlp-check) timeout "${CHECK_S:-300}" python3 benchmarks/swift_blocks.py --plan none \
                  --check-runs sdpa:fp32,auto:bf16res-select,auto:bf16res-select-gmlp --out "$OUT/check.json" 2>&1 \
                  | grep -v -i -E "warn" | tee -a "$log" ;;
    select-cgs-gmlp) bench "${SELECT_S:-300}" --suite target --batches 16 --compile block-cgs --sdpa cudnn \
                  --attn-impl auto --mlp-impl epilogue --bf16-residual --select --steps 20 --warmup 3 \
                  ${SELECT_PROFILE:+--profile v1cfg-51M-b16-bf16res-auto-select-mlpepilogue} \
                  --out "$OUT/target_select_cgs_gmlp.json" ;;
    ladder) bench 100 --suite ladder --compile none --steps 6 --out "$OUT/ladder.json" ;;
    ladder-compiled) bench 300 --suite ladder --compile block --steps 6 --time-budget 240 --out "$OUT/ladder_compiled.json" ;;
  esac
done
