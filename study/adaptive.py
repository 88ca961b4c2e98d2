"""Adaptive ladder (issue #26 item 1, core): choose the next runs of a study from the fit's uncertainty.

``python study/scaling_law.py --adaptive --target loss@C|optimum@C --budget-gpu-hours H`` runs

1. the initial design: the preset's smallest compute budgets, until at least 6 runs of at least 3 sizes
   (approach 3 has 5 parameters);
2. rounds: read the finished runs from the results store, fit approach 3 with the bootstrap, predict the
   target with its 90% interval and pick the next batch with :func:`analysis.design.design_round`
   (``--acquisition best``: of the greedy by expected reduction of the target's variance per GPU-hour
   and the greedy by reduction alone within the budget left, the batch with the larger expected
   reduction); append the round (candidates,
   scores, choice, fit, interval) to the store table ``adaptive_rounds``; run the chosen specs through
   :func:`study.runner.run_plan`;
3. until the budget is spent, no candidate fits in what is left, the interval is narrower than
   ``--target-width``, or ``--max-rounds``.

Candidates are the preset's runs (one data mixture: specs with a ``cohorts`` override are left out).
Cost: the run planner's predicted GPU-hours where the plan has them (GPU presets), else an analytic
cost, the run's FLOPs at :data:`ANALYTIC_FLOPS_PER_S` (CPU presets; a nominal rate, not measured).

Pre-registered predictions (issue #26 item 2): before a chosen run at or above ``--preregister-above``
FLOPs starts (default ``auto``: larger than every run the round's fit used), the round's fit predicts
its final loss with an interval and the prediction is written to the store table ``predictions``
(:mod:`analysis.predictions`: immutable, hashed, first row per run id stands). The grid path of
``study/scaling_law.py`` does the same with ``--preregister-above`` (:func:`run_plan_preregistered`):
the runs below the threshold first, a fit of them, the predictions, then the rest. The report
(``<study>/report/adaptive.md``, ``adaptive_interval.png``, ``predictions.*``) shows the rounds'
interval against GPU-hours and each prediction against its outcome.

Resumable: rerunning the same command reads ``adaptive_rounds`` back, reruns (skipping finished runs)
every run the stored rounds chose, and continues with the next round; nothing is chosen twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["ROUNDS_TABLE", "ANALYTIC_FLOPS_PER_S", "add_adaptive_args", "add_prediction_args", "run_adaptive",
           "main_adaptive", "spec_costs", "initial_design", "read_rounds", "preregister", "prediction_threshold",
           "run_plan_preregistered", "write_report"]

#: = analysis.design.ROUNDS_TABLE (not imported here: ``--help`` stays free of the analysis stack).
ROUNDS_TABLE = "adaptive_rounds"
#: = analysis.design.RULES (the same reason; tests/study/test_adaptive.py checks they agree).
ACQUISITION_RULES = ("best", "ratio", "plain", "relaxed", "local")
#: Nominal rate of the analytic cost (FLOP/s of one device) where the planner has no GPU-hours (CPU plans).
ANALYTIC_FLOPS_PER_S = 1e10


def add_adaptive_args(ap: argparse.ArgumentParser) -> None:
    """The ``--adaptive`` flags of ``study/scaling_law.py``."""
    g = ap.add_argument_group("adaptive ladder (issue #26; analysis/README.md 'Adaptive design')")
    g.add_argument("--adaptive", action="store_true",
                   help="run a small initial design, then rounds that pick the runs most reducing the target's "
                        "predictive variance per GPU-hour (delta method on the approach-3 bootstrap)")
    g.add_argument("--target", default=None, metavar="loss@C|optimum@C",
                   help="with --adaptive: what to predict: the compute-optimal loss or N*, D* at C FLOPs")
    g.add_argument("--budget-gpu-hours", type=float, default=None, metavar="H",
                   help="with --adaptive: total predicted GPU-hours (planner; analytic FLOPs / 1e10 FLOP/s on CPU)")
    g.add_argument("--target-width", type=float, default=None, metavar="W",
                   help="with --adaptive: stop once the 90%% interval's relative width is <= W")
    g.add_argument("--batch-size", type=int, default=2, help="with --adaptive: runs chosen per round")
    g.add_argument("--max-rounds", type=int, default=10, help="with --adaptive: most rounds")
    g.add_argument("--n-boot", type=int, default=200, help="with --adaptive: bootstrap replicates per round")
    g.add_argument("--acquisition", choices=list(ACQUISITION_RULES), default="local",
                   help="with --adaptive: ratio, the greedy by variance reduction per GPU-hour; plain, by reduction "
                        "alone within the budget left; best, the batch of the two with the larger expected reduction; "
                        "relaxed, the batch chosen jointly (relaxed c-optimal design, rounded); local, the same on "
                        "the information of the runs made at the current estimate (locally c-optimal; the default: on the "
                        "simulation benchmark more accurate than best at every spend from 0.3 of the grid's cost) "
                        "(analysis/README.md 'Adaptive design')")


def _threshold_arg(text: str):
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FLOPs (e.g. 1e15) or 'auto'") from None
    if not (np.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: FLOPs must be finite and >= 0")
    return v


def add_prediction_args(ap: argparse.ArgumentParser) -> None:
    """``--preregister-above`` of ``study/scaling_law.py`` (adaptive and grid ladders)."""
    g = ap.add_argument_group("pre-registered predictions (issue #26; analysis/README.md 'Pre-registered predictions')")
    g.add_argument("--preregister-above", type=_threshold_arg, default=None, metavar="FLOPS|auto",
                   help="before a run of at least FLOPS starts, write the fit's prediction of its final loss (value, "
                        "90%% interval, fit, runs used, UTC time, SHA-256) to the store as an immutable row; "
                        "auto: adaptive, runs larger than every run the fit used; grid, the plan's largest budget, "
                        "predicted from the runs below it (run first). Default: auto with --adaptive, off otherwise")
    g.add_argument("--prediction-level", type=float, default=0.9, metavar="P",
                   help="level of the pre-registered interval")


def prediction_threshold(value, *, fitted_flops: float | None = None, plan_specs=None) -> tuple[float, bool]:
    """``(threshold, strict)``: runs with FLOPs ``> threshold`` (strict) or ``>= threshold`` are predicted.
    ``auto``: beyond ``fitted_flops`` (adaptive) or from the smallest run of the plan's largest budget (grid)."""
    from study.plans import run_summary

    if value != "auto":
        return float(value), False
    if fitted_flops is not None:
        return float(fitted_flops), True
    top = max(s.budget for s in plan_specs)
    return float(min(run_summary(s)["flops"] for s in plan_specs if s.budget == top)), False


