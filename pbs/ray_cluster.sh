#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run from traps look unreachable to shellcheck 0.9
# shellcheck source-path=SCRIPTDIR
# Bootstrap a token-authenticated Ray cluster inside a PBS or Slurm allocation, run a command on it, tear it down.
#
# Usage:
#   pbs/ray_cluster.sh run [OPTIONS] -- CMD [ARGS...]   start the cluster, run CMD on the head, tear down
#   pbs/ray_cluster.sh up  [OPTIONS]                    start the cluster and block until a signal
#   pbs/ray_cluster.sh (run|up) --dry-run [OPTIONS]     validate and print the plan; start nothing
#
# The head is the host running the job script (PBS: the first of $PBS_NODEFILE; Slurm: $SLURMD_NODENAME); every
# other host gets one node agent (this script's internal "node-agent" mode) through the scheduler's launcher:
# `mpiexec --ppn 1`, pbsdsh (PBS), `srun --ntasks-per-node 1` (Slurm) or ssh. pbs/schedulers/NAME.sh.
#
# Options:
#   --profile NAME          site settings, a file pbs/profiles/NAME.sh (aurora, polaris, frontier, ...)  [generic]
#   --scheduler S           auto|pbs|slurm: how nodes are obtained  [$NEUROX_SCHEDULER, the profile's, or auto]
#   --iface NAME            high-speed interface whose IPv4 address Ray uses  [$NEUROX_IFACE or profile's]
#   --host-suffix SUFFIX    or: resolve "$(hostname -s)SUFFIX" for the address         [$NEUROX_HOST_SUFFIX]
#   --nodefile FILE         node list                   [PBS: $PBS_NODEFILE; Slurm: $SLURM_JOB_NODELIST]
#   --port N                GCS port (default: a free port)
#   --dashboard-port N      dashboard/job API port (default: a free port)
#   --client-port N         Ray client port (default: a free port)
#   --join-timeout S        seconds to wait for all nodes                            [300]
#   --num-gpus N  --num-cpus N  --object-store-bytes N   per-node Ray resources
#   --state-dir DIR         shared job state (token, node registry)  [$NEUROX_STATE_DIR or ~/.neurox/ray]
#   --tmp-base DIR          node-local base for Ray's temp dir (keep short)    [$NEUROX_TMP_BASE or /tmp]
#                           (each job's dirs: DIR/nx-<uid>/<job>.<random>_<rank>, mode 0700, see SECURITY.md)
#   --launcher L            PBS: auto|mpiexec|pbsdsh|ssh|/path/to/mpiexec-like; Slurm: auto|srun|ssh|/path/to/
#                           srun-like  [$NEUROX_LAUNCHER or auto]  (extra arguments: $NEUROX_LAUNCHER_ARGS, else the
#                           profile's PROFILE_LAUNCHER_ARGS)
#   --storage DIR --study-name NAME   the study's storage; enables walltime stop and chaining
#   --stop-margin S         touch <storage>/<study>/STOP this many seconds before walltime ends [600]
#   --chain N --job-script FILE       submit FILE again (afterany) up to N more times until the study completes
#   --stage SRC --stage-to DIR [--shard]   copy the data directory to node-local DIR/nx-<uid>/<job>.<random>
#                           (a share of it with --shard); mode 0700, removed first at teardown
#   --head-restarts N       run: if the head's Ray processes die while CMD runs, restart the head and every node's
#                           Ray (same addresses) and rerun CMD, at most N times; a study resumes from its storage.
#                           After N (or if a restart fails) exit 1, so a chained job (--chain) carries on  [1]
#   --teardown-s S          finish teardown within S seconds of its start (below PBS's kill_delay, Slurm's
#                           KillWait)  [8]
#   --dry-run               print what would run and exit
#
# Environment given to CMD: RAY_ADDRESS (GCS ip:port), RAY_API_SERVER_ADDRESS (http://ip:dashboard),
# RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, NEUROX_RAY_HEAD_IP, NEUROX_RAY_NUM_NODES, NEUROX_STAGED_DATA.
# The token is never printed; it lives in <state-dir>/<job>/token (mode 0600) and is removed at teardown.
{ # bash parses this whole block before running it, so updating the file (git pull) during a job is safe
set -euo pipefail
umask 077 # every file and directory this job (and its Ray processes) creates is private to the user

PBS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$PBS_DIR/ray_cluster.sh"
HELPER="$PBS_DIR/cluster.py"

log() { echo "ray_cluster: $*" >&2; }
die() { log "$*"; exit 2; }
helper() { "$PY" "$HELPER" "$@"; }

usage() { sed -n '4,/^{ #/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------------------------ options
MODE="${1:-}"
[[ $# -gt 0 ]] && shift
case "$MODE" in
  run | up | node-agent) ;;
  -h | --help | help) usage; exit 0 ;;
  *) usage >&2; die "unknown mode '${MODE}': expected run, up (or node-agent, internal)" ;;
esac

PROFILE=generic SCHEDULER="${NEUROX_SCHEDULER:-}" IFACE="" HOST_SUFFIX="" NODEFILE="" GCS_PORT="" DASH_PORT="" CLIENT_PORT=""
JOIN_TIMEOUT=300 NUM_GPUS="" NUM_CPUS="" OBJ_BYTES="" STATE_BASE="${NEUROX_STATE_DIR:-$HOME/.neurox/ray}"
TMP_BASE="${NEUROX_TMP_BASE:-/tmp}" LAUNCHER="${NEUROX_LAUNCHER:-auto}" STORAGE="" STUDY="" STOP_MARGIN=600
CHAIN=0 JOB_SCRIPT="" STAGE_SRC="" STAGE_TO="" SHARD=0 DRY_RUN=0 TEARDOWN_S=8 HEAD_RESTARTS=1
# node-agent only
ADDRESS="" STATE="" RANK="" RANK_OFFSET=0 WORLD="" JOBKEY="" NONCE=""
CMD=()
iface_set=0

need() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "option $1 must be a non-negative integer, got '$2'"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) need "$@"; PROFILE="$2"; shift 2 ;;
    --scheduler) need "$@"; SCHEDULER="$2"; shift 2 ;;
    --iface) need "$@"; IFACE="$2"; iface_set=1; shift 2 ;;
    --host-suffix) need "$@"; HOST_SUFFIX="$2"; iface_set=1; shift 2 ;;
    --nodefile) need "$@"; NODEFILE="$2"; shift 2 ;;
    --port) need "$@"; int "$1" "$2"; GCS_PORT="$2"; shift 2 ;;
    --dashboard-port) need "$@"; int "$1" "$2"; DASH_PORT="$2"; shift 2 ;;
    --client-port) need "$@"; int "$1" "$2"; CLIENT_PORT="$2"; shift 2 ;;
    --join-timeout) need "$@"; int "$1" "$2"; JOIN_TIMEOUT="$2"; shift 2 ;;
    --num-gpus) need "$@"; int "$1" "$2"; NUM_GPUS="$2"; shift 2 ;;
    --num-cpus) need "$@"; int "$1" "$2"; NUM_CPUS="$2"; shift 2 ;;
    --object-store-bytes) need "$@"; int "$1" "$2"; OBJ_BYTES="$2"; shift 2 ;;
    --state-dir) need "$@"; STATE_BASE="$2"; shift 2 ;;
    --tmp-base) need "$@"; TMP_BASE="$2"; shift 2 ;;
    --launcher) need "$@"; LAUNCHER="$2"; shift 2 ;;
    --storage) need "$@"; STORAGE="$2"; shift 2 ;;
    --study-name) need "$@"; STUDY="$2"; shift 2 ;;
    --stop-margin) need "$@"; int "$1" "$2"; STOP_MARGIN="$2"; shift 2 ;;
    --chain) need "$@"; int "$1" "$2"; CHAIN="$2"; shift 2 ;;
    --job-script) need "$@"; JOB_SCRIPT="$2"; shift 2 ;;
    --stage) need "$@"; STAGE_SRC="$2"; shift 2 ;;
    --stage-to) need "$@"; STAGE_TO="$2"; shift 2 ;;
    --shard) SHARD=1; shift ;;
    --teardown-s) need "$@"; int "$1" "$2"; TEARDOWN_S="$2"; shift 2 ;;
    --head-restarts) need "$@"; int "$1" "$2"; HEAD_RESTARTS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --address) need "$@"; ADDRESS="$2"; shift 2 ;;
    --state) need "$@"; STATE="$2"; shift 2 ;;
    --rank) need "$@"; int "$1" "$2"; RANK="$2"; shift 2 ;;
    --rank-offset) need "$@"; int "$1" "$2"; RANK_OFFSET="$2"; shift 2 ;;
    --world) need "$@"; int "$1" "$2"; WORLD="$2"; shift 2 ;;
    --jobkey) need "$@"; JOBKEY="$2"; shift 2 ;;
    --nonce) need "$@"; NONCE="$2"; shift 2 ;;
    --) shift; CMD=("$@"); break ;;
    *) die "unknown option '$1' (see: pbs/ray_cluster.sh --help)" ;;
  esac
