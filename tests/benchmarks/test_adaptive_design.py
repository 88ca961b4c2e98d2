"""benchmarks/adaptive_design.py: one scenario's adaptive trajectory respects the round cap handed to it (the
settings travel with each job, so worker processes need not share the driver's globals)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import adaptive_design as AD  # noqa: E402


def test_scenario_spends_at_most_the_round_cap_per_round_and_rounds_at_most_max():
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    cap0, rounds0 = AD.ROUND_CAP, AD.MAX_ROUNDS
    out = AD.scenario(("hoffmann", 0, "local", 0.05, 5))
    assert (AD.ROUND_CAP, AD.MAX_ROUNDS) == (cap0, rounds0)  # the job's settings, not the module's, changed
    traj = out["adaptive"]
    spent = np.array([t["spent"] for t in traj])
    assert len(traj) <= 5 + 1 and traj[0]["spent"] < 0.03  # the initial design: the grid's two smallest budgets
    assert np.all(np.diff(spent) > 0) and np.all(np.diff(spent) <= 0.05 + 1e-9), spent
    assert all(0 <= t["err"] < 1 for t in traj) and out["grid"]["cost"] > 0


def test_jobs_take_fresh_seeds_from_first_seed():
    """--first-seed checks a setting chosen on seeds 0..99 on scenarios it never saw: the jobs' seeds move, their
    settings travel with them."""
    base = AD.make_jobs(["hoffmann", "epoch"], 3, "local", 0.1, 14)
    fresh = AD.make_jobs(["hoffmann", "epoch"], 3, "local", 0.1, 14, first_seed=100)
    assert [j[1] for j in base] == [0, 1, 2, 0, 1, 2]
    assert [j[1] for j in fresh] == [100, 101, 102, 100, 101, 102]
    assert {j[2:] for j in fresh} == {("local", 0.1, 14)} and [j[0] for j in fresh] == [j[0] for j in base]