def preregister(store_dir: Path, specs, fit, data_ids, *, threshold: float, strict: bool = False, study: str = "",
                source: str = "", seed: int = 0, level: float = 0.9) -> list[str]:
    """Write the prediction of every spec at or above ``threshold`` FLOPs (above, with ``strict``) that has
    none yet, from ``fit`` (bootstrapped approach 3 of the runs ``data_ids``). Returns the run ids that have
    a prediction after the call; a run that already has results and no prediction is named and skipped."""
    from analysis import predictions as pr
    from study.plans import run_summary

    done = []
    for s in specs:
        r = run_summary(s)
        if not (r["flops"] > threshold if strict else r["flops"] >= threshold):
            continue
        try:
            pred = pr.predict_run(fit, r["params"], r["tokens"], level=level, seed=seed)
            row = pr.prediction_row(s.run_id, pred, fit=fit, data_runs=data_ids, N=r["params"], D=r["tokens"],
                                    flops=r["flops"], threshold_flops=threshold, study=study, source=source, seed=seed)
            first, written = pr.register(store_dir, row)
        except ValueError as exc:
            print(f"prediction for {s.run_id}: not written: {exc}", flush=True)
            continue
        print(f"prediction for {s.run_id} ({'written' if written else 'already registered'}): val_loss "
              f"{first['value']:.5g} [{first['lo']:.5g}, {first['hi']:.5g}] ({first['level']:.0%}), sha256 "
              f"{first['hash'][:12]}", flush=True)
        done.append(s.run_id)
    return done


