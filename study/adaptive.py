"""Adaptive ladder (issue #26 item 1, core): choose the next runs of a study from the fit's uncertainty.

``python study/scaling_law.py --adaptive --target loss@C|optimum@C --budget-gpu-hours H`` runs

1. the initial design: the preset's smallest compute budgets, until at least 6 runs of at least 3 sizes
   (approach 3 has 5 parameters);
2. rounds: read the finished runs from the results store, fit approach 3 with the bootstrap, predict the
   target with its 90% interval and pick the next batch with :func:`analysis.design.design_round`
   (expected reduction of the target's variance per GPU-hour, greedy); append the round (candidates,
   scores, choice, fit, interval) to the store table ``adaptive_rounds``; run the chosen specs through
   :func:`study.runner.run_plan`;
3. until the budget is spent, no candidate fits in what is left, the interval is narrower than
   ``--target-width``, or ``--max-rounds``.

Candidates are the preset's runs (one data mixture: specs with a ``cohorts`` override are left out).
Cost: the run planner's predicted GPU-hours where the plan has them (GPU presets), else an analytic
cost, the run's FLOPs at :data:`ANALYTIC_FLOPS_PER_S` (CPU presets; a nominal rate, not measured).

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

__all__ = ["ROUNDS_TABLE", "ANALYTIC_FLOPS_PER_S", "add_adaptive_args", "run_adaptive", "main_adaptive",
           "spec_costs", "initial_design", "read_rounds"]

ROUNDS_TABLE = "adaptive_rounds"
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
    """The stored rounds (a DataFrame sorted by round), or None."""
    from analysis.store import read_table

    try:
        df = read_table(store_dir, ROUNDS_TABLE)
    except (FileNotFoundError, ValueError):
        return None
    if df is None or df.empty:
        return None
    return df.sort_values("round").drop_duplicates("round", keep="last").reset_index(drop=True)


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
                              budget=max(budget - spent, 1e-12), exclude=requested, warm=warm)
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
        row.update(point=p["point"], lo=p["lo"], hi=p["hi"], rel_width=p["rel_width"], level=p["level"],
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
        from study.preflight import check_plan

        check_plan(plan, args)  # every subject file the runs read, before any trial starts (as the grid does)
        run = run_adaptive(plan, args, repo_root=repo_root)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    rounds = read_rounds(Path(run.store_dir))
    if rounds is not None:
        cols = [c for c in ("round", "spent_gpu_hours", "n_runs", "point", "lo", "hi", "rel_width", "stop_reason")
                if c in rounds]
        print(rounds[cols].to_string(index=False))
    return 0
