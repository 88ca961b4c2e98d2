"""Test harness: the smallest real study for study/scaling_law.py on the namespace cluster (2 tiny runs)."""
from __future__ import annotations

from typing import Any


def plan(opts: Any = None):
    from study.plans import StudyPlan, isoflop_grid
    from study.spec import RunSpec

    base = RunSpec(study=getattr(opts, "study_name", None) or "pbs-tiny", family="swift_v2", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=2, lr=3e-3, schedule="cosine",
                   warmup_frac=0.1, eval_every=1000, eval_windows=4, checkpoint_every=2,
                   manifest=getattr(opts, "manifest", None) or "", precision="fp32", seed=0)
    specs = isoflop_grid(base, budgets=(1.0e9,), widths=(16, 32), min_steps=3, max_steps=30)
    return StudyPlan(name="pbs-tiny", specs=specs, description="two tiny runs for the PBS namespace test",
                     cohort={"n_subjects": 8, "grid": (24, 24, 24), "n_frames": 16, "seed": 0})


def longer(opts: Any = None):
    """Two runs of ~30-90 steps with a checkpoint every 5 (the head-loss test kills the head mid-run)."""
    from study.plans import StudyPlan, isoflop_grid
    from study.spec import RunSpec

    base = RunSpec(study=getattr(opts, "study_name", None) or "pbs-longer", family="swift_v2", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=2, lr=3e-3, schedule="cosine",
                   warmup_frac=0.1, eval_every=1000, eval_windows=4, checkpoint_every=5,
                   manifest=getattr(opts, "manifest", None) or "", precision="fp32", seed=0)
    specs = isoflop_grid(base, budgets=(8.0e9,), widths=(16, 32), min_steps=10, max_steps=120)
    return StudyPlan(name="pbs-longer", specs=specs, description="two short runs for the head-loss test",
                     cohort={"n_subjects": 8, "grid": (24, 24, 24), "n_frames": 16, "seed": 0})