def spec_costs(plan, specs) -> tuple[np.ndarray, str]:
    """Cost per spec in GPU-hours: the planner's where every spec has one, else analytic (FLOPs)."""
    from study.plans import run_summary

    hours = [getattr(plan.run_plans.get(s.run_id), "gpu_hours", None) for s in specs]
    if all(h is not None and h > 0 for h in hours):
        return np.asarray(hours, float), "planner"
    flops = np.array([run_summary(s)["flops"] for s in specs], float)
    return flops / ANALYTIC_FLOPS_PER_S / 3600.0, f"analytic (FLOPs at {ANALYTIC_FLOPS_PER_S:g} FLOP/s)"


def initial_design(specs, min_runs: int = 6, min_sizes: int = 3) -> list[int]:
    """Positions of the runs at the smallest budgets, adding budgets until ``min_runs`` runs of
    ``min_sizes`` distinct widths."""
    budgets = sorted({s.budget for s in specs})
    chosen: list[int] = []
    for b in budgets:
        chosen += [i for i, s in enumerate(specs) if s.budget == b]
        if len(chosen) >= min_runs and len({specs[i].width for i in chosen}) >= min_sizes:
            return chosen
    raise ValueError(f"the plan's {len(specs)} runs cannot make an initial design of {min_runs} runs of "
                     f"{min_sizes} sizes (approach 3 has 5 parameters)")


def read_rounds(store_dir: Path):
    """The stored rounds (a DataFrame sorted by round), or None (:func:`analysis.design.read_rounds`)."""
    from analysis.design import read_rounds as _read

    return _read(store_dir)


def _observed(store_dir: Path, run_ids: list[str]) -> dict[str, float]:
    from analysis.report import final_rows
    from analysis.store import read_table

    try:
        df = read_table(store_dir, "train")
    except (FileNotFoundError, ValueError):
        return {}
    if df is None or df.empty or "val_loss" not in df:
        return {}
    f = final_rows(df)
    if "is_final" in f:
        f = f[f["is_final"].fillna(False).astype(bool)]
    f = f[f["run_id"].isin(run_ids) & np.isfinite(f["val_loss"].astype(float)) & (f["val_loss"] > 0)]
    return dict(zip(f["run_id"], f["val_loss"].astype(float)))


