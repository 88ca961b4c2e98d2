"""Study plans for the fault tests, loaded by the driver as ``--preset faults_plans:<name>``
(``tests/faults`` on ``PYTHONPATH``)."""
from __future__ import annotations

from typing import Any

from study.plans import StudyPlan
from study.spec import RunSpec


def diverging(opts: Any = None) -> StudyPlan:
    """Three tiny NeuroMamba runs; the middle one has an exploding LR (1e30, no clipping, no warmup):
    its loss is NaN at step 2, after the step-1 checkpoint."""
    base = RunSpec(study=getattr(opts, "study_name", None) or "diverging", family="neuromamba", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, budget=4, eval_every=2, eval_windows=2,
                   checkpoint_every=2, manifest=getattr(opts, "manifest", None) or "", precision="fp32")
    bad = base.replace(lr=1e30, grad_clip=0.0, warmup_frac=0.0, schedule="constant", checkpoint_every=1)
    return StudyPlan(name="diverging", specs=[base.replace(seed=1), bad, base.replace(seed=2)])