done

# Sites are discovered from their folder: a new site is one file pbs/profiles/NAME.sh (data: see generic.sh).
known() { local f n=""; for f in "$PBS_DIR/$1"/*.sh; do f="${f##*/}"; n+="${n:+, }${f%.sh}"; done; echo "$n"; }
[[ "$PROFILE" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ && -f "$PBS_DIR/profiles/$PROFILE.sh" ]] ||
  die "--profile must be one of $(known profiles) (pbs/profiles/*.sh); got '$PROFILE'"
PROFILE_SCHEDULER="" PROFILE_MODULE_USE="" PROFILE_MODULES="" PROFILE_CONDA_ENV="" PROFILE_PY_MODULES="" PROFILE_PY_HINT=""
# shellcheck source=profiles/generic.sh
source "$PBS_DIR/profiles/$PROFILE.sh"
load_site_software() { # the profile's modules, conda environment and $NEUROX_VENV (NEUROX_SKIP_MODULES=1: none)
  [[ -z "${NEUROX_SKIP_MODULES:-}" ]] && command -v module >/dev/null 2>&1 || return 0
  local m
  set +u # module and conda scripts read unset variables
  for m in $PROFILE_MODULE_USE; do module use "$m" 2>/dev/null || log "warning: module use $m failed"; done
  for m in $PROFILE_MODULES; do module load "$m" || log "warning: module load $m failed"; done
  m="${NEUROX_CONDA_ENV:-$PROFILE_CONDA_ENV}"
  if [[ -n "$m" ]]; then conda activate "$m"; fi
  # shellcheck disable=SC1091
  if [[ -n "${NEUROX_VENV:-}" ]]; then source "$NEUROX_VENV/bin/activate"; fi
  set -u
}
load_site_software
# after the profile: its module/conda set-up decides which python has Ray
PY="${NEUROX_PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PY" && -x "$PY" ]] || die "no python found (set NEUROX_PYTHON to the interpreter that has Ray)"
RAY_CLI=("$PY" -m ray.scripts.scripts)
if [[ "$MODE" != node-agent ]]; then
  for m in $PROFILE_PY_MODULES; do
    "$PY" -c "import $m" 2>/dev/null || log "warning: $PY cannot import $m (needed by profile $PROFILE): $PROFILE_PY_HINT"
  done
