# shellcheck shell=bash
# The Slurm half of the scheduler seam (the Python half, node list and walltime, is pbs/scheduler.py: class Slurm).
# Same functions as pbs/schedulers/pbs.sh (see there and pbs/README.md, "Schedulers").
SCHED_LAUNCHERS="auto, srun, ssh or the path of an srun-like program"

sched_job_id() { echo "${SLURM_JOB_ID:-${SLURM_JOBID:-}}"; }

sched_rank() { echo "${SLURM_PROCID:-${PMI_RANK:-${PMIX_RANK:-}}}"; }

sched_launcher() { # $1 = auto|srun|ssh|path
  local l="$1"
  [[ "$l" == auto ]] && { if command -v srun >/dev/null; then l=srun; else l=ssh; fi; }
  case "$l" in
    srun | ssh) command -v "$l" >/dev/null || [[ $NNODES -eq 1 ]] || die "launcher '$l' not found in PATH" ;;
    *) [[ -x "$l" ]] || die "--launcher must be $SCHED_LAUNCHERS; got '$l'" ;;
  esac
  echo "$l"
}

sched_launch_workers() { # one job step, one task on each worker host; --overlap: it shares the job's resources
  if [[ "$LAUNCHER" == ssh ]]; then launch_ssh; return; fi
  local largs n=${#WORKERS[@]} list
  read -r -a largs <<<"${NEUROX_LAUNCHER_ARGS:-$PROFILE_LAUNCHER_ARGS}"
  list=$(IFS=,; echo "${WORKERS[*]}")
  launch_one "$LAUNCHER" --overlap --nodes="$n" --ntasks="$n" --ntasks-per-node=1 --nodelist="$list" \
    --kill-on-bad-exit=0 "${largs[@]}" "${AGENT[@]}" --rank-offset 1
}

sched_chain() { # $1 = job script, $2 = NEUROX_CHAIN for the next job; sbatch passes the whole environment along,
  # minus this job's own cluster variables (address, token path, staged data: the next job makes its own)
  local extra out v drop=()
  read -r -a extra <<<"${NEUROX_SBATCH_ARGS:-}"
  for v in $(compgen -e | grep -E '^(RAY_ADDRESS|RAY_API_SERVER_ADDRESS|RAY_AUTH_TOKEN_PATH|NEUROX_RAY_.*|NEUROX_STAGED_DATA)$' || true); do
    drop+=(-u "$v")
  done
  out=$(env "${drop[@]}" sbatch --parsable "${extra[@]}" --dependency="afterany:$(sched_job_id)" \
    --export="ALL,NEUROX_CHAIN=$2" "$1") || return 1
  echo "${out%%;*}" # --parsable prints "id" or "id;cluster"
}

sched_cancel() { scancel "$1"; }
