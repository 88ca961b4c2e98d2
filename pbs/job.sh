#!/usr/bin/env bash
# The body of the job templates, pbs/neurox.pbs (PBS) and pbs/neurox.sbatch (Slurm): bootstrap the Ray cluster with
# the site profile $NEUROX_PROFILE and `ray job submit` the study. Run from the repository root; $1 = the template
# (submitted again for continuation jobs). Settings (qsub -v / sbatch --export, NAME=value; defaults in brackets):
#   NEUROX_PROFILE      the site: a file pbs/profiles/NAME.sh (aurora, polaris, frontier, perlmutter, generic) [generic]
#   NEUROX_STUDY        study name; a new job with the same name resumes the study      [scaling-law]
#   NEUROX_STORAGE      shared directory for results, checkpoints, reports             [$PWD/studies]
#   NEUROX_PRESET       study/plans.py preset (planned for this site: --site NAME)   [the profile's PROFILE_PRESET]
#   NEUROX_MANIFEST     cohort manifest (Parquet); the demo preset makes a synthetic one
#   NEUROX_STUDY_ARGS   more arguments for study/scaling_law.py (e.g. "--asha --wandb")
#   NEUROX_STOP_MARGIN  seconds before the walltime at which trials stop with a final checkpoint [900]
#   NEUROX_CHAIN        continuation jobs to chain (afterany dependency) until the study completes [0]
#   NEUROX_QSUB_ARGS / NEUROX_SBATCH_ARGS  extra qsub / sbatch arguments for chained jobs (e.g. "-A myproj")
#   NEUROX_STAGE        data directory to copy to node-local storage at job start (see pbs/README.md)
#   NEUROX_STAGE_TO     node-local target for NEUROX_STAGE                            [the profile's PROFILE_STAGE_TO]
#   NEUROX_SHARD        1: each node copies only its share of the subjects             [0]
#   NEUROX_DRY_RUN      1: print the plan (nodes, launcher, commands) and start nothing  [0]
set -euo pipefail
template="${1:?usage: pbs/job.sh TEMPLATE (run by pbs/neurox.pbs or pbs/neurox.sbatch)}"
profile="${NEUROX_PROFILE:-generic}"
if [[ ! "$profile" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ || ! -f "pbs/profiles/$profile.sh" ]]; then
  echo "neurox job: NEUROX_PROFILE='$profile' is not a file pbs/profiles/NAME.sh (run from the repository root)" >&2
  exit 2
fi
# the profile's data (preset, staging dir); ray_cluster.sh sources it again on every node
# shellcheck source=profiles/generic.sh
source "pbs/profiles/$profile.sh"
study="${NEUROX_STUDY:-scaling-law}"
storage="${NEUROX_STORAGE:-$PWD/studies}"
opts=(--profile "$profile" --storage "$storage" --study-name "$study" --stop-margin "${NEUROX_STOP_MARGIN:-900}"
  --chain "${NEUROX_CHAIN:-0}" --job-script "$template")
if [[ -n "${NEUROX_STAGE:-}" ]]; then
  opts+=(--stage "$NEUROX_STAGE" --stage-to "${NEUROX_STAGE_TO:-$PROFILE_STAGE_TO}")
  [[ "${NEUROX_SHARD:-0}" == 1 ]] && opts+=(--shard)
fi
[[ "${NEUROX_DRY_RUN:-0}" == 1 ]] && opts+=(--dry-run)
# presets are site-free: the study plans a ladder for this site's hardware, read from the same profile (study/sites.py)
study_args=(--preset "${NEUROX_PRESET:-$PROFILE_PRESET}" --site "$profile" --address auto --storage "$storage"
  --study-name "$study")
[[ -n "${NEUROX_MANIFEST:-}" ]] && study_args+=(--manifest "$NEUROX_MANIFEST")
read -r -a extra <<<"${NEUROX_STUDY_ARGS:-}"
exec pbs/ray_cluster.sh run "${opts[@]}" -- \
  ray job submit --working-dir . -- python study/scaling_law.py "${study_args[@]}" "${extra[@]}"