fi
# The scheduler: options > NEUROX_SCHEDULER > the profile's > the job's environment (pbs/scheduler.py)
SCHEDULER="${SCHEDULER:-${PROFILE_SCHEDULER:-auto}}"
[[ "$SCHEDULER" =~ ^[a-z]+$ && ( "$SCHEDULER" == auto || -f "$PBS_DIR/schedulers/$SCHEDULER.sh" ) ]] ||
  die "--scheduler must be auto or one of $(known schedulers) (pbs/schedulers/*.sh); got '$SCHEDULER'"
[[ "$SCHEDULER" == auto ]] && SCHEDULER=$(helper scheduler --scheduler auto)
# shellcheck source=schedulers/pbs.sh
source "$PBS_DIR/schedulers/$SCHEDULER.sh"
if [[ $iface_set -eq 0 ]]; then # options > NEUROX_IFACE / NEUROX_HOST_SUFFIX > the profile's default
  if [[ -n "${NEUROX_IFACE:-}${NEUROX_HOST_SUFFIX:-}" ]]; then IFACE="${NEUROX_IFACE:-}" HOST_SUFFIX="${NEUROX_HOST_SUFFIX:-}"
  else IFACE="$PROFILE_IFACE" HOST_SUFFIX="$PROFILE_HOST_SUFFIX"; fi
fi
NUM_GPUS="${NUM_GPUS:-$PROFILE_DEVICES_PER_NODE}"
[[ -n "$STAGE_SRC" && -z "$STAGE_TO" ]] && die "--stage needs --stage-to (node-local directory, e.g. /dev/shm or /local/scratch)"
[[ $SHARD -eq 1 && -z "$STAGE_SRC" ]] && die "--shard needs --stage SRC --stage-to DIR"
NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]*$' # names used in paths (same rule as study.spec and pbs/cluster.py)
[[ -z "$STUDY" || "$STUDY" =~ $NAME_RE ]] || die "--study-name '$STUDY' must match $NAME_RE (letters, digits, '.', '_', '-'; no '/')"
[[ -z "$NONCE" || "$NONCE" =~ ^[0-9a-f]+$ ]] || die "--nonce must be hexadecimal"
[[ $TEARDOWN_S -ge 2 ]] || die "--teardown-s must be at least 2"

export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# On SIGTERM, `ray start --block` first asks the GCS to drain the node, for up to 30 s by default (Ray 2.60), while
# its raylet and agents keep running: longer than PBS's kill_delay, and pointless here (the whole cluster stops).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
export NEUROX_SITE="$PROFILE" NEUROX_DEVICE_KIND="${NEUROX_DEVICE_KIND:-${PROFILE_DEVICE_KIND:-}}"
# Metrics: each node's agent would serve Prometheus metrics (worker ids, IPs, task names) on 0.0.0.0 without a
# token; off unless the user asks for it (pbs/README.md, "What listens where").
export RAY_enable_metrics_collection="${RAY_enable_metrics_collection:-0}"
unset RAY_AUTH_TOKEN # it would take precedence over this job's RAY_AUTH_TOKEN_PATH
addr_args=()
[[ -n "$IFACE" ]] && addr_args+=(--iface "$IFACE")
[[ -n "$HOST_SUFFIX" ]] && addr_args+=(--host-suffix "$HOST_SUFFIX")

