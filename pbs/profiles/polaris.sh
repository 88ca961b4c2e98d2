# shellcheck shell=bash
# ALCF Polaris (PBS): 4 NVIDIA A100 40 GB per node, HPE Slingshot 11 (hsn0/hsn1, libfabric "cxi" provider).
# Variables: see generic.sh.
PROFILE_SCHEDULER="${PROFILE_SCHEDULER:-pbs}"
PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-a100-40gb}"
PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-4}"
PROFILE_CPUS_PER_DEVICE="${PROFILE_CPUS_PER_DEVICE:-8}" # 32 cores / 4 GPUs
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
# PALS mpiexec: do not pin the node agent (and so all of Ray's processes on the node) to one core
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind none}"
PROFILE_MODULE_USE="${PROFILE_MODULE_USE:-/soft/modulefiles}"
PROFILE_MODULES="${PROFILE_MODULES:-conda}"
# ALCF's PyTorch env, or yours with NeuroX and Ray installed ($NEUROX_CONDA_ENV); then $NEUROX_VENV if set
PROFILE_CONDA_ENV="${PROFILE_CONDA_ENV:-base}"
PROFILE_PRESET="${PROFILE_PRESET:-ladder}"
PROFILE_STAGE_TO="${PROFILE_STAGE_TO:-/local/scratch}"
# --- the site's environment: NCCL over Slingshot through the aws-ofi-nccl plugin (ALCF's recommended settings)
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
