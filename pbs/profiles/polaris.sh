# shellcheck shell=bash
# ALCF Polaris: 4 NVIDIA A100 per node, HPE Slingshot 11 (hsn0/hsn1, libfabric "cxi" provider).
# Sourced by ray_cluster.sh on every node before Ray starts, so Ray workers (DeepSpeed/NCCL ranks) inherit it.
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
PROFILE_NUM_GPUS="${PROFILE_NUM_GPUS:-4}"
# PALS mpiexec: do not pin the node agent (and so all of Ray's processes on the node) to one core
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind none}"
export PROFILE_IFACE PROFILE_HOST_SUFFIX PROFILE_NUM_GPUS PROFILE_LAUNCHER_ARGS
if [[ -z "${NEUROX_SKIP_MODULES:-}" ]] && command -v module >/dev/null 2>&1; then
  set +u  # module and conda scripts read unset variables
  module use /soft/modulefiles 2>/dev/null || true
  module load conda 2>/dev/null || true
  conda activate "${NEUROX_CONDA_ENV:-base}"  # ALCF's PyTorch env, or yours with NeuroX and Ray installed
  if [[ -n "${NEUROX_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$NEUROX_VENV/bin/activate"
  fi
  set -u
fi
# NCCL over Slingshot through the aws-ofi-nccl plugin (ALCF's recommended settings).
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-1}"
export NCCL_COLLNET_ENABLE="${NCCL_COLLNET_ENABLE:-1}"
export NCCL_NET="${NCCL_NET:-AWS Libfabric}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-hsn}"
export FI_PROVIDER="${FI_PROVIDER:-cxi}"
export FI_CXI_DISABLE_HOST_REGISTER="${FI_CXI_DISABLE_HOST_REGISTER:-1}"
export FI_MR_CACHE_MONITOR="${FI_MR_CACHE_MONITOR:-userfaultfd}"
export FI_CXI_DEFAULT_CQ_SIZE="${FI_CXI_DEFAULT_CQ_SIZE:-131072}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
