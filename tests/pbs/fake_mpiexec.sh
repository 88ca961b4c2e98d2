#!/usr/bin/env bash
# shellcheck disable=SC2317  # the trap handler looks unreachable to shellcheck 0.9
# Test harness (not product code): an `mpiexec -n N --ppn 1 --hostfile F CMD...` stand-in that runs CMD once per
# host of F inside that host's network namespace (map file $NX_NETNS_MAP: "host netns" per line), with PMI_RANK
# set like a real MPI launcher. SIGTERM is forwarded to every rank, as PALS/Hydra do.
set -euo pipefail
n="" hostfile=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --ppn | --cpu-bind) shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    *) break ;;
  esac
done
[[ -n "$n" && -n "$hostfile" && $# -gt 0 ]] || { echo "fake_mpiexec: usage: -n N --ppn 1 --hostfile F CMD..." >&2; exit 2; }
mapfile -t hosts <"$hostfile"
[[ ${#hosts[@]} -eq "$n" ]] || { echo "fake_mpiexec: -n $n but $hostfile lists ${#hosts[@]} hosts" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pids=()
forward() { local p; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap forward TERM INT
for i in "${!hosts[@]}"; do
  ns=$(awk -v h="${hosts[$i]}" '$1 == h {print $2}' "$NX_NETNS_MAP")
  [[ -n "$ns" ]] || { echo "fake_mpiexec: unknown host ${hosts[$i]}" >&2; exit 2; }
  PMI_RANK=$i ip netns exec "$ns" "$here/node_local.sh" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while true; do
    set +e; wait "$p"; r=$?; set -e
    # a trap interrupts wait with status > 128 while the child still runs: wait again
    if [[ $r -gt 128 ]] && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  [[ $r -gt $rc ]] && rc=$r
done
exit "$rc"