# Short, node-local Ray temp dir: Unix socket paths over ~107 bytes fail, and session dirs add ~60 bytes.
# Private: it lives in the user's own 0700 dir DIR/nx-<uid> and has a random part (created by make_private).
tmp_dir_for() {
  local d="$TMP_BASE/nx-$EUID/$JOBKEY.${NONCE}_$1"
  [[ ${#d} -le 40 ]] || die "Ray temp dir '$d' is ${#d} characters; keep it <= 40 (socket paths fail over 107 bytes): pass a shorter --tmp-base"
  echo "$d"
}

object_store_bytes() {
  if [[ -n "$OBJ_BYTES" ]]; then echo "$OBJ_BYTES"; return; fi
  local avail
  avail=$(df -B1 --output=avail /dev/shm | tail -1 | tr -d ' ')
  echo $((avail * 3 / 10))
}

ray_node_args() { # common `ray start` arguments for this node: $1 = ip, $2 = temp dir
  local ports
  read -r -a ports <<<"$(helper ports --host "$1" --count 6)"
  NODE_ARGS=(--node-ip-address "$1" --temp-dir "$2" --plasma-directory /dev/shm
    --object-store-memory "$(object_store_bytes)" --block --disable-usage-stats
    --node-manager-port "${ports[0]}" --object-manager-port "${ports[1]}"
    --dashboard-agent-listen-port "${ports[2]}" --dashboard-agent-grpc-port "${ports[3]}"
    --metrics-export-port "${ports[4]}" --runtime-env-agent-port "${ports[5]}")
  [[ -n "$NUM_GPUS" ]] && NODE_ARGS+=(--num-gpus "$NUM_GPUS")
  [[ -n "$NUM_CPUS" ]] && NODE_ARGS+=(--num-cpus "$NUM_CPUS")
  return 0
}

make_private() { # $1 = directory to create (0700, must not exist) in the user's own 0700 dir $(dirname $1)
  local parent="${1%/*}"
  helper private-dir --parent "${parent%/*}" --per-user --name "${1##*/}" >/dev/null
}

stage_data() { # $1 = rank, $2 = world; exports NEUROX_STAGED_DATA (the same path on every node)
  [[ -z "$STAGE_SRC" ]] && return 0
  local d="$STAGE_TO/nx-$EUID/$JOBKEY.$NONCE" shard_arg=()
  [[ $SHARD -eq 1 ]] && shard_arg=(--shard)
  make_private "$d" || return 1
  STAGED_DIR="$d" # only what this job created is removed at teardown
  helper stage --src "$STAGE_SRC" --dst "$STAGED_DIR" --rank "$1" --world "$2" "${shard_arg[@]}" >&2
  export NEUROX_STAGED_DATA="$STAGED_DIR"
}

show() { local out; printf -v out ' %q' "$@"; echo " $out"; } # one quoted command line (dry run)

now_ms() { local t="${EPOCHREALTIME//[.,]/}"; echo $((10#$t / 1000)); }

wait_group_gone() { # $1 = a setsid'd session leader's pid, $2 = seconds: until no process of its group is left
  local end=$(($(now_ms) + $2 * 1000))
  [[ -n "$1" ]] || return 0
  while kill -0 -- "-$1" 2>/dev/null && [[ $(now_ms) -lt $end ]]; do sleep 0.1; done
  return 0
}

signal_groups() { # $1 = signal, then pids of session leaders started with setsid: signal each whole group
  local sig="$1" pid
  shift
  # a group that is gone already is fine: without `|| true` the failed kill ends the whole script under `set -e`
  # (the last command of an && list counts), silently - a node agent whose Ray had died with the head exited this
  # way when the head restarted, and never rejoined
  for pid in "$@"; do
    if [[ -n "$pid" ]]; then kill "-$sig" -- "-$pid" 2>/dev/null || true; fi
  done
  return 0
}

any_alive() { local pid; for pid in "$@"; do [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

# ------------------------------------------------------------------------------------------------ node agent
if [[ "$MODE" == node-agent ]]; then
  [[ -n "$ADDRESS" && -n "$STATE" && -n "$JOBKEY" && -n "$WORLD" ]] || die "node-agent needs --address --state --jobkey --world"
  if [[ -z "$RANK" ]]; then
    local_rank="$(sched_rank)"
    [[ -n "$local_rank" ]] || die "node-agent: no rank (--rank, or the $SCHEDULER launcher's: PMI_RANK, PALS_RANKID, PMIX_RANK, SLURM_PROCID)"
    RANK=$((local_rank + RANK_OFFSET))
  fi
  export RAY_AUTH_TOKEN_PATH="$STATE/token"
  mkdir -p "$STATE/nodes"
  REG="$STATE/nodes/$RANK.json"
  fail() { echo "$*" >"$STATE/nodes/$RANK.error"; die "node $RANK ($(hostname)): $*"; }
  [[ -r "$RAY_AUTH_TOKEN_PATH" ]] || fail "token file $RAY_AUTH_TOKEN_PATH not readable (state dir must be on a shared file system)"
  ip=$(helper addr "${addr_args[@]}" 2>&1) || fail "${ip#ray_cluster: }"
  [[ -n "$NONCE" ]] || die "node-agent needs --nonce"
  TMP_DIR=$(tmp_dir_for "$RANK")
  RAY_PID="" TMP_MADE=0
  # The head waits TEARDOWN_S for every agent; an agent notices the head's teardown within 0.5 s.
  agent_cleanup() {
    local rc=$? grace=$((TEARDOWN_S / 4))
    # first of all: a launcher forwards the head's SIGTERM too, so a second one comes within milliseconds, and
    # its trap's `exit` (the EXIT trap already gone) ended the cleanup there: Ray and its temp dir were left (CI,
    # session 15; reproduced with a second TERM 1-4 ms after the first)
    trap '' TERM INT HUP
    trap - EXIT ERR
    agent_note "exiting with status $rc"
    if [[ $rc -ne 0 && $rc -lt 128 && ! -e "$STATE/nodes/$RANK.error" ]]; then # tell the head (it fails fast)
      echo "node agent exited with status $rc (its notes: the node's log, kept with the bootstrap logs)" \
        >"$STATE/nodes/$RANK.error" 2>/dev/null
    fi
    set +e
    [[ -n "${STAGED_DIR:-}" ]] && rm -rf "$STAGED_DIR" & # sensitive data first, in parallel with the rest
    # The Ray node's own process group first, from the shell: SIGTERM, up to `grace` s, SIGKILL. Starting Python
    # for this took seconds on a loaded 2-core CI host; the head SIGKILLs the launcher (and this agent with it) at
    # its deadline, and a Ray node whose agent dies mid-cleanup outlives the job.
    signal_groups TERM "$RAY_PID"
    wait_group_gone "$RAY_PID" "$grace"
    signal_groups KILL "$RAY_PID"
    # The temp dir (Ray's session: logs, sockets) goes at once, from the shell: the Python helper below took
    # seconds to start on a loaded 2-core CI host, the head SIGKILLs this agent at its teardown deadline, and an
    # agent killed there left the whole dir behind. The dir is ours (0700 parent); rm does not follow links.
    [[ $TMP_MADE -eq 1 ]] && rm -rf -- "$TMP_DIR" 2>/dev/null
    agent_note "Ray node stopped, temp dir removed"
    # then anything else still using the node's temp dir (workers that left the group, which may have written
    # into it again), and the dir itself if it came back
    [[ $TMP_MADE -eq 1 ]] && helper cleanup --path "$TMP_DIR" --grace 1 --kill-wait 1
    wait "$!" 2>/dev/null
    rm -f "$REG"
    exit "$rc"
  }
  # Every way out says why in the node's log (kept with the bootstrap logs at teardown): a signal, or the command
  # that failed under `set -e`.
  agent_note() { echo "ray_cluster node agent (rank $RANK, pid $$) $(date +%T.%3N): $*" >>"$STATE/nodes/$RANK.log" 2>/dev/null || true; }
  trap agent_cleanup EXIT
  # each handler ignores further signals first: one more arriving inside it would run it again
  trap 'trap "" TERM INT HUP; agent_note "received SIGTERM"; exit 143' TERM
  trap 'trap "" TERM INT HUP; agent_note "received SIGINT"; exit 130' INT
  trap 'trap "" TERM INT HUP; agent_note "received SIGHUP"; exit 129' HUP
  trap 'agent_note "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
  set -E # ... also inside functions
  err=$(make_private "$TMP_DIR" 2>&1) || fail "${err#ray_cluster: }"
  TMP_MADE=1
  if ! stage_data "$RANK" "$WORLD" 2>"$STATE/nodes/$RANK.stage"; then
    err=$(tail -n 1 "$STATE/nodes/$RANK.stage")
    fail "staging $STAGE_SRC to $STAGE_TO failed: ${err#ray_cluster: }"
  fi
  ray_node_args "$ip" "$TMP_DIR"
  start_node() {
    printf '{"rank": %d, "host": "%s", "ip": "%s", "pid": %d}\n' "$RANK" "$(hostname)" "$ip" $$ >"$REG.tmp"
    mv "$REG.tmp" "$REG"
    # The Ray node runs under a watchdog (ray_watchdog.sh) in its own process group: if this agent dies without its
    # cleanup (SIGKILLed at the head's teardown deadline before its EXIT trap ran: CI, session 20, a `ray start`
    # still retrying an unreachable head outlived the job), the watchdog SIGKILLs the whole group within 0.5 s.
    NEUROX_RAY_NODE_TMP="$TMP_DIR" setsid "$PBS_DIR/ray_watchdog.sh" "$$" "${RAY_CLI[@]}" start --address "$ADDRESS" \
      "${NODE_ARGS[@]}" \
      >>"$STATE/nodes/$RANK.log" 2>&1 &
    RAY_PID=$!
  }
  generation() { cat "$STATE/generation" 2>/dev/null || echo 0; }
  restart_node() { # stop what is left of this node's Ray, clean its temp dir, start it again against the head
    signal_groups TERM "$RAY_PID"
    wait_group_gone "$RAY_PID" 2
    signal_groups KILL "$RAY_PID"
    wait "$RAY_PID" 2>/dev/null || true
    helper cleanup --path "$TMP_DIR" --grace 1 --kill-wait 1 >/dev/null
    err=$(make_private "$TMP_DIR" 2>&1) || fail "${err#ray_cluster: }"
    start_node
  }
  gen=$(generation)
  retries=0 # restarts of this node's Ray within one head restart
  start_node
  # Stay up while the head's "running" marker exists (covers launchers that do not forward signals). When the
  # head restarts (--head-restarts) it writes the generation it restarts to into $STATE/restarting, then bumps
  # $STATE/generation: stop this node's Ray and join the new head.
  while [[ -e "$STATE/running" ]]; do
    if [[ "$(generation)" != "$gen" ]]; then
      gen=$(generation)
      retries=0
      restart_node
      continue
    fi
    if ! kill -0 "$RAY_PID" 2>/dev/null; then
      target=$(cat "$STATE/restarting" 2>/dev/null || true)
      if [[ -n "$target" && "$target" != "$gen" ]]; then # the head is restarting (our Ray lost it): wait for it
        sleep 0.5
        continue
      fi
      if [[ -n "$target" && $retries -lt 3 ]]; then # our Ray for the new head exited while the head waits for us
        retries=$((retries + 1))
        agent_note "Ray exited while the head waited for the nodes (generation $gen): starting it again ($retries of 3)"
        sleep 1
        restart_node
        continue
      fi
      # The head may not have noticed its own loss yet (its `ray start` polls once a second, then stops its other
      # processes): give it up to 20 s to start a restart before calling this node failed.
      for _ in $(seq 40); do
        [[ -z "$target" && "$(generation)" == "$gen" && -e "$STATE/running" ]] || break
        sleep 0.5
        target=$(cat "$STATE/restarting" 2>/dev/null || true)
      done
      if [[ -n "$target" && "$target" != "$gen" ]] || [[ "$(generation)" != "$gen" || ! -e "$STATE/running" ]]; then
        continue
      fi
      # Ray exited by itself: tell the head why (it fails fast while waiting)
      echo "ray start exited: $(grep -v -e '^\s*$' -e '^ray_cluster node agent' "$STATE/nodes/$RANK.log" | tail -n 1)" \
        >"$STATE/nodes/$RANK.error"
      exit 1
    fi
    sleep 0.5
  done
  exit 0
fi

# ------------------------------------------------------------------------------------------------ head
nodes_args=(--scheduler "$SCHEDULER")
[[ -n "$NODEFILE" ]] && nodes_args+=(--nodefile "$NODEFILE")
mapfile -t HOSTS < <(helper nodes "${nodes_args[@]}") || exit 2
[[ ${#HOSTS[@]} -gt 0 ]] || exit 2
NNODES=${#HOSTS[@]}
JOBID=$(sched_job_id)
JOBKEY="${JOBID:-local$$}"
JOBKEY="${JOBKEY%%.*}"
JOBKEY="${JOBKEY//[^A-Za-z0-9]/}"
STATE="$STATE_BASE/$JOBKEY" # under the user's own 0700 state dir; the job id names it, so a second start is refused
NONCE=$(helper nonce)         # random part of this job's node-local directory names
HEAD_IP=$(helper addr "${addr_args[@]}") || exit 2
for p in "$GCS_PORT" "$DASH_PORT" "$CLIENT_PORT"; do
  [[ -n "$p" ]] && { helper check-port --host "$HEAD_IP" --port "$p" || exit 2; }
done
read -r -a free <<<"$(helper ports --host "$HEAD_IP" --count 5)"
GCS_PORT="${GCS_PORT:-${free[0]}}" DASH_PORT="${DASH_PORT:-${free[1]}}" CLIENT_PORT="${CLIENT_PORT:-${free[2]}}"
# The head's dashboard and autoscaler serve their own Prometheus counters on fixed ports (44227, 44217) of every
# interface (Ray 2.60 has no address option for them): per-job ports, so two jobs on a node do not collide.
HEAD_METRIC_ENV=("DASHBOARD_METRIC_PORT=${free[3]}" "AUTOSCALER_METRIC_PORT=${free[4]}")
HEAD_TMP=$(tmp_dir_for 0)

LAUNCHER=$(sched_launcher "$LAUNCHER")

AGENT=(env "NEUROX_PYTHON=$PY" "$SELF" node-agent --profile "$PROFILE" --scheduler "$SCHEDULER" --address "$HEAD_IP:$GCS_PORT" --state "$STATE" --jobkey "$JOBKEY"
  --world "$NNODES" --tmp-base "$TMP_BASE" --nonce "$NONCE" --teardown-s "$TEARDOWN_S")
[[ -n "$IFACE" ]] && AGENT+=(--iface "$IFACE")
[[ -n "$HOST_SUFFIX" ]] && AGENT+=(--host-suffix "$HOST_SUFFIX")
[[ -n "$NUM_GPUS" ]] && AGENT+=(--num-gpus "$NUM_GPUS")
[[ -n "$NUM_CPUS" ]] && AGENT+=(--num-cpus "$NUM_CPUS")
[[ -n "$OBJ_BYTES" ]] && AGENT+=(--object-store-bytes "$OBJ_BYTES")
[[ -n "$STAGE_SRC" ]] && AGENT+=(--stage "$STAGE_SRC" --stage-to "$STAGE_TO")
[[ $SHARD -eq 1 ]] && AGENT+=(--shard)
WORKERS=("${HOSTS[@]:1}")

launch_one() { # prints (dry run) or starts one launcher command in its own session; adds it to LAUNCH_PIDS
  if [[ $DRY_RUN -eq 1 ]]; then show "$@"
  else setsid "$@" </dev/null & LAUNCH_PIDS+=($!)
  fi
}
launch_ssh() { # any scheduler: one ssh per worker host
  local r
  for r in $(seq 1 $((NNODES - 1))); do
    launch_one ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new "${HOSTS[$r]}" "$(printf '%q ' "${AGENT[@]}" --rank "$r")"
  done
}
launch_cmds() { # the scheduler's launcher starts one node agent per worker host (pbs/schedulers/*.sh)
  LAUNCH_PIDS=()
  [[ ${#WORKERS[@]} -eq 0 ]] && return 0
  sched_launch_workers
}

ray_node_args "$HEAD_IP" "$HEAD_TMP"
HEAD_CMD=(env "${HEAD_METRIC_ENV[@]}" "${RAY_CLI[@]}" start --head --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT"
  --include-dashboard true --dashboard-host "$HEAD_IP" --dashboard-port "$DASH_PORT" "${NODE_ARGS[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  echo "profile: $PROFILE   scheduler: $SCHEDULER   nodes: $NNODES (${HOSTS[*]})   head: ${HOSTS[0]} at $HEAD_IP"
  echo "state dir: $STATE (token file $STATE/token, mode 0600; created at start)"
  echo "env on every node: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/token"
  echo "head:"; show "${HEAD_CMD[@]}"
  echo "workers via $LAUNCHER:"; launch_cmds
  [[ ${#CMD[@]} -gt 0 ]] && { echo "then:"; show "${CMD[@]}"; }
  exit 0
fi

# --------------------------------------------------------------------- chaining / continuation preconditions
STOP_FILE="" CHAIN_DIR=""
if [[ -n "$STORAGE" || -n "$STUDY" ]]; then
  [[ -n "$STORAGE" && -n "$STUDY" ]] || die "--storage and --study-name go together"
  STOP_FILE="$STORAGE/$STUDY/STOP"
  CHAIN_DIR="$STORAGE/$STUDY/.pbs_chain"
  mkdir -p "$CHAIN_DIR"
  if [[ -e "$CHAIN_DIR/complete" ]]; then
    log "study '$STUDY' is already complete ($CHAIN_DIR/complete); nothing to do"
    exit 0
  fi
fi
[[ $CHAIN -gt 0 && ( -z "$STOP_FILE" || -z "$JOB_SCRIPT" ) ]] && die "--chain needs --storage, --study-name and --job-script"

# ------------------------------------------------------------------------------------------------ start
# The state dir is created (exclusively) before the teardown trap is set: a second start in the same job stops
# here without touching the running cluster's state, token or processes.
err=$(helper private-dir --parent "$STATE_BASE" --name "$JOBKEY" 2>&1 >/dev/null) ||
  die "state dir $STATE: ${err#ray_cluster: } (another cluster of job $JOBKEY runs, or a crashed one left it)"
HEAD_PID="" WATCH_PID="" WAIT_PID="" CMD_PID="" CLEAN_PID="" RM_PID="" NEXT_JOB="" TORN=0 TMP_MADE=0 LAUNCH_PIDS=()
teardown() {
  local rc=$? t0 deadline
  trap '' TERM INT HUP # a second SIGTERM (PBS signals the whole job) must not cut the teardown short
  [[ $TORN -eq 1 ]] && return 0
  TORN=1
  trap - EXIT
  set +e # best effort from here on: one failed step must not skip the rest
  t0=$(now_ms)
  deadline=$((t0 + TEARDOWN_S * 1000 - 1000)) # PBS SIGKILLs kill_delay (10 s) after SIGTERM: all in parallel
  log "tearing down the Ray cluster (job $JOBKEY, within ${TEARDOWN_S} s)"
  # sensitive things first: the token, then the staged data (removed in the background while the rest stops)
  rm -f "$STATE/token"
  [[ -n "${STAGED_DIR:-}" ]] && { rm -rf "$STAGED_DIR" & RM_PID=$!; }
  rm -f "$STATE/running" # agents notice within 0.5 s and clean their node
  [[ -n "$WATCH_PID" ]] && kill "$WATCH_PID" 2>/dev/null
  [[ -n "$WAIT_PID" ]] && kill "$WAIT_PID" 2>/dev/null
  signal_groups TERM "$CMD_PID" "$HEAD_PID" "${LAUNCH_PIDS[@]}"
  if [[ $TMP_MADE -eq 1 ]]; then # every process of the head's Ray node (also renamed workers), then its temp dir
    helper cleanup --path "$HEAD_TMP" --grace $((TEARDOWN_S / 4 + 1)) --kill-wait 1 &
    CLEAN_PID=$!
  fi
  while [[ $(now_ms) -lt $deadline ]]; do
    any_alive "$CMD_PID" "$HEAD_PID" "$CLEAN_PID" "$RM_PID" "${LAUNCH_PIDS[@]}" || compgen -G "$STATE/nodes/*.json" >/dev/null || break
    sleep 0.1
  done
  local unclean=0
  if compgen -G "$STATE/nodes/*.json" >/dev/null; then
    log "warning: these node agents did not report a clean exit: $(cd "$STATE/nodes" && echo ./*.json)"
    unclean=1
  fi
  signal_groups KILL "$CMD_PID" "$HEAD_PID" "${LAUNCH_PIDS[@]}"
  # an agent killed here before its cleanup leaves its Ray node to the node's watchdog (ray_watchdog.sh), which
  # polls every 0.5 s: give it that long before this job counts as ended (within the deadline's last second)
  [[ $unclean -eq 1 ]] && sleep 0.7
  [[ -n "$CLEAN_PID" ]] && wait "$CLEAN_PID" 2>/dev/null
  any_alive "$RM_PID" && log "warning: staged data $STAGED_DIR still being removed (private to you: mode 0700)"
  if [[ -d "$STATE" ]]; then # keep the bootstrap's logs (never the token) for a post-mortem
    local logs="${NEUROX_LOG_DIR:-$STATE_BASE/logs}/$JOBKEY"
    mkdir -p "$logs" && cp "$STATE"/*.log "$STATE"/nodes/*.log "$STATE"/nodes/*.error "$logs"/ 2>/dev/null
    log "bootstrap logs kept in $logs"
  fi
  rm -rf "$STATE"
  log "teardown took $(($(now_ms) - t0)) ms"
  exit "$rc"
}
trap teardown EXIT
trap 'trap "" TERM INT HUP; log "received termination signal"; exit 143' TERM INT HUP

mkdir "$STATE/nodes"
helper token "$STATE/token"
export RAY_AUTH_TOKEN_PATH="$STATE/token"
touch "$STATE/running"
if [[ -n "$STOP_FILE" && -e "$STOP_FILE" ]]; then
  log "removing the previous allocation's stop file $STOP_FILE (resuming)"
  rm -f "$STOP_FILE"
fi
err=$(make_private "$HEAD_TMP" 2>&1) || die "${err#ray_cluster: }"
TMP_MADE=1
stage_data 0 "$NNODES" || die "staging $STAGE_SRC to $STAGE_TO failed"

log "starting head on ${HOSTS[0]} ($HEAD_IP:$GCS_PORT), $NNODES node(s)"
start_head() { # the marker variable is inherited by every Ray process of the node, so teardown finds them all
  NEUROX_RAY_NODE_TMP="$HEAD_TMP" setsid "${HEAD_CMD[@]}" >>"$STATE/head.log" 2>&1 &
  HEAD_PID=$!
}
wait_for_nodes() { # in the background so that PBS's SIGTERM is handled at once, not after the wait
  local rc
  helper wait --address "$HEAD_IP:$GCS_PORT" --head-ip "$HEAD_IP" --state-dir "$STATE" --nodefile "$STATE/hosts" \
    --timeout "$JOIN_TIMEOUT" --head-pid "$HEAD_PID" >/dev/null &
  WAIT_PID=$!
  set +e
  wait "$WAIT_PID"
  rc=$?
  set -e
  WAIT_PID=""
  if [[ $rc -ne 0 ]]; then
    log "head log tail:"; tail -n 5 "$STATE/head.log" >&2 || true
  fi
  return "$rc"
}
start_head
launch_cmds
printf '%s\n' "${HOSTS[@]}" >"$STATE/hosts" # head first, as the ranks are numbered
rc=0
wait_for_nodes || rc=$?
[[ $rc -eq 0 ]] || exit "$rc"
log "all $NNODES nodes joined"

export RAY_ADDRESS="$HEAD_IP:$GCS_PORT" RAY_API_SERVER_ADDRESS="http://$HEAD_IP:$DASH_PORT"
export NEUROX_RAY_HEAD_IP="$HEAD_IP" NEUROX_RAY_NUM_NODES="$NNODES"
cat >&2 <<EOF
ray_cluster: dashboard and job API: http://$HEAD_IP:$DASH_PORT (token auth)
ray_cluster: from your laptop:  ssh -N -L 8265:$HEAD_IP:$DASH_PORT ${USER:-you}@${PBS_O_HOST:-${SLURM_SUBMIT_HOST:-<login node>}}
ray_cluster:   then open http://localhost:8265; the dashboard asks for the token in $RAY_AUTH_TOKEN_PATH
ray_cluster: on a login node:   RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH ray job submit --address http://$HEAD_IP:$DASH_PORT ...
EOF
printf 'RAY_ADDRESS=%s\nRAY_API_SERVER_ADDRESS=%s\nRAY_AUTH_MODE=token\nRAY_AUTH_TOKEN_PATH=%s\n' \
  "$RAY_ADDRESS" "$RAY_API_SERVER_ADDRESS" "$RAY_AUTH_TOKEN_PATH" >"$STATE/cluster.env"

if [[ -n "$STOP_FILE" ]]; then
  "$PY" "$HELPER" watch-walltime --scheduler "$SCHEDULER" --stop-file "$STOP_FILE" --margin "$STOP_MARGIN" &
  WATCH_PID=$!
fi
if [[ $CHAIN -gt 0 && -n "$JOBID" ]]; then
  if NEXT_JOB=$(sched_chain "$JOB_SCRIPT" $((CHAIN - 1))); then
    log "chained continuation job $NEXT_JOB (runs after this one; exits at once if the study completes)"
  else
    NEXT_JOB=""
    log "warning: could not chain a continuation job ($SCHEDULER)"
  fi
fi

if [[ "$MODE" == up ]]; then
  log "cluster is up; Ctrl-C (or qdel/scancel of the job) tears it down"
  while kill -0 "$HEAD_PID" 2>/dev/null; do sleep 2; done
  log "the head's Ray process exited"
  exit 1
fi

[[ ${#CMD[@]} -gt 0 ]] || die "run needs a command after '--'"
restart_head() { # the head's Ray died while CMD ran: stop CMD, restart the head on the same ports, every node rejoins
  local gen
  gen=$(($(cat "$STATE/generation" 2>/dev/null || echo 0) + 1))
  # agents whose Ray loses the head wait for this generation instead of failing
  echo "$gen" >"$STATE/restarting.tmp" && mv "$STATE/restarting.tmp" "$STATE/restarting"
  signal_groups TERM "$CMD_PID"
  wait_group_gone "$CMD_PID" 5
  signal_groups KILL "$CMD_PID"
  wait "$CMD_PID" 2>/dev/null || true
  CMD_PID=""
  signal_groups KILL "$HEAD_PID"
  helper cleanup --path "$HEAD_TMP" --grace 2 --kill-wait 1 >/dev/null
  make_private "$HEAD_TMP" || return 1
  echo "$gen" >"$STATE/generation.tmp" && mv "$STATE/generation.tmp" "$STATE/generation"
  start_head
  wait_for_nodes || return 1
  rm -f "$STATE/restarting"
  log "head restarted; all $NNODES nodes joined again (generation $gen)"
}
restarts=0
while true; do
  set +e
  setsid "${CMD[@]}" &
  CMD_PID=$!
  # SIGTERM's trap runs within one 0.5 s sleep
  while kill -0 "$CMD_PID" 2>/dev/null && kill -0 "$HEAD_PID" 2>/dev/null; do sleep 0.5; done
  if ! kill -0 "$CMD_PID" 2>/dev/null; then
    wait "$CMD_PID"
    rc=$?
    # a command that failed because the head died with it counts as a head loss
    if [[ $rc -eq 0 ]] || kill -0 "$HEAD_PID" 2>/dev/null; then
      set -e
      CMD_PID=""
      break
    fi
  fi
  set -e
  log "head lost: its Ray processes exited while the command ran ($(grep -v '^\s*$' "$STATE/head.log" | tail -n 1))"
  if [[ $restarts -ge $HEAD_RESTARTS ]]; then
    log "no head restarts left (--head-restarts $HEAD_RESTARTS): exiting; a chained job (or a rerun) resumes the study"
    exit 1
  fi
  restarts=$((restarts + 1))
  log "restarting the head ($restarts of $HEAD_RESTARTS) and rerunning the command; the study resumes from its storage"
  restart_head || { log "the head did not come back: exiting; a chained job (or a rerun) resumes the study"; exit 1; }
done
if [[ -n "$STOP_FILE" ]]; then
  if [[ $rc -eq 0 && ! -e "$STOP_FILE" ]]; then
    touch "$CHAIN_DIR/complete"
    log "study '$STUDY' finished"
    [[ -n "$NEXT_JOB" ]] && sched_cancel "$NEXT_JOB" 2>/dev/null && log "cancelled continuation job $NEXT_JOB"
  elif [[ -e "$STOP_FILE" ]]; then
    log "stopped before the walltime; resubmit with the same --study-name (or let the chained job) resume it"
  fi
fi
exit "$rc"
}
