#!/usr/bin/env bash
# shellcheck disable=SC2317  # the trap handler looks unreachable to shellcheck 0.9
# Test harness (not product code): an `srun --nodes=N --ntasks=N --ntasks-per-node=1 --nodelist=a,b CMD...` stand-in
# that runs CMD once per listed host inside that host's network namespace (map file $NX_NETNS_MAP: "host netns" per
# line), with the task environment of a real step (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS,
# SLURMD_NODENAME). Refuses what srun would refuse here: no job (SLURM_JOB_ID), a task count that does not match
# the node list, more than one task per node. SIGTERM is forwarded to every task, as srun does. Each call is
# appended to $NX_SRUN_LOG when set.
set -euo pipefail
nodes="" ntasks="" per_node="" nodelist=""
[[ -n "${NX_SRUN_LOG:-}" ]] && echo "srun $*" >>"$NX_SRUN_LOG"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}"; shift ;;
    --ntasks=*) ntasks="${1#*=}"; shift ;;
    --ntasks-per-node=*) per_node="${1#*=}"; shift ;;
    --nodelist=*) nodelist="${1#*=}"; shift ;;
    --overlap | --kill-on-bad-exit=* | --cpu-bind=* | --gpu-bind=* | --gpus-per-node=*) shift ;;
    -*) echo "fake_srun: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "fake_srun: error: no job (SLURM_JOB_ID unset)" >&2; exit 1; }
[[ $# -gt 0 && -n "$nodelist" ]] || { echo "fake_srun: usage: --nodes=N --ntasks=N --ntasks-per-node=1 --nodelist=a,b CMD..." >&2; exit 2; }
IFS=, read -r -a hosts <<<"$nodelist"
[[ "$per_node" == 1 && "$nodes" == "${#hosts[@]}" && "$ntasks" == "${#hosts[@]}" ]] ||
  { echo "fake_srun: --nodes=$nodes --ntasks=$ntasks --ntasks-per-node=$per_node do not match --nodelist=$nodelist" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pids=()
forward() { local p; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap forward TERM INT
for i in "${!hosts[@]}"; do
  ns=$(awk -v h="${hosts[$i]}" '$1 == h {print $2}' "$NX_NETNS_MAP")
  [[ -n "$ns" ]] || { echo "fake_srun: error: host ${hosts[$i]} is not in this allocation" >&2; exit 1; }
  SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=$ntasks SLURMD_NODENAME="${hosts[$i]}" \
    ip netns exec "$ns" "$here/node_local.sh" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while true; do
    set +e; wait "$p"; r=$?; set -e
    if [[ $r -gt 128 ]] && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  [[ $r -gt $rc ]] && rc=$r
done
exit "$rc"
