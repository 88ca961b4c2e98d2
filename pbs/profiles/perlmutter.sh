# shellcheck shell=bash
# NERSC Perlmutter GPU nodes (Slurm): 4 NVIDIA A100 40 GB per node, HPE Slingshot 11 (hsn0..hsn3).
# Not run on Perlmutter itself (no Slurm where this was written): see pbs/README.md. Variables: see generic.sh.
PROFILE_SCHEDULER="${PROFILE_SCHEDULER:-slurm}"
PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-a100-40gb}" # the 80 GB nodes (-C gpu&hbm80g): a100-80gb
PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-4}"
PROFILE_CPUS_PER_DEVICE="${PROFILE_CPUS_PER_DEVICE:-16}" # 64 cores / 4 GPUs
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind=none}"
# NERSC's PyTorch module (with its NCCL and aws-ofi-nccl); then $NEUROX_VENV (pip install --user ray, NeuroX)
PROFILE_MODULES="${PROFILE_MODULES:-pytorch}"
PROFILE_PRESET="${PROFILE_PRESET:-ladder}"
PROFILE_STAGE_TO="${PROFILE_STAGE_TO:-/tmp}" # no node-local disk: /tmp is memory
# --- the site's environment: NCCL over Slingshot (NERSC's recommended settings)
export NEUROX_DEVICE="${NEUROX_DEVICE:-cuda}"
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-1}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-hsn}"
export FI_CXI_DISABLE_HOST_REGISTER="${FI_CXI_DISABLE_HOST_REGISTER:-1}"
export FI_MR_CACHE_MONITOR="${FI_MR_CACHE_MONITOR:-userfaultfd}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-16}"
