# shellcheck shell=bash
# ALCF Aurora (PBS): 6 Intel Data Center GPU Max per node x 2 tiles = 12 ranks, HPE Slingshot 11 (hsn0..hsn7).
# Ray detects Intel GPUs only through dpctl, so the tiles are declared explicitly (12 per node), and Ray sets
# ZE_AFFINITY_MASK for each worker from its assigned GPU ids (FLAT hierarchy: one id per tile).
# Variables: see generic.sh.
PROFILE_SCHEDULER="${PROFILE_SCHEDULER:-pbs}"
PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-max1550-tile}"
PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-12}"
PROFILE_CPUS_PER_DEVICE="${PROFILE_CPUS_PER_DEVICE:-8}" # 104 cores / 12 tiles
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
# PALS mpiexec: do not pin the node agent (and so all of Ray's processes on the node) to one core
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind none}"
# PyTorch + IPEX/XPU, oneCCL bindings (torch "xccl" backend), Intel MPI; then $NEUROX_VENV if set
PROFILE_MODULES="${PROFILE_MODULES:-frameworks}"
PROFILE_PY_MODULES="${PROFILE_PY_MODULES:-dpctl}"
PROFILE_PY_HINT="${PROFILE_PY_HINT:-without it Ray treats the 12 GPUs as CUDA devices and sets CUDA_VISIBLE_DEVICES, not ZE_AFFINITY_MASK: install dpctl in this environment (pip install dpctl)}"
PROFILE_PRESET="${PROFILE_PRESET:-ladder-xl}"
PROFILE_STAGE_TO="${PROFILE_STAGE_TO:-/tmp}"
# --- the site's environment
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
