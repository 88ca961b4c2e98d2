"""Simulation benchmark of the adaptive ladder (issue #26 item 3): adaptive vs grid vs random designs.

Planted approach-3 laws (``L = E + A/N^alpha + B/D^beta``) spanning published fits, runs observed with
multiplicative log-normal seed noise and occasional bad runs (loss inflated 3-15%); every design is
fitted the same way (``analysis.design.fit_law`` + ``bootstrap_fit``, Huber on log L) and predicts the
compute-optimal loss at ``C* = 1e21`` FLOPs (100x the ladder's largest budget).

* grid: an IsoFLOP ladder, budgets 1e17..1e19 (half decades), 5 sizes per budget at 1/4..4 x the
  20-tokens-per-parameter size (25 runs).
* random: runs drawn uniformly from the candidate set until the grid's cost is reached.
* adaptive: the grid's two smallest budgets (10 runs, 2.8% of the grid's cost), then rounds of
  acquisition (4 runs per round, at most 10% of the grid's cost per round: ``--round-cap``) until the grid's
  cost is spent or 14 rounds. ``--acquisition local`` (default since session 20): the locally c-optimal batch
  (``analysis.design.acquire_relaxed(precision="fisher")``) on the Fisher information of the runs made at the
  current estimate; on 300 scenarios it beat ``best`` at every spend from 0.3 of the grid's cost, and a setting
  chosen on seeds 0-99 held on seeds 100-199 (``--first-seed 100``). ``best``: ``analysis.design.acquire_best``, the batch of
  the greedy by variance reduction per cost and the greedy by reduction alone with the larger expected
  reduction; ``ratio``: the first alone (the earlier default, which buys the cheap runs first and missed
  the compute target: results/adaptive_design_ratio.json); ``plain``: the second alone. Candidates: budgets 1e17..1e19 at quarter decades x 7 sizes at
  1/8..8 x the 20-tokens-per-parameter size (the grid is a subset).

Metrics: ``grid_error``, ``random_error``, ``adaptive_error`` (median over all law x seed scenarios of
|predicted - true| / true, adaptive at the grid's cost); ``adaptive_error_at`` (fraction of the grid's
cost -> median error of the adaptive design with at most that much spent); ``compute_fraction`` (the
smallest such fraction whose median error is <= ``grid_error``; null when none is);
``coverage_90`` (fraction of scenarios whose adaptive 90% interval contains the truth), with the
grid's and random's coverage for comparison. How sure: ``error_ratio_at`` (per fraction: median adaptive
error / median grid error, its 90% interval from resampling scenarios, and ``paired_win``, the share of
scenarios where the adaptive design is at least as accurate as the grid on the same law and seed) and
``coverage_90_at`` (coverage at each fraction).

    python benchmarks/adaptive_design.py                  # full run (3 laws x 20 seeds), Markdown table
    python benchmarks/adaptive_design.py --json           # the same, JSON
    python benchmarks/adaptive_design.py --seeds 2 --laws hoffmann   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.design import QUICK_GRID, RULES, Target, acquire_by_rule, candidates, fit_law, predict_target  # noqa: E402
from analysis.bootstrap import bootstrap_fit  # noqa: E402

#: Planted laws. hoffmann: Hoffmann et al. 2022 (approach 3, published). epoch: Besiroglu et al. 2024's
#: replication. llama3-like: NOT a published approach-3 fit (Llama 3 published only N*(C) ~ C^0.53 and
#: 402B at 3.8e25 FLOPs): alpha, beta chosen so beta/(alpha+beta) = 0.53, A so that N* at 3.8e25 is ~400B
#: with B = 1000, E = 1.7.
LAWS = {
    "hoffmann": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "epoch": dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
    "llama3-like": dict(E=1.7, A=129.0, B=1000.0, alpha=0.30, beta=0.338),
}
TARGET = Target(kind="loss", compute=1e21)
GRID_BUDGETS = np.geomspace(1e17, 1e19, 5)  # half decades
NOISE = 0.01          # multiplicative seed noise (log-normal sigma)
BAD_P = 0.05          # probability of a bad run
BAD_RANGE = (0.03, 0.15)  # a bad run's loss is inflated by this fraction (uniform)
N_BOOT = 100
BATCH = 4
ROUND_CAP = 0.10      # most cost per round, as a fraction of the grid's cost (0.15 until session 20)
MAX_ROUNDS = 12
FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
#: The acquisition rule (--acquisition): ratio (analysis.design.acquire, variance reduction per unit cost),
#: plain (reduction alone, cost only as the round's budget) or best (analysis.design.acquire_best: the
#: batch of the two with the larger expected reduction), relaxed, or local (the default since session 20: the
#: relaxed c-optimal batch on the Fisher information at the current estimate).
ACQUISITIONS = RULES
ACQUISITION = "local"
#: Scenario-bootstrap replicates of the error ratios (``error_ratio_at``).
RATIO_BOOT = 2000


def _sizes(C, factors):
    n20 = np.sqrt(C / (6 * 20))
    return n20 * np.asarray(factors)


def grid_design():
    N = np.concatenate([_sizes(C, np.geomspace(0.25, 4, 5)) for C in GRID_BUDGETS])
    C = np.repeat(GRID_BUDGETS, 5)
    return N, C / (6 * N)


def candidate_set():
    budgets = np.geomspace(1e17, 1e19, 9)
    N = np.concatenate([_sizes(C, np.geomspace(0.125, 8, 7)) for C in budgets])
    C = np.repeat(budgets, 7)
    return candidates(N, C / (6 * N))


def observe(law, N, D, rng):
    L = law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]
    L = L * np.exp(rng.normal(0, NOISE, len(N)))
    bad = rng.random(len(N)) < BAD_P
    return L * np.where(bad, 1 + rng.uniform(*BAD_RANGE, len(N)), 1.0)


def truth(law):
    theta = np.array([np.log(law["A"]), np.log(law["B"]), law["alpha"], law["beta"], np.log(law["E"])])
    return float(TARGET.value(theta))


def fit_predict(N, D, L, seed, warm=None, grid=QUICK_GRID):
    fit = bootstrap_fit(fit_law(dict(N=N, D=D, L=L), warm=warm, grid=grid), N_BOOT, seed=seed, polish=False)
    return fit, predict_target(fit, TARGET, 0.9)


def scenario(args):
    name, seed, rule, *rounds = args
    # (round cap, most rounds) from main(), carried with the job: worker processes need not inherit its globals
    cap, max_rounds = rounds or (ROUND_CAP, MAX_ROUNDS)
    law = LAWS[name]
    true = truth(law)
    rng = np.random.default_rng([seed, list(LAWS).index(name)])
    cand = candidate_set()
    out = dict(law=name, seed=seed, truth=true)
    # grid
    gN, gD = grid_design()
    gcost = float(np.sum(6 * gN * gD))
    _, p = fit_predict(gN, gD, observe(law, gN, gD, rng), seed)
    out["grid"] = dict(err=abs(p["point"] - true) / true, cover=p["lo"] <= true <= p["hi"], cost=gcost)
    # random of the same cost (drawn without replacement; a run that would overshoot is skipped)
    order = rng.permutation(len(cand))
    pick, spent = [], 0.0
    for i in order:
        if spent + cand.cost[i] <= gcost * 1.0001:
            pick.append(i); spent += cand.cost[i]
    rN, rD = cand.N.to_numpy()[pick], cand.D.to_numpy()[pick]
    try:
        _, p = fit_predict(rN, rD, observe(law, rN, rD, rng), seed)
        out["random"] = dict(err=abs(p["point"] - true) / true, cover=p["lo"] <= true <= p["hi"], cost=spent)
    except ValueError as e:  # too few distinct N or D
        out["random"] = dict(err=np.nan, cover=False, cost=spent, failed=str(e)[:120])
    # adaptive: the grid's two smallest budgets, then rounds
    init = (np.abs(np.log(cand.C.to_numpy())[:, None] - np.log(GRID_BUDGETS[:2])[None]).min(1) < 1e-6) & \
        (np.abs(np.log(cand.N.to_numpy())[:, None] - np.log(gN)[None]).min(1) < 1e-6)
    made = list(np.nonzero(init)[0])
    N, D = cand.N.to_numpy()[made], cand.D.to_numpy()[made]
    L = observe(law, N, D, rng)
    spent = float(cand.cost.to_numpy()[made].sum())
    traj, warm = [], None
    for r in range(max_rounds + 1):
        fit, p = fit_predict(N, D, L, seed + 1000 * r, warm=warm, grid=QUICK_GRID if warm is None else None)
        warm = fit.theta[:5]
        traj.append(dict(round=r, spent=spent / gcost, err=abs(p["point"] - true) / true,
                         cover=bool(p["lo"] <= true <= p["hi"]), rel_width=p["rel_width"], n=len(N)))
        left = gcost - spent
        if r == max_rounds or left <= cand.cost.min():
            break
        kw = dict(batch_size=BATCH, budget=min(left, cap * gcost), exclude=made)
        chosen, _ = acquire_by_rule(rule, fit, cand, TARGET, **kw)
        if not chosen:
            break
        made += chosen
        N = np.r_[N, cand.N.to_numpy()[chosen]]
        D = np.r_[D, cand.D.to_numpy()[chosen]]
        L = np.r_[L, observe(law, cand.N.to_numpy()[chosen], cand.D.to_numpy()[chosen], rng)]
        spent += float(cand.cost.to_numpy()[chosen].sum())
    out["adaptive"] = traj
    return out


def oracle(names=None):
    """What the best possible design of each cost could do (linearized, noise ``NOISE``, the true law known).

    Per law: the grid's variance of the target (Fisher information at the truth, ``g' (J'J / s2)^-1 g``), and
    the relaxed c-optimal design over the candidate set at each fraction of the grid's cost, each candidate
    at most once (:func:`analysis.design.relaxed_design` with no prior runs): its sd relative to the grid's,
    and ``fraction``, the least cost (bisection) at which it matches the grid. No design that learns the law
    from its own runs can beat this bound in expectation; with the linearization it holds for large samples.
    """
    from analysis.design import law_gradient, relaxed_design, target_gradient

    gN, gD = grid_design()
    gcost = float(np.sum(6 * gN * gD))
    cand = candidate_set()
    cN, cD, cc = cand.N.to_numpy(), cand.D.to_numpy(), cand.cost.to_numpy()
    s2 = NOISE ** 2
    out = {}
    for name in names or LAWS:
        law = LAWS[name]
        th = np.array([np.log(law["A"]), np.log(law["B"]), law["alpha"], law["beta"], np.log(law["E"])])
        g = target_gradient(th, TARGET)
        Jg = law_gradient(th, gN, gD)
        v_grid = float(g @ np.linalg.solve(Jg.T @ Jg / s2, g))
        J = law_gradient(th, cN, cD)
        sd = lambda f: float(np.sqrt(relaxed_design(np.zeros((5, 5)), J, cc, g, s2, budget=f * gcost)[1] / v_grid))  # noqa: E731
        lo, hi = 0.02, 1.0
        for _ in range(20):
            mid = np.sqrt(lo * hi)
            lo, hi = (lo, mid) if sd(mid) <= 1.0 else (mid, hi)
        out[name] = dict(grid_rel_sd=float(np.sqrt(v_grid) / truth(law)), fraction=round(hi, 3),
                         sd_ratio_at={str(f): round(sd(f), 3) for f in FRACTIONS if f >= 0.1})
    return out


def summarize(results, wall):
    def med(x):
        x = np.asarray(x, float)
        return float(np.nanmedian(x)) if np.isfinite(x).any() else None

    grid_err = med([r["grid"]["err"] for r in results])
    at = {}
    for f in FRACTIONS:
        at[f] = med([[t["err"] for t in r["adaptive"] if t["spent"] <= f + 1e-9][-1] for r in results])
    frac = next((f for f in FRACTIONS if at[f] is not None and at[f] <= grid_err), None)
    # how sure: per fraction, the ratio median(adaptive error) / median(grid error) with a 90% interval
    # from resampling scenarios, and the share of scenarios where the adaptive design (at that spend) is
    # at least as accurate as the grid on the same planted law and seed
    g = np.array([r["grid"]["err"] for r in results], float)
    A = {f: np.array([[t["err"] for t in r["adaptive"] if t["spent"] <= f + 1e-9][-1] for r in results], float)
         for f in FRACTIONS}
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(results), (RATIO_BOOT, len(results)))
    ratio = {}
    for f in FRACTIONS:
        boot = np.nanmedian(A[f][idx], axis=1) / np.nanmedian(g[idx], axis=1)
        lo, hi = np.nanquantile(boot, [0.05, 0.95])
        ratio[str(f)] = dict(ratio=float(np.nanmedian(A[f]) / np.nanmedian(g)), lo=float(lo), hi=float(hi),
                             paired_win=float(np.mean(A[f] <= g)))
    final = [r["adaptive"][-1] for r in results]
    per_law = {}
    for name in sorted({r["law"] for r in results}):
        rs = [r for r in results if r["law"] == name]
        per_law[name] = dict(
            seeds=len(rs), grid_error=med([r["grid"]["err"] for r in rs]),
            random_error=med([r["random"]["err"] for r in rs]),
            adaptive_error=med([r["adaptive"][-1]["err"] for r in rs]),
            coverage_90=float(np.mean([r["adaptive"][-1]["cover"] for r in rs])),
            grid_coverage_90=float(np.mean([r["grid"]["cover"] for r in rs])))
    return dict(
        scenarios=len(results), laws=sorted(per_law), target=f"{TARGET.kind}@{TARGET.compute:g}",
        coverage_90=float(np.mean([t["cover"] for t in final])),
        grid_coverage_90=float(np.mean([r["grid"]["cover"] for r in results])),
        random_coverage_90=float(np.mean([r["random"]["cover"] for r in results])),
        compute_fraction=frac, grid_error=grid_err,
        random_error=med([r["random"]["err"] for r in results]),
        random_failed=int(sum("failed" in r["random"] for r in results)),
        adaptive_error=med([t["err"] for t in final]),
        adaptive_spent_fraction=med([t["spent"] for t in final]),
        adaptive_rounds=med([t["round"] for t in final]),
        adaptive_error_at={str(f): v for f, v in at.items()},
        error_ratio_at=ratio,
        coverage_90_at={str(f): float(np.mean([[t["cover"] for t in r["adaptive"] if t["spent"] <= f + 1e-9][-1]
                                                for r in results])) for f in FRACTIONS},
        adaptive_rel_width=med([t["rel_width"] for t in final]),
        per_law=per_law, wall_s=round(wall, 1),
        settings=dict(acquisition=ACQUISITION, noise=NOISE, bad_p=BAD_P, bad_range=BAD_RANGE, n_boot=N_BOOT, batch=BATCH,
                      round_cap=ROUND_CAP, max_rounds=MAX_ROUNDS, grid_budgets=GRID_BUDGETS.tolist()))


def markdown(s):
    f = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"target {s['target']}, {s['scenarios']} scenarios ({', '.join(s['laws'])}), wall {s['wall_s']} s, "
             f"CPU {s.get('cpu_s', 'n/a')} s", "",
             "| design | median rel. error | 90% coverage | cost (x grid) |", "|---|---|---|---|",
             f"| grid | {f(s['grid_error'])} | {f(s['grid_coverage_90'])} | 1 |",
             f"| random (same cost) | {f(s['random_error'])} | {f(s['random_coverage_90'])} | <= 1 |",
             f"| adaptive | {f(s['adaptive_error'])} | {f(s['coverage_90'])} | {f(s['adaptive_spent_fraction'])} |", "",
             f"compute_fraction (adaptive cost to reach the grid's median error): {f(s['compute_fraction'])}", "",
             "| cost fraction | " + " | ".join(s["adaptive_error_at"]) + " |",
             "|---|" + "---|" * len(s["adaptive_error_at"]),
             "| adaptive median error | " + " | ".join(f(v) for v in s["adaptive_error_at"].values()) + " |",
             "| / grid's (90% CI, scenario bootstrap) | " + " | ".join(
                 f"{v['ratio']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]" for v in s["error_ratio_at"].values()) + " |",
             "| scenarios with adaptive <= grid error | " + " | ".join(
                 f"{v['paired_win']:.2f}" for v in s["error_ratio_at"].values()) + " |",
             "| adaptive 90% coverage | " + " | ".join(f(v) for v in s["coverage_90_at"].values()) + " |", "",
             "| law | seeds | grid err | random err | adaptive err | adaptive cov90 | grid cov90 |", "|---|---|---|---|---|---|---|"]
    for k, v in s["per_law"].items():
        lines.append(f"| {k} | {v['seeds']} | {f(v['grid_error'])} | {f(v['random_error'])} | {f(v['adaptive_error'])} | "
                     f"{f(v['coverage_90'])} | {f(v['grid_coverage_90'])} |")
    if "oracle" in s:
        lines += ["", "Bound: the relaxed c-optimal design with the true law known (linearized; `oracle`):", "",
                  "| law | grid rel. sd (linearized) | oracle cost to match the grid | oracle sd / grid sd at 0.2 / 0.3 / 0.4 |",
                  "|---|---|---|---|"]
        for k, v in s["oracle"].items():
            r = v["sd_ratio_at"]
            lines.append(f"| {k} | {v['grid_rel_sd']:.4f} | {v['fraction']:.3f} | {r['0.2']:.2f} / {r['0.3']:.2f} / "
                         f"{r['0.4']:.2f} |")
    return "\n".join(lines)


def make_jobs(laws, seeds: int, rule: str, round_cap: float, max_rounds: int, *, first_seed: int = 0) -> list[tuple]:
    """One scenario job per (law, seed), seeds ``first_seed ... first_seed + seeds - 1``, each carrying its rule and
    round settings (worker processes do not share the driver's globals)."""
    return [(n, s, rule, round_cap, max_rounds) for n in laws for s in range(first_seed, first_seed + seeds)]


def main(argv=None):
    global ACQUISITION, ROUND_CAP, MAX_ROUNDS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds per law")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed (scenarios use seeds first-seed ... first-seed + seeds - 1): fresh scenarios "
                         "check a setting chosen on others")
    ap.add_argument("--laws", default=",".join(LAWS), help="comma-separated planted laws")
    ap.add_argument("--workers", type=int, default=2, help="processes")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ap.add_argument("--acquisition", choices=ACQUISITIONS, default=ACQUISITION,
                    help="ratio: expected variance reduction per unit cost (greedy); plain: reduction alone within the "
                         "round's budget; best: the batch of the two with the larger expected reduction")
    ap.add_argument("--round-cap", type=float, default=ROUND_CAP,
                    help="most cost per round, as a fraction of the grid's cost (smaller: more rounds, more refits)")
    ap.add_argument("--max-rounds", type=int, default=None,
                    help=f"most rounds after the initial design (default {MAX_ROUNDS}, or enough to spend the grid's "
                         f"cost at --round-cap)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if not 0 < a.round_cap <= 1:
        raise SystemExit("--round-cap must be in (0, 1]")
    ROUND_CAP = a.round_cap
    MAX_ROUNDS = a.max_rounds if a.max_rounds is not None else max(MAX_ROUNDS, int(np.ceil(1 / ROUND_CAP)) + 4)
    names = a.laws.split(",")
    for n in names:
        if n not in LAWS:
            raise SystemExit(f"--laws: {n!r} is not one of {list(LAWS)}")
    if a.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if a.first_seed < 0:
        raise SystemExit("--first-seed must be >= 0")
    # exp overflow of a wild bootstrap replicate's A or B (kept as inf, dropped by the target's isfinite)
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(v, "1")
    ACQUISITION = a.acquisition
    jobs = make_jobs(names, a.seeds, a.acquisition, ROUND_CAP, MAX_ROUNDS, first_seed=a.first_seed)
    t0 = time.time()
    if a.workers > 1:
        with ProcessPoolExecutor(a.workers) as ex:
            results = list(ex.map(scenario, jobs))
    else:
        results = [scenario(j) for j in jobs]
    s = summarize(results, time.time() - t0)
    s["oracle"] = oracle(names)
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    s["cpu_s"] = round(sum(r.ru_utime + r.ru_stime for r in ru), 1)  # all processes: the load-independent cost
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(s, indent=2))
    print(json.dumps(s, indent=2) if a.json else markdown(s))


if __name__ == "__main__":
    main()
