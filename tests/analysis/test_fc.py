"""The FC baseline (analysis.fc): planted features, degenerate predictors, gains, and the CLI on a cohort."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.fc import FCConfig, below_chance, degenerate, fc_baseline, paired_gain

TASKS = [("yb", "classification"), ("yc", "regression")]


def _planted(n=90, signal=1.0, seed=0):
    rng = np.random.default_rng(seed)
    yc = rng.standard_normal(n)
    yb = (rng.random(n) < 0.5).astype(float)
    X = rng.standard_normal((n, 12))
    X[:, 0] += signal * 2 * yb
    X[:, 1] += signal * 3 * yc
    keys = [f"c/s{i}" for i in range(n)]
    splits = np.array(["train", "val", "test"])[np.arange(n) % 3]
    return X, keys, splits, pd.DataFrame({"yb": yb, "yc": yc})


def test_planted_signal_is_found_on_the_test_split_only_fitted_on_train():
    X, keys, splits, labels = _planted()
    df = fc_baseline(X, keys, splits, labels, TASKS, FCConfig(repeats=3))
    assert len(df) == 6 and sorted(df["repeat"].unique()) == [0, 1, 2]
    b, c = df[df.task == "yb"], df[df.task == "yc"]
    assert (b["auroc"] > 0.8).all() and (b["value"] == b["auroc"]).all() and (b["chance"] == 0.5).all()
    assert (c["mae"] < 0.8 * c["chance"]).all() and (c["pearson_r"] > 0.5).all()
    assert (df["n_train"] == 30).all() and (df["n_test_subjects"] == 30).all()
    assert not df["degenerate"].astype(bool).any()
    # labels of val/test subjects do not enter the fit: scrambling them leaves the predictions' fit unchanged
    scrambled = labels.copy()
    scrambled.loc[splits != "train", "yc"] = 0.0
    df2 = fc_baseline(X, keys, splits, scrambled, [("yc", "regression")], FCConfig(repeats=1))
    assert df2["best_penalty"].iloc[0] == c["best_penalty"].iloc[0]


def test_no_signal_is_chance_and_a_constant_predictor_is_flagged():
    X, keys, splits, labels = _planted(signal=0.0, seed=1)
    df = fc_baseline(X, keys, splits, labels, TASKS, FCConfig(repeats=1))
    assert abs(df.loc[df.task == "yb", "auroc"].iloc[0] - 0.5) < 0.25
    assert degenerate("classification", np.full(5, 0.3)) == "constant prediction"
    assert "one class" in degenerate("classification", np.array([0.1, 0.2, 0.4]))
    assert degenerate("regression", np.array([1.0, 1.0 + 1e-12])) == "constant prediction"
    assert degenerate("regression", np.array([1.0, 2.0])) == ""


def test_gain_interval_and_paired_test():
    g = paired_gain([0.8, 0.7, 0.9], [0.6, 0.5, 0.7])  # constant paired difference 0.2
    assert g["paired"] and g["diff"] == pytest.approx(0.2) and g["lo"] == pytest.approx(0.2) and g["p"] < 1e-12
    g = paired_gain([0.8, 0.6, 0.9], [0.6, 0.5, 0.7])
    d = np.array([0.2, 0.1, 0.2])
    from scipy import stats
    assert g["diff"] == pytest.approx(d.mean()) and g["p"] == pytest.approx(stats.ttest_rel([0.8, 0.6, 0.9],
                                                                                           [0.6, 0.5, 0.7]).pvalue)
    assert g["lo"] < g["diff"] < g["hi"]
    assert not paired_gain([0.8, 0.7], [0.6, 0.5, 0.7])["paired"]
    assert below_chance("auroc", 0.28, 0.5) and not below_chance("auroc", 0.6, 0.5)
    assert below_chance("mae", 1.1, 1.0) and not below_chance("mae", 0.9, 1.0) and not below_chance("mae", 9, None)


def test_a_task_too_small_for_inner_cv_gives_a_row_that_says_so():
    X, keys, splits, labels = _planted(n=12)
    labels["yb"] = 0.0
    labels.loc[0, "yb"] = 1.0  # one training subject in class 1
    df = fc_baseline(X, keys, splits, labels, TASKS, FCConfig(repeats=2))
    b = df[df.task == "yb"]
    assert len(b) == 2 and b["value"].isna().all() and b["degenerate"].str.startswith("not fitted").all()
    assert df.loc[df.task == "yc", "value"].notna().all()