def run_adaptive(plan, args, *, repo_root: Path, runner: Callable[[list], Any] | None = None) -> Any:
    """Drive the adaptive ladder (module docstring). ``runner(specs)`` runs specs and returns the
    ``StudyRun`` (default: :func:`study.runner.run_plan` on ``plan`` restricted to them)."""
    from analysis._common import FitError
    from analysis.design import Target, candidates, design_round, stop_reason
    from analysis.store import ResultsStore
    from study.plans import run_summary

    if args.target is None or args.budget_gpu_hours is None:
        raise ValueError("--adaptive needs --target loss@C|optimum@C and --budget-gpu-hours H")
    target = Target.parse(args.target)
    budget = float(args.budget_gpu_hours)
    if not (np.isfinite(budget) and budget > 0):
        raise ValueError(f"--budget-gpu-hours {args.budget_gpu_hours}: must be > 0")
    if runner is None:
        from study.runner import run_plan

        def runner(specs):
            return run_plan(dataclasses.replace(plan, specs=list(specs)), args, repo_root=repo_root)

    specs = [s for s in plan.specs if not s.cohorts]
    cost, cost_source = spec_costs(plan, specs)
    summ = [run_summary(s) for s in specs]
    cands = candidates([r["params"] for r in summ], [r["tokens"] for r in summ], cost=cost)
    ids = [s.run_id for s in specs]
    requested = initial_design(specs)
    if cost[requested].sum() > budget:
        raise ValueError(f"--budget-gpu-hours {budget:g}: the initial design alone costs {cost[requested].sum():.4g} "
                         f"GPU-hours ({cost_source})")
    run = runner([specs[i] for i in requested])
    store_dir = Path(run.store_dir)
    past = read_rounds(store_dir)
    r0 = 0
    if past is not None:
        for ch in past["chosen"]:
            requested += [ids.index(x) for x in json.loads(ch) if x in ids and ids.index(x) not in requested]
        r0 = int(past["round"].max()) + 1
        if past["stop_reason"].iloc[-1]:
            print(f"adaptive: stopped at round {r0 - 1}: {past['stop_reason'].iloc[-1]}", flush=True)
            return run
        run = runner([specs[i] for i in requested])  # rounds chosen before an interruption
    warm = None
    prereg = getattr(args, "preregister_above", None)
    prereg = "auto" if prereg is None else prereg
    level = float(getattr(args, "prediction_level", 0.9))
    for r in range(r0, r0 + args.max_rounds):
        obs = _observed(store_dir, [ids[i] for i in requested])
        have = [i for i in requested if ids[i] in obs]
        spent = float(cost[requested].sum())
        row: dict[str, Any] = dict(round=r, target=args.target, budget_gpu_hours=budget, cost_source=cost_source,
                                   spent_gpu_hours=spent, n_runs=len(have),
                                   runs=json.dumps([ids[i] for i in have]), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        data = dict(N=cands.N.to_numpy()[have], D=cands.D.to_numpy()[have],
                    L=np.array([obs[ids[i]] for i in have]))
        left = [i for i in range(len(specs)) if i not in requested]
        try:
            dr = design_round(data, cands, target, seed=r, n_boot=args.n_boot, batch_size=args.batch_size,
                              budget=max(budget - spent, 1e-12), exclude=requested, warm=warm,
                              rule=getattr(args, "acquisition", "local"))
        except (FitError, ValueError) as exc:
            row.update(chosen="[]", stop_reason=f"fit failed: {exc}")
            ResultsStore(store_dir).append(ROUNDS_TABLE, [row])
            print(f"adaptive round {r}: {row['stop_reason']}", flush=True)
            return run
        warm = dr.fit.theta[:5]
        p = dr.prediction
        reason = stop_reason(spent=spent, budget=budget, rel_width=p["rel_width"], width_goal=args.target_width,
                             next_cost=float(cost[left].min()) if left else None) or (
            None if left and dr.chosen else "no candidate left")
        sc = dr.scores.assign(run_id=ids)
        predicted: list[str] = []
        if not reason and dr.chosen:  # before the round row: a resume reruns its choice
            fitted = max(summ[i]["flops"] for i in have)
            thr, strict = prediction_threshold(prereg, fitted_flops=fitted)
            predicted = preregister(store_dir, [specs[i] for i in dr.chosen], dr.fit, [ids[i] for i in have],
                                    threshold=thr, strict=strict, study=plan.name, seed=r, level=level,
                                    source=f"adaptive round {r}: approach 3 + bootstrap ({args.n_boot})")
        row.update(predictions=json.dumps(predicted), point=p["point"], lo=p["lo"], hi=p["hi"], rel_width=p["rel_width"], level=p["level"],
                   fit=json.dumps({k: float(v) for k, v in dr.fit.params.items()}),
                   fit_valid=bool(dr.fit.valid), fit_warnings=json.dumps(list(dr.fit.warnings)),
                   candidates=sc[["run_id", "N", "D", "cost", "reduction", "score", "pick"]].to_json(orient="records"),
                   chosen=json.dumps([] if reason else [ids[i] for i in dr.chosen]), stop_reason=reason or "")
        ResultsStore(store_dir).append(ROUNDS_TABLE, [row])
        print(f"adaptive round {r}: {len(have)} runs, {spent:.4g} of {budget:g} GPU-hours; {args.target} = "
              f"{p['point']:.5g} [{p['lo']:.5g}, {p['hi']:.5g}] (90%, width {p['rel_width']:.3g}); "
              + (f"stop: {reason}" if reason else f"next: {[ids[i] for i in dr.chosen]}"), flush=True)
        if reason:
            return run
        requested += dr.chosen
        run = runner([specs[i] for i in requested])
    return run


def main_adaptive(plan, args, repo_root: Path) -> int:
    """``study/scaling_law.py --adaptive``: run the ladder, then print the rounds (exit 1 on bad input)."""
    from study.runner import fail

    try:
        from study.runner import check_plan

        check_plan(plan, args)  # every subject file the runs read, before any trial starts (as the grid does)
        run = run_adaptive(plan, args, repo_root=repo_root)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    rounds = read_rounds(Path(run.store_dir))
    if rounds is not None:
        cols = [c for c in ("round", "spent_gpu_hours", "n_runs", "point", "lo", "hi", "rel_width", "stop_reason")
                if c in rounds]
        print(rounds[cols].to_string(index=False))
    if not getattr(args, "no_report", False):
        out = write_report(Path(run.store_dir))
        print(f"report: {out / 'adaptive.md'}")
    return 0


def write_report(store_dir: Path, out_dir: Path | None = None) -> Path:
    """The adaptive report (:func:`analysis.predictions.adaptive_report`) in ``<study>/report`` by default."""
    from analysis.predictions import adaptive_report

    out = Path(out_dir) if out_dir is not None else Path(store_dir).parent / "report"
    adaptive_report(store_dir, out)
    return out


def run_plan_preregistered(plan, args, *, repo_root: Path, runner: Callable[[list], Any] | None = None,
                           lr_search=None, n_boot: int = 200) -> Any:
    """A grid ladder with pre-registered predictions (``--preregister-above``): run the specs below the
    threshold, fit approach 3 with the bootstrap on their final losses, write the prediction of every
    spec at or above it (:func:`preregister`), then run the whole plan (finished runs are skipped). When
    nothing is below the threshold or the fit fails, the plan runs without predictions (said so).
    ``runner(specs)`` defaults to :func:`study.runner.run_plan` on the plan restricted to ``specs``."""
    from analysis._common import FitError
    from analysis.bootstrap import bootstrap_fit
    from analysis.design import fit_law
    from study.plans import run_summary

    if runner is None:
        from study.runner import run_plan

        def runner(specs):
            return run_plan(dataclasses.replace(plan, specs=list(specs)), args, repo_root=repo_root,
                            lr_search=lr_search)

    specs = [s for s in plan.specs if not s.cohorts]
    thr, strict = prediction_threshold(args.preregister_above, plan_specs=specs)
    flops = {s.run_id: run_summary(s)["flops"] for s in specs}
    small = [s for s in specs if flops[s.run_id] < thr]
    big = [s for s in specs if flops[s.run_id] >= thr]
    if not small or not big:
        print(f"predictions: none ({len(small)} run(s) below {thr:.3g} FLOPs to fit, {len(big)} at or above it)",
              flush=True)
        return runner(plan.specs)
    run = runner(small)
    store_dir = Path(run.store_dir)
    obs = _observed(store_dir, [s.run_id for s in small])
    have = [s for s in small if s.run_id in obs]
    try:
        data = dict(N=np.array([run_summary(s)["params"] for s in have], float),
                    D=np.array([run_summary(s)["tokens"] for s in have], float),
                    L=np.array([obs[s.run_id] for s in have], float))
        fit = bootstrap_fit(fit_law(data), n_boot, seed=0)
    except (FitError, ValueError) as exc:
        print(f"predictions: none, the fit of the {len(have)} run(s) below {thr:.3g} FLOPs failed: {exc}", flush=True)
        return runner(plan.specs)
    preregister(store_dir, big, fit, [s.run_id for s in have], threshold=thr, strict=strict, study=plan.name,
                source=f"grid: approach 3 + bootstrap ({n_boot}) of the runs below {thr:.3g} FLOPs",
                level=float(getattr(args, "prediction_level", 0.9)))
    return runner(plan.specs)
