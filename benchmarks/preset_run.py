"""One run of a cluster preset, as the planner configures it, shortened to a fixed number of steps: the measure of
issue #22's study-path target ("the preset's 51M run ... launched through study/scaling_law.py").

It is a plan function for ``study/scaling_law.py --preset benchmarks.preset_run:ladder_run``: the ``ladder`` preset's
run of ``NEUROX_PRESET_SIZE`` (default 51M) for ``NEUROX_PRESET_SITE`` (default polaris: its global batch of 8
samples per device x 4 devices per node), re-planned by ``study.planner`` for the ``--device-kind`` and
``--cpus-per-device`` of the machine it runs on, with ``NEUROX_PRESET_WORKERS`` workers (default 1) and
``NEUROX_PRESET_STEPS`` steps (default 300); evaluation and checkpoints only at the end. Everything else (model
config, muP, ZeRO stage, precision, loader) is the preset's. Then::

    python benchmarks/preset_run.py --storage DIR --study-name NAME   # the run's rate from its store rows

prints (and writes as JSON) the median samples/s over the logged steps after the first ``--skip`` (compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ladder_run(opts: Any = None):
    from study.plans import StudyPlan, ladder
    from study.planner import plan_study

    size = os.environ.get("NEUROX_PRESET_SIZE", "51M")
    site = os.environ.get("NEUROX_PRESET_SITE", "polaris")
    steps = int(os.environ.get("NEUROX_PRESET_STEPS", "300"))
    workers = int(os.environ.get("NEUROX_PRESET_WORKERS", "1"))
    kind = getattr(opts, "device_kind", None) or "h100-80gb"
    cpus = getattr(opts, "cpus_per_device", None) or 8
    preset = ladder(SimpleNamespace(manifest=getattr(opts, "manifest", None), site=site, device_kind=None,
                                    cpus_per_device=None, study_name=getattr(opts, "study_name", None),
                                    lr_from=getattr(opts, "lr_from", None),
                                    parametrization=getattr(opts, "parametrization", None)))
    spec = next(s for s in preset.specs if s.size == size)
    every = int(os.environ.get("NEUROX_PRESET_EVAL_EVERY", "30"))  # each evaluation row carries the rate of the
    # 10 steps before it (the store keeps evaluation rows only); 4 windows keep evaluations short
    spec = spec.replace(budget_kind="steps", budget=float(steps), eval_every=every, eval_windows=4,
                        checkpoint_every=0, log_every=10, micro_batch_size=None,
                        n_subjects=None)  # all of --manifest's subjects (a test cohort has fewer than the preset's)
    specs, plans = plan_study([spec], kind, workers=workers, cpus_per_device=cpus)
    return StudyPlan(name=preset.name, specs=specs, num_workers=workers, use_gpu=True,
                     description=f"ladder --site {site}'s {size} run ({steps} steps) on {workers} x {kind}",
                     extra={**preset.extra, "hardware": f"{workers} x {kind} per run (re-planned from site {site})"},
                     device_kind=kind, run_plans=plans)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", required=True, help="the study's --storage")
    ap.add_argument("--study-name", required=True, help="the study's --study-name")
    ap.add_argument("--skip", type=int, default=2,
                    help="store rows to leave out at the start (compiles, warm-up; default %(default)s)")
    ap.add_argument("--out", default=None, help="JSON file")
    a = ap.parse_args(argv)
    import numpy as np

    from analysis.store import read_table

    df = read_table(str(Path(a.storage) / a.study_name / "store"), "train")
    df = df[df["samples_per_s"].notna()].sort_values("step") if "samples_per_s" in df else df.iloc[0:0]
    if df.empty:
        print("no logged rows with samples_per_s", file=sys.stderr)
        return 1
    rates = df["samples_per_s"].to_numpy()[a.skip:]
    res = {"run_id": str(df["run_id"].iloc[0]), "steps": int(df["step"].max()), "rows": len(df),
           "samples_per_s": float(np.median(rates)) if len(rates) else float("nan"),
           "samples_per_s_all": [round(float(x), 2) for x in df["samples_per_s"]],
           **{k: (df[k].iloc[-1].item() if hasattr(df[k].iloc[-1], "item") else df[k].iloc[-1])
              for k in ("peak_mem_gib", "device_kind", "device_count", "train_loss") if k in df}}
    print(json.dumps(res, default=str))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
