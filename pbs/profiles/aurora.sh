# shellcheck shell=bash
# ALCF Aurora: 6 Intel Data Center GPU Max per node x 2 tiles = 12 ranks, HPE Slingshot 11 (hsn0..hsn7).
# Sourced by ray_cluster.sh on every node before Ray starts, so Ray workers (DeepSpeed ranks) inherit it.
# Ray detects Intel GPUs only through dpctl, so the tiles are declared explicitly: --num-gpus 12, and Ray
# sets ZE_AFFINITY_MASK for each worker from its assigned GPU ids (FLAT hierarchy: one id per tile).
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
PROFILE_NUM_GPUS="${PROFILE_NUM_GPUS:-12}"
# PALS mpiexec: do not pin the node agent (and so all of Ray's processes on the node) to one core
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind none}"
export PROFILE_IFACE PROFILE_HOST_SUFFIX PROFILE_NUM_GPUS PROFILE_LAUNCHER_ARGS
if [[ -z "${NEUROX_SKIP_MODULES:-}" ]] && command -v module >/dev/null 2>&1; then
  set +u  # module and conda scripts read unset variables
  module load frameworks   # PyTorch + IPEX/XPU, oneCCL bindings (torch "xccl" backend), Intel MPI
  if [[ -n "${NEUROX_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$NEUROX_VENV/bin/activate"
  fi
  set -u
fi
export ZE_FLAT_DEVICE_HIERARCHY=FLAT
export NEUROX_DIST_BACKEND="${NEUROX_DIST_BACKEND:-xccl}"
# GPU plans run on XPU tiles: decided by the trial driver, which sees no accelerator (study.devices.gpu_kind)
export NEUROX_DEVICE="${NEUROX_DEVICE:-xpu}"
# oneCCL: ranks are started by Ray, not by mpiexec, so CCL must not look for an MPI/PMI launcher.
export CCL_PROCESS_LAUNCHER=none
export CCL_ATL_TRANSPORT="${CCL_ATL_TRANSPORT:-ofi}"
# the key-value store that joins the ranks listens on the high-speed interface
export CCL_KVS_IFACE="${CCL_KVS_IFACE:-hsn0}"
export CCL_ZE_IPC_EXCHANGE="${CCL_ZE_IPC_EXCHANGE:-sockets}"
export CCL_ENABLE_AUTO_CACHE="${CCL_ENABLE_AUTO_CACHE:-0}"
export CCL_ALLREDUCE="${CCL_ALLREDUCE:-topo}"
export CCL_ALLREDUCE_SCALEOUT="${CCL_ALLREDUCE_SCALEOUT:-rabenseifner}"
export CCL_BCAST="${CCL_BCAST:-double_tree}"
export FI_PROVIDER="${FI_PROVIDER:-cxi}"
export FI_CXI_DEFAULT_CQ_SIZE="${FI_CXI_DEFAULT_CQ_SIZE:-1048576}"
export FI_CXI_RX_MATCH_MODE="${FI_CXI_RX_MATCH_MODE:-hybrid}"
export FI_MR_CACHE_MONITOR="${FI_MR_CACHE_MONITOR:-userfaultfd}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# Ray hands out "GPU" ids through ZE_AFFINITY_MASK only when it detects the Intel GPUs, which needs dpctl.
profile_check() { # $1 = the python that runs Ray
  if ! "$1" -c "import dpctl" 2>/dev/null; then
    echo "ray_cluster: warning: $1 cannot import dpctl, so Ray treats the 12 GPUs as CUDA devices and sets" \
      "CUDA_VISIBLE_DEVICES, not ZE_AFFINITY_MASK: install dpctl in this environment (pip install dpctl)" >&2
  fi
}
