# shellcheck shell=bash
# The PBS half of the scheduler seam (the Python half, node list and walltime, is pbs/scheduler.py: class PBS).
# Sourced by ray_cluster.sh; every scheduler file defines the same functions (see pbs/README.md, "Schedulers"):
#   sched_job_id                 the job id ("" outside a job)
#   sched_rank                   the launcher's rank of this process (a node agent), "" when unknown
#   sched_launcher NAME          resolve auto and check NAME; prints the launcher to use
#   sched_launch_workers         start one node agent per host of WORKERS (through launch_one, ray_cluster.sh)
#   sched_chain SCRIPT LEFT      submit SCRIPT to run after this job, with NEUROX_CHAIN=LEFT; prints its id
#   sched_cancel JOBID           cancel a chained job
SCHED_LAUNCHERS="auto, mpiexec, pbsdsh, ssh or the path of an mpiexec-like program"

sched_job_id() { echo "${PBS_JOBID:-}"; }

sched_rank() { echo "${PMI_RANK:-${PALS_RANKID:-${PMIX_RANK:-${OMPI_COMM_WORLD_RANK:-}}}}"; }

sched_launcher() { # $1 = auto|mpiexec|pbsdsh|ssh|path
  local l="$1"
  if [[ "$l" == auto ]]; then
    if command -v mpiexec >/dev/null; then l=mpiexec
    elif command -v pbsdsh >/dev/null; then l=pbsdsh
    else l=ssh; fi
  fi
  case "$l" in
    mpiexec | pbsdsh | ssh) command -v "$l" >/dev/null || [[ $NNODES -eq 1 ]] || die "launcher '$l' not found in PATH" ;;
    *) [[ -x "$l" ]] || die "--launcher must be $SCHED_LAUNCHERS; got '$l'" ;;
  esac
  echo "$l"
}

sched_launch_workers() { # mpiexec (PALS, Hydra): one command for all workers; pbsdsh/ssh: one per host
  local r
  case "$LAUNCHER" in
    pbsdsh) for r in $(seq 1 $((NNODES - 1))); do launch_one pbsdsh -h "${HOSTS[$r]}" -- "${AGENT[@]}" --rank "$r"; done ;;
    ssh) launch_ssh ;;
    *)
      local largs hostfile="$STATE/workers.hosts"
      read -r -a largs <<<"${NEUROX_LAUNCHER_ARGS:-$PROFILE_LAUNCHER_ARGS}"
      [[ $DRY_RUN -eq 1 ]] || printf '%s\n' "${WORKERS[@]}" >"$hostfile"
      launch_one "$LAUNCHER" -n "${#WORKERS[@]}" --ppn 1 "${largs[@]}" --hostfile "$hostfile" "${AGENT[@]}" --rank-offset 1 ;;
  esac
}

sched_chain() { # $1 = job script, $2 = NEUROX_CHAIN for the next job
  # carry the user's NEUROX_* settings over (qsub -v cannot carry values with commas or quotes)
  local vlist="NEUROX_CHAIN=$2" v qsub_extra
  for v in $(compgen -e | grep '^NEUROX_' || true); do
    [[ "$v" == NEUROX_CHAIN ]] && continue
    if [[ "${!v}" == *[,\'\"]* ]]; then log "warning: $v not carried to the chained job (comma or quote)"; continue; fi
    vlist+=",$v=${!v}"
  done
  read -r -a qsub_extra <<<"${NEUROX_QSUB_ARGS:-}"
  qsub "${qsub_extra[@]}" -W "depend=afterany:$PBS_JOBID" -v "$vlist" "$1"
}

sched_cancel() { qdel "$1"; }
