"""Data-diversity study (the seed report's Figure 2; issue #27 item 5): one ladder trained once per data mixture.

Every run of a ladder is trained on each mixture (default: ``cohort_a`` alone, and ``all``, every cohort in its
natural share), all in one study store (the mixture is part of each run's id and the store's ``mixture`` column), and
:mod:`analysis.diversity` fits, per mixture, the law the study report fits: validity and warnings, the exponents with
bootstrap intervals, the held-out extrapolation error, and a plot with one panel per mixture. Validation windows
cover every cohort for every run (``study.train``), so ``val_loss`` compares the mixtures on the same data.

On 2 CPU cores (the demo's synthetic cohort and widths at its five smallest budgets: 8 runs per mixture)::

    python -m study.diversity --quick

Another ladder: a preset's runs (``--preset demo``: the demo's whole IsoFLOP grid; ``--preset ladder --site polaris
--manifest ...``), without the preset's own mixture runs. Mixtures are ``all``, a cohort name, or
``cohort:weight,cohort:weight``::

    python -m study.diversity --preset demo --mixtures cohort_b all
    python -m study.diversity --quick --n-subjects 24      # the same number of subjects in every mixture

Rerunning the same command resumes it like any study (``study.runner.run_plan``: finished runs are skipped). The
report goes to ``<storage>/<study-name>/report/diversity/``; ``python -m analysis diversity <store>`` redoes it from
the store alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python study/diversity.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from typing import Any, Mapping

from study.plans import DEMO_BUDGETS, StudyPlan

#: the mixtures compared by default: one cohort against every cohort in its natural share
DEFAULT_MIXTURES = ("cohort_a", "all")
#: ``--quick``: the demo's ladder (its widths, LR rule and 200-1100-step window) at its five smallest budgets,
#: 4.8e10 .. 7.7e11 FLOPs: 8 runs per mixture, 4 widths, 5 budgets (enough distinct N and D for approach 3)
QUICK_MAX_BUDGET = sorted(DEMO_BUDGETS)[4]


def parse_mixture(text: str) -> dict[str, float]:
    """``all`` -> ``{}`` (every cohort, natural shares); ``cohort_a`` -> ``{"cohort_a": 1.0}``;
    ``cohort_a:0.7,cohort_b:0.3`` -> those weights. ``ValueError`` on anything else."""
    t = text.strip()
    if t == "all":
        return {}
    out: dict[str, float] = {}
    for part in t.split(","):
        name, _, w = part.strip().partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError as exc:
            raise ValueError(f"mixture {text!r}: weight {w!r} of {name!r} is not a number") from exc
        if not name or not weight > 0:
            raise ValueError(f"mixture {text!r}: write 'all', a cohort name or cohort:weight,cohort:weight "
                             "(weights > 0)")
        out[name] = weight
    return out


def ladder_plan(preset: str, opts: Any = None, *, max_budget: float | None = None) -> StudyPlan:
    """The ladder every mixture trains: a preset's runs without those that set their own mixture (the demo's
    one-cohort run), optionally only budgets up to ``max_budget``."""
    from study.plans import load_plan

    plan = load_plan(preset, opts)
    specs = [s for s in plan.specs if not s.cohorts and (max_budget is None or s.budget <= max_budget * (1 + 1e-9))]
    if not specs:
        raise ValueError(f"preset {preset!r} has no runs on the natural mixture"
                         + (f" at budgets <= {max_budget:.3g}" if max_budget else ""))
    plan.specs = specs
    return plan


def plan_diversity(ladder: StudyPlan, mixtures: Mapping[str, Mapping[str, float]], *, name: str = "diversity",
                   n_subjects: int | None = None) -> StudyPlan:
    """Every run of ``ladder`` once per mixture (``label -> cohort weights``; ``{}`` is every cohort), as one plan
    whose runs differ from the ladder's only in ``cohorts`` (and ``n_subjects`` when given). Runs are ordered as the
    ladder's, the mixtures of one ladder run next to each other, so a study cut short has both mixtures' runs."""
    if len(mixtures) < 2:
        raise ValueError(f"a diversity study compares two or more mixtures, got {list(mixtures)}")
    weights = [tuple(sorted(dict(m).items())) for m in mixtures.values()]
    if len(set(weights)) < len(weights):
        raise ValueError(f"mixtures {list(mixtures)} repeat one mixture")
    specs, run_plans = [], {}
    for s in ladder.specs:
        for mix in mixtures.values():
            t = s.replace(study=name, cohorts=dict(mix), **({} if n_subjects is None else {"n_subjects": n_subjects}))
            specs.append(t)
            if s.run_id in ladder.run_plans:  # the planner's split of the run does not depend on the data
                run_plans[t.run_id] = ladder.run_plans[s.run_id]
    plan = StudyPlan(name=name, specs=specs, num_workers=ladder.num_workers, use_gpu=ladder.use_gpu,
                     lr_search=ladder.lr_search, cohort=ladder.cohort, device_kind=ladder.device_kind,
                     run_plans=run_plans,
                     description=f"{ladder.name} ladder ({len(ladder.specs)} runs) x mixtures {list(mixtures)}",
                     extra={**ladder.extra, "mixtures": {k: dict(v) for k, v in mixtures.items()},
                            "ladder": ladder.name})
    plan.validate()
    return plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.cli_args import HelpFormatter, set_study_name
    from study.runner import add_common_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(ap)
    set_study_name(ap, "diversity")
    ap.add_argument("--preset", default="demo",
                    help="the ladder: a preset of study/plans.py (demo, ladder, ladder-xl, ...) or "
                         "pkg.module:function; its runs that set their own mixture are left out")
    ap.add_argument("--quick", action="store_true",
                    help="the 2-CPU demonstration: the demo ladder at budgets <= 7.7e11 FLOPs (8 runs per mixture)")
    ap.add_argument("--mixtures", nargs="+", default=list(DEFAULT_MIXTURES),
                    help="mixtures to train the ladder on: 'all' (every cohort, natural shares), a cohort name, or "
                         "cohort:weight,cohort:weight")
    ap.add_argument("--n-subjects", type=int, default=None,
                    help="cap on pre-training subjects in every mixture (hold the subject count fixed so that only "
                         "diversity differs); default: every subject of the mixture's cohorts")
    ap.add_argument("--loss", default="val_loss",
                    help="loss column the report compares (val_loss: every cohort's validation windows; "
                         "val_loss__<cohort>: one cohort's)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of every fit")
    ap.add_argument("--site", default=None, metavar="NAME", help="ladder presets: plan each run for this site's node")
    ap.add_argument("--device-kind", default=None, help="GPU presets: plan the runs for this device kind")
    ap.add_argument("--lr-from", default=None, metavar="STUDY_OR_FILE",
                    help="ladder presets: take the muP base width and LR from a µTransfer study")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the runs (run id, mixture, width, steps, FLOPs) and exit")
    return ap.parse_args(argv)


def build_plan(args: argparse.Namespace) -> StudyPlan:
    """The study's plan from its command line (``ValueError`` on a bad preset or mixture)."""
    from analysis.diversity import mixture_label

    mixtures: dict[str, dict[str, float]] = {}
    for text in args.mixtures:
        mix = parse_mixture(text)
        mixtures[mixture_label(sorted(mix.items()))] = mix
    if args.quick and args.preset != "demo":
        raise ValueError("--quick is the demo ladder at its smaller budgets; leave --preset out with --quick")
    ladder = ladder_plan(args.preset, args, max_budget=QUICK_MAX_BUDGET if args.quick else None)
    return plan_diversity(ladder, mixtures, name=args.study_name, n_subjects=args.n_subjects)


