# shellcheck shell=bash
# OLCF Frontier (Slurm): 4 AMD MI250X per node x 2 GCDs = 8 ranks under ROCm, HPE Slingshot 11 (hsn0..hsn3).
# PyTorch built for ROCm (HIP) calls the GCDs "cuda" devices and RCCL answers to torch's "nccl" backend, so the
# study's device layer needs no ROCm branch: NEUROX_DEVICE=cuda, NEUROX_DIST_BACKEND=nccl.
# Not run on Frontier itself (no Slurm or ROCm hardware where this was written): see pbs/README.md.
# Variables: see generic.sh.
PROFILE_SCHEDULER="${PROFILE_SCHEDULER:-slurm}"
PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-mi250x-gcd}"
PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-8}"
PROFILE_CPUS_PER_DEVICE="${PROFILE_CPUS_PER_DEVICE:-7}" # 56 cores free in low-noise mode / 8 GCDs
PROFILE_IFACE="${PROFILE_IFACE:-hsn0}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
# srun: do not pin the node agent (and so all of Ray's processes on the node) to one core
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:---cpu-bind=none}"
# OLCF's ROCm PyTorch stack; your environment (NeuroX, Ray) through $NEUROX_CONDA_ENV or $NEUROX_VENV
PROFILE_MODULES="${PROFILE_MODULES:-PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a miniforge3}"
PROFILE_PRESET="${PROFILE_PRESET:-ladder}"
PROFILE_STAGE_TO="${PROFILE_STAGE_TO:-/mnt/bb/${USER:-$EUID}}" # node-local NVMe (sbatch -C nvme)
# --- the site's environment
export NEUROX_DEVICE="${NEUROX_DEVICE:-cuda}"
export NEUROX_DIST_BACKEND="${NEUROX_DIST_BACKEND:-nccl}"
# ROCm device visibility (the rule of study.devices.rocm_visible_env, tested against this file): ROCr filters the
# GCDs first (ROCR_VISIBLE_DEVICES, set by Slurm's --gpu-bind), HIP_VISIBLE_DEVICES indexes what ROCr left, and Ray
# gives each worker its GCDs through HIP_VISIBLE_DEVICES but refuses to start when only ROCR_VISIBLE_DEVICES is set.
if [[ -n "${ROCR_VISIBLE_DEVICES:-}" && -z "${HIP_VISIBLE_DEVICES:-}" ]]; then
  _nx_n=$(tr ',' '\n' <<<"$ROCR_VISIBLE_DEVICES" | grep -c '[^[:space:]]')
  HIP_VISIBLE_DEVICES=$(seq -s, 0 $((_nx_n - 1)))
  export HIP_VISIBLE_DEVICES
  unset _nx_n
fi
unset CUDA_VISIBLE_DEVICES # HIP honours it too: a stale value would filter the GCDs a second time
# RCCL over Slingshot (OLCF's settings; the aws-ofi-rccl plugin: put its lib/ in $NEUROX_RCCL_PLUGIN)
if [[ -n "${NEUROX_RCCL_PLUGIN:-}" ]]; then export LD_LIBRARY_PATH="$NEUROX_RCCL_PLUGIN/lib:${LD_LIBRARY_PATH:-}"; fi
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-hsn0}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-hsn0}"
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-3}"
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-1}"
export FI_PROVIDER="${FI_PROVIDER:-cxi}"
export FI_CXI_ATS="${FI_CXI_ATS:-0}"
export FI_CXI_DISABLE_HOST_REGISTER="${FI_CXI_DISABLE_HOST_REGISTER:-1}"
export FI_MR_CACHE_MONITOR="${FI_MR_CACHE_MONITOR:-userfaultfd}"
export FI_CXI_DEFAULT_CQ_SIZE="${FI_CXI_DEFAULT_CQ_SIZE:-131072}"
# MIOpen's kernel database: node-local, inside the user's private 0700 directory (SECURITY.md)
export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-${NEUROX_TMP_BASE:-/tmp}/nx-$EUID/miopen}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-7}"
