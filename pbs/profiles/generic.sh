# shellcheck shell=bash
# Generic site, PBS or Slurm (whichever job this is): CUDA GPUs counted by Ray, or CPUs only.
#
# A site profile is data: the variables below, then the environment the site's collective library wants.
# ray_cluster.sh sources it on every node before Ray starts (so Ray workers, the DeepSpeed ranks, inherit the
# exports), loads the modules it names, and discovers it from this folder: a new site is one new file here
# (copy this one; pbs/README.md, "Adding a site"). Every variable uses ${VAR:-default}, so a user's value wins.
#
#   PROFILE_SCHEDULER        pbs | slurm | "" (auto: the job's environment decides)
#   PROFILE_DEVICE_KIND      the run planner's device kind (study/device_kinds.json: a100-40gb, a100-80gb,
#                            h100-80gb, max1550-tile, mi250x-gcd, ...); "" = the preset's default
#   PROFILE_DEVICES_PER_NODE GPUs (tiles, GCDs) per node given to Ray ("" = let Ray detect them); a ladder
#                            study runs each run on one node's devices
#   PROFILE_CPUS_PER_DEVICE  CPU cores per device for a run's data loaders ("" = the planner's default)
#   PROFILE_IFACE            high-speed interface ("" = the node's single non-loopback interface)
#   PROFILE_HOST_SUFFIX      host name suffix that resolves to the high-speed address
#   PROFILE_LAUNCHER_ARGS    extra arguments for the scheduler's node launcher (mpiexec "--cpu-bind none",
#                            srun "--cpu-bind=none")
#   PROFILE_MODULE_USE       module paths to `module use`; PROFILE_MODULES: modules to `module load`, in order
#   PROFILE_CONDA_ENV        conda environment to activate after the modules ($NEUROX_CONDA_ENV overrides)
#   PROFILE_PY_MODULES       Python modules the site needs beside Ray (a warning names a missing one),
#                            PROFILE_PY_HINT: how to get them
#   PROFILE_PRESET           default study preset of the job templates (site-free: ladder, ladder-xl, demo, ...;
#                            the job plans it for this site: study/scaling_law.py --site NAME)
#   PROFILE_STAGE_TO         node-local directory for NEUROX_STAGE in the job templates
PROFILE_SCHEDULER="${PROFILE_SCHEDULER:-}"
PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-}"
PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-}"
PROFILE_CPUS_PER_DEVICE="${PROFILE_CPUS_PER_DEVICE:-}"
PROFILE_IFACE="${PROFILE_IFACE:-}"
PROFILE_HOST_SUFFIX="${PROFILE_HOST_SUFFIX:-}"
PROFILE_LAUNCHER_ARGS="${PROFILE_LAUNCHER_ARGS:-}"
PROFILE_MODULE_USE="${PROFILE_MODULE_USE:-}"
PROFILE_MODULES="${PROFILE_MODULES:-}"
PROFILE_CONDA_ENV="${PROFILE_CONDA_ENV:-}"
PROFILE_PY_MODULES="${PROFILE_PY_MODULES:-}"
PROFILE_PY_HINT="${PROFILE_PY_HINT:-}"
PROFILE_PRESET="${PROFILE_PRESET:-demo}"
PROFILE_STAGE_TO="${PROFILE_STAGE_TO:-/tmp}"
# --- the site's environment
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
