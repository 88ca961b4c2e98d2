"""µTransfer is fitted on each run's base LR, never on an optimizer group's width-scaled LR.

Under muP, ``MuAdamW`` divides the LR of matrix-like parameter groups by their width multiplier. The
training loop used to log ``optimizer.param_groups[0]["lr"]`` as ``lr``, which overwrote the run's base LR
in the results store; the µTransfer analysis then fitted ``base_lr / width_mult`` and reported muP's flat
optimum as a slope of -1 per log2 width ("does not transfer"). These tests fail on that code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.report import final_rows
from analysis.store import ResultsStore, read_table
from study.devices import local_context
from study.run_env import static_row
from study.mutransfer import analyse, plan_mutransfer
from study.reporters import MultiReporter, StoreReporter
from study.spec import RunSpec
from study.train import lr_factor, train


def test_stored_lr_of_a_mup_run_is_its_base_lr(tiny_cohort, tmp_path):
    spec = RunSpec(family="swift_v2", size="debug", width=32, parametrization="mup", mup_base_width=16,
                   lr=2.0 ** -6, grid=(24, 24, 24), sequence_length=4, batch_size=2, budget=3, eval_every=3,
                   eval_windows=2, manifest=tiny_cohort, precision="fp32", schedule="cosine", warmup_frac=0.0)
    store = ResultsStore(tmp_path / "store")
    train(spec, local_context("cpu"), MultiReporter([StoreReporter(store, static_row(spec))]))
    row = final_rows(read_table(tmp_path / "store", "train")).iloc[0]
    assert row["lr"] == spec.lr and row["base_lr"] == spec.lr and row["spec.lr"] == spec.lr
    # the schedule's LR of the last step, for dashboards: base LR x schedule, not a group's scaled LR
    assert row["lr_step"] == pytest.approx(spec.lr * lr_factor(2, 3, spec))


def test_a_metric_may_not_overwrite_a_runs_static_column(tmp_path):
    rep = StoreReporter(ResultsStore(tmp_path), {"run_id": "r", "lr": 1e-3})
    with pytest.raises(ValueError, match="overwrite.*'lr'"):
        rep.report({"step": 1, "lr": 5e-4})
    rep.report({"step": 1, "run_id": "r", "val_loss": 1.0})  # same value: fine
    assert len(read_table(tmp_path, "train")) == 1


def test_mutransfer_analysis_reads_the_base_lr_even_from_an_old_store(tmp_path):
    """Rows as the old loop wrote them (``lr`` = base LR / width multiplier under muP) with a loss whose
    optimum is 2^-7 at every width under muP and drifts by -1 per log2 width under SP."""
    widths, lrs = (16, 32, 64, 128), [2.0 ** e for e in range(-11, -2)]
    plan = plan_mutransfer(family="swift_v2", size="debug", widths=widths, lrs=lrs, base_width=16, steps=4)
    jitter = dict(zip(widths, (0.04, -0.03, 0.02, -0.04)))  # the fitted optima are never exactly collinear
    rows = []
    for s in plan.specs:
        mult = s.width / 16
        opt = jitter[s.width] + (-7.0 if s.parametrization == "mup" else -7.0 - math.log2(mult))
        logged = s.lr / mult if s.parametrization == "mup" else s.lr
        rows.append({"run_id": s.run_id, "step": 4, "is_final": True, "width": s.width,
                     "parametrization": s.parametrization, "lr": logged,
                     "val_loss": 1.0 + 0.05 * (math.log2(s.lr) - opt) ** 2})
    ResultsStore(tmp_path / "store").append("train", rows)
    out = analyse(tmp_path / "store", tmp_path / "report", plan.specs)
    slopes = {r["parametrization"]: r for r in out["slopes"]}
    assert slopes["mup"]["slope"] == pytest.approx(-0.019, abs=1e-6) and slopes["mup"]["transfers"] is True
    assert slopes["sp"]["slope"] == pytest.approx(-1.019, abs=1e-6) and slopes["sp"]["transfers"] is False
    per = {(r["parametrization"], r["width"]): r["log2_lr_opt"] for r in out["per_width"]}
    assert np.allclose([per[("mup", float(w))] for w in widths], [-7 + jitter[w] for w in widths])


def test_quick_sweep_is_pinned():
    from study.mutransfer import QUICK, parse_args

    assert QUICK == {"widths": [16, 32, 64, 128], "lrs": [2.0 ** e for e in range(-9, -2)], "steps": 40}
    plan = plan_mutransfer(family="swift_v2", size="debug", widths=QUICK["widths"], lrs=QUICK["lrs"],
                           base_width=16, steps=QUICK["steps"])
    assert len(plan.specs) == 56 and {s.budget for s in plan.specs} == {40}
    assert parse_args(["--quick"]).quick and parse_args([]).steps == 100


def test_verdict_says_drift_transfer_or_inconclusive_in_words():
    import pandas as pd

    from study.mutransfer import verdict_lines

    rows = pd.DataFrame([
        dict(parametrization="mup", slope=0.05, lo=-0.1, hi=0.2, transfers=True, valid=True, warnings=[]),
        dict(parametrization="sp", slope=-0.6, lo=-0.8, hi=-0.4, transfers=False, valid=True, warnings=[]),
        dict(parametrization="x", slope=-0.6, lo=-3.0, hi=2.0, transfers=True, valid=False,
             warnings=["interval too wide"])])
    mup, sp, bad = verdict_lines(rows, 16)
    assert "muP: the optimal LR does not drift" in mup and "transfers" in mup
    assert "SP: the optimal LR drifts" in sp and "too large" in sp
    assert "inconclusive" in bad and "interval too wide" in bad


@pytest.mark.slow
def test_quick_mutransfer_study_shows_mup_transfers_and_sp_drifts(tmp_path):
    """The 2-CPU demonstration, end to end through Ray Tune: the conclusion a user reads is the physics
    (docs/LOG.md 2026-12-06, dev box: seed 0 muP +0.08 [-0.06, +0.22], SP -0.54 [-0.76, -0.31]; seed 1 muP -0.08
    [-0.51, +0.35], SP -0.83 [-1.12, -0.55]).

    The slopes depend on the CPU's float rounding in training (the same code, seed 0: SP -0.47 [-0.83, -0.11] and
    muP +0.145 [-0.00, +0.29] on an AVX-512/AMX host, SP -0.49 and muP +0.09 with ``ATEN_CPU_CAPABILITY=avx2``;
    docs/LOG.md session 17), so SP's drift is asserted as its interval's, not as a point value: the SP interval
    excludes 0 and lies below muP's, which contains 0."""
    import json

    from study.mutransfer import main

    assert main(["--quick", "--storage", str(tmp_path)]) == 0
    report = tmp_path / "mutransfer" / "report"
    slopes = {r["parametrization"]: r for r in json.loads((report / "mutransfer.json").read_text())["slopes"]}
    mup, sp = slopes["mup"], slopes["sp"]
    assert abs(mup["slope"]) <= 0.25 and mup["lo"] <= 0 <= mup["hi"] and mup["transfers"] and mup["valid"]
    assert sp["hi"] < 0 and sp["hi"] < mup["lo"] and not sp["transfers"] and sp["valid"]
    art = json.loads((report / "lr_transfer.json").read_text())
    assert art["base_width"] == 16 and art["transfers"] and 2.0 ** -7 < art["base_lr"] < 2.0 ** -4
    assert "muP: the optimal LR does not drift" in (report / "mutransfer.md").read_text()
