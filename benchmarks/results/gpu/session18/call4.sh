#!/usr/bin/env bash
# planner rows with today's code: 51M mb16/mb32 and 806M mb8, compiled, preloaded (benchmarks/planner_calibration.sh's run())
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
eval "$(sed -n '/^tmp=/,/^}/p' benchmarks/planner_calibration.sh)"
mode=compiled; out=$OUT
t0=$(date +%s)
run 51M 32 1 0; run 51M 16 1 0
(( $(date +%s) - t0 < 330 )) && run 806M 8 1 0
echo "total $(( $(date +%s) - t0 )) s"