def print_plan(plan: StudyPlan) -> None:
    from study.plans import run_summary

    print(f"diversity study {plan.name!r}: {plan.description}; {len(plan.specs)} runs")
    print(f"{'run_id':46s} {'mixture':>22s} {'width':>5s} {'params':>8s} {'steps':>6s} {'FLOPs':>8s}")
    for s in plan.specs:
        r = run_summary(s)
        mix = "all" if not s.cohorts else ",".join(f"{c}:{w:g}" for c, w in s.cohorts)
        print(f"{s.run_id:46s} {mix:>22s} {s.width or '-'!s:>5s} {r['params']:8.3g} {r['steps']:6d} {r['flops']:8.2g}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.runner import fail, run_plan

    try:
        plan = build_plan(args)
    except ValueError as exc:
        return fail(str(exc))
    if args.dry_run:
        print_plan(plan)
        return 0
    try:
        from study.runner import check_plan

        check_plan(plan, args)  # every subject file the runs read (and every mixture's cohorts), before any trial
        run = run_plan(plan, args, repo_root=Path(__file__).resolve().parent.parent)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    if not args.no_report:
        from analysis.diversity import markdown, report

        out_dir = run.study_dir / "report" / "diversity"
        try:
            result = report(run.store_dir, out_dir, loss_col=args.loss, n_boot=args.bootstrap)
        except ValueError as exc:
            return fail(f"no diversity report: {exc}")
        print(markdown(result))
        print(f"report: {result['files']['markdown']}\nplot: {result['files']['plot']}")
        if run.failed:
            print(f"INCOMPLETE: {run.failed} run(s) failed; the fits above use the finished runs only", file=sys.stderr)
    return 1 if run.remaining and not run.stop_file.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
