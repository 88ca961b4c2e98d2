"""analysis.predictions: pre-registered predictions are immutable (first row per run id stands, a
second write is ignored, a prediction after the run started is refused), hashed (a tampered row is
detected and left out of calibration), joined with outcomes, and calibrated across stores."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest

from analysis import predictions as pr
from analysis.bootstrap import bootstrap_fit
from analysis.cli import main as cli_main
from analysis.design import fit_law
from analysis.store import ResultsStore

LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022
THETA = np.array([np.log(LAW["A"]), np.log(LAW["B"]), LAW["alpha"], LAW["beta"], np.log(LAW["E"])])


def law(N, D):
    return LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(3)
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    L = law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))
    return bootstrap_fit(fit_law(dict(N=N, D=D, L=L), warm=THETA), 100, seed=0, polish=False)


def row(run_id, value=1.0, lo=0.9, hi=1.1, created="2026-12-06T00:00:00.000000Z", **kw):
    """A hand-made prediction (no fit) for the planted calibration cases."""
    pred = dict(value=value, lo=lo, hi=hi, lo_fit=lo, hi_fit=hi, noise_sd=0.0, level=0.9)
    return pr.prediction_row(run_id, pred, fit=dict(form="planted"), data_runs=["a", "b"], N=1e9, D=2e10,
                             flops=1.2e20, threshold_flops=1e20, study="t", source="test", created_utc=created, **kw)


def finish(store, run_id, loss):
    ResultsStore(store).append("train", [dict(run_id=run_id, step=100, val_loss=float(loss), is_final=True)])


def test_predict_run_interval_and_provenance(fit):
    N, D = 3e9, 6e10
    p = pr.predict_run(fit, N, D, level=0.9, seed=1)
    # the point is the fitted law at (N, D); the predictive interval adds run noise to the law's interval
    a, b, al, be, e = fit.theta[:5]
    assert p["value"] == pytest.approx(np.exp(e) + np.exp(a) * N ** -al + np.exp(b) * D ** -be, rel=1e-12)
    assert p["lo"] < p["lo_fit"] < p["value"] < p["hi_fit"] < p["hi"]
    assert p["noise_sd"] > 0 and p["n_boot"] > 90
    assert pr.predict_run(fit, N, D, level=0.9, seed=1) == p  # same seed, same prediction
    r = pr.prediction_row("big", p, fit=fit, data_runs=["r2", "r1"], N=N, D=D, flops=6 * N * D, threshold_flops=1e20)
    info = json.loads(r["fit"])
    assert info["raw"] == pytest.approx(list(fit.theta[:5])) and {"A", "B", "E", "alpha", "beta"} <= set(info["params"])
    assert json.loads(r["data_runs"]) == ["r1", "r2"]
    assert r["created_utc"].endswith("Z") and pd.Timestamp(r["created_utc"]).tzinfo is not None
    assert r["hash"] == pr.row_hash(r) and len(r["hash"]) == 64
    with pytest.raises(ValueError, match="N="):
        pr.predict_run(fit, -1.0, D)


def test_hash_covers_every_field_and_survives_the_store(tmp_path):
    r = row("x")
    for k in pr.HASHED:  # changing any hashed field changes the hash
        changed = dict(r, **{k: (r[k] + "z") if isinstance(r[k], str) else r[k] * 1.5 + 1})
        assert pr.row_hash(changed) != r["hash"], k
    pr.register(tmp_path, r)
    back = pr.read_predictions(tmp_path)
    assert bool(back["hash_ok"].iloc[0]) and back["hash"].iloc[0] == r["hash"]


def test_second_write_is_ignored_and_first_row_stands(tmp_path):
    first, written = pr.register(tmp_path, row("big", value=1.0))
    assert written and first["value"] == 1.0
    again, written2 = pr.register(tmp_path, row("big", value=2.0, created="2026-12-06T01:00:00.000000Z"))
    assert not written2 and again["hash"] == first["hash"] and again["value"] == 1.0
    same, written3 = pr.register(tmp_path, row("big", value=1.0))  # identical content: ignored the same way
    assert not written3 and same["hash"] == first["hash"]
    assert len(ResultsStore(tmp_path).parts(pr.TABLE)) == 1  # nothing else was written
    # a writer that bypasses register (a race, or a bug) cannot replace it either, nor can compaction
    ResultsStore(tmp_path).append(pr.TABLE, [row("big", value=3.0)])
    ResultsStore(tmp_path).compact(pr.TABLE)
    back = pr.read_predictions(tmp_path)
    assert len(back) == 1 and back["value"].iloc[0] == 1.0


def test_prediction_after_the_run_started_is_refused(tmp_path):
    ResultsStore(tmp_path).append("train", [dict(run_id="late", step=1, val_loss=3.0)])
    with pytest.raises(ValueError, match="would not be pre-registered"):
        pr.register(tmp_path, row("late"))
    with pytest.raises(ValueError, match="hash does not match"):
        pr.register(tmp_path, dict(row("other"), value=5.0))
    assert pr.read_predictions(tmp_path).empty


def test_tampered_row_is_detected_and_left_out(tmp_path):
    pr.register(tmp_path, row("a"))
    pr.register(tmp_path, row("b"))
    finish(tmp_path, "a", 1.05)
    finish(tmp_path, "b", 1.05)
    # rewrite b's part file in place: its interval now "held" a value it missed
    part = [p for p in ResultsStore(tmp_path).parts(pr.TABLE) if pq.read_table(p).to_pandas()["run_id"][0] == "b"][0]
    df = pq.read_table(part).to_pandas()
    df.loc[0, "value"] = 1.04
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), part)
    j = pr.join_outcomes(tmp_path)
    assert j.set_index("run_id")["hash_ok"].to_dict() == {"a": True, "b": False}
    cal = pr.calibration(j)
    assert cal["n"] == 1 and cal["held"] == 1 and cal["excluded"]["hash_mismatch"] == 1


def test_join_outcomes(tmp_path):
    pr.register(tmp_path, row("in", value=1.0))
    pr.register(tmp_path, row("out", value=1.0))
    pr.register(tmp_path, row("pending", value=1.0))
    finish(tmp_path, "in", 1.08)
    finish(tmp_path, "out", 1.25)
    ResultsStore(tmp_path).append("train", [dict(run_id="pending", step=5, val_loss=1.4, is_final=False)])
    # a row appended for a run that had started (bypassing register): not pre-registered
    ResultsStore(tmp_path).append("train", [dict(run_id="cheat", step=100, val_loss=1.0, is_final=True)])
    ResultsStore(tmp_path).append(pr.TABLE, [row("cheat")])
    j = pr.join_outcomes(tmp_path).set_index("run_id")
    assert j.loc["in", "outcome"] == 1.08 and j.loc["in", "error"] == pytest.approx(0.08)
    assert j.loc["out", "rel_error"] == pytest.approx(0.25)
    assert bool(j.loc["in", "held"]) and not bool(j.loc["out", "held"]) and pd.isna(j.loc["pending", "held"])
    assert bool(j.loc["in", "preregistered"]) and not bool(j.loc["cheat", "preregistered"])
    cal = pr.calibration(j.reset_index())
    assert (cal["n"], cal["held"]) == (2, 1)
    assert cal["excluded"] == dict(no_outcome=1, hash_mismatch=0, not_preregistered=1)


def test_calibration_across_stores_on_a_planted_case(tmp_path):
    # interval [0.9, 1.1] everywhere; planted outcomes: store A holds 4 of 5, B 3 of 5, C 2 of 2 (+1 pending)
    planted = {"A": [1.0, 1.05, 0.95, 1.09, 1.3], "B": [1.0, 0.5, 1.2, 1.1, 0.9], "C": [1.01, 0.99, None]}
    stores = []
    for name, outs in planted.items():
        st = tmp_path / name / "store"
        for i, y in enumerate(outs):
            pr.register(st, row(f"{name}{i}"))
            if y is not None:
                finish(st, f"{name}{i}", y)
        stores.append(st)
    table, cal = pr.report(stores, tmp_path / "out")
    held = sum(0.9 <= y <= 1.1 for outs in planted.values() for y in outs if y is not None)
    n = sum(y is not None for outs in planted.values() for y in outs)
    assert (cal["n"], cal["held"]) == (n, held) == (12, 9)
    assert cal["rate"] == pytest.approx(held / n)
    ci = binomtest(held, n).proportion_ci(0.95, method="wilson")
    assert (cal["rate_lo"], cal["rate_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert {k: (v["n"], v["held"]) for k, v in cal["per_store"].items()} == {
        str(stores[0]): (5, 4), str(stores[1]): (5, 3), str(stores[2]): (2, 2)}
    assert cal["excluded"]["no_outcome"] == 1 and cal["level"] == 0.9
    for f in ("predictions.md", "predictions.json", "predictions.csv", "predictions.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert "held for 9 of 12" in (tmp_path / "out" / "predictions.md").read_text()
    # the CLI over the same stores
    assert cli_main(["predictions", *map(str, stores), "--json"]) == 0
    assert cli_main(["predictions", str(tmp_path / "missing")]) == 2


def test_cli_json_numbers(tmp_path, capsys):
    pr.register(tmp_path, row("a"))
    finish(tmp_path, "a", 1.2)
    assert cli_main(["predictions", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"]["n"] == 1 and out["calibration"]["held"] == 0
    assert out["predictions"][0]["outcome"] == 1.2 and out["predictions"][0]["held"] is False
