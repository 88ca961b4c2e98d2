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
