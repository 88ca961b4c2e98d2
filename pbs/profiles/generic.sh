# shellcheck shell=bash
# Generic PBS cluster profile: CUDA GPUs (counted by Ray from CUDA_VISIBLE_DEVICES/nvidia-smi) or CPUs only.
# Sourced by ray_cluster.sh on every node before Ray starts, so Ray workers inherit these variables.
# Variables a profile may set (ray_cluster.sh options override them):
#   PROFILE_IFACE        high-speed interface ("" = the node's single non-loopback interface)
#   PROFILE_HOST_SUFFIX  host name suffix that resolves to the high-speed address
#   PROFILE_NUM_GPUS     GPUs per node given to Ray ("" = let Ray detect them)
#   PROFILE_LAUNCHER_ARGS extra mpiexec arguments (e.g. "--cpu-bind none" for PALS, "-bind-to none" for Hydra)
PROFILE_IFACE="${PROFILE_IFACE:-}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
PROFILE_NUM_GPUS="${PROFILE_NUM_GPUS:-}"
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:-}"
export PROFILE_IFACE PROFILE_HOST_SUFFIX PROFILE_NUM_GPUS PROFILE_LAUNCHER_ARGS
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
