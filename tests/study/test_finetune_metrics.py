"""Per-subject downstream metrics against float64 brute-force / scipy references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from study import metrics as M


def brute_auroc(y, s):
    """P(score_pos > score_neg) + 0.5 P(tie), over every (positive, negative) pair."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_match_scipy(seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 6, size=37).astype(float)  # many ties
    np.testing.assert_array_equal(M.average_ranks(v), scipy.stats.rankdata(v))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=29)
    y[:2] = [0, 1]
    s = np.round(rng.normal(size=29) + 0.7 * y, 1)  # rounding plants ties
    assert len(np.unique(s)) < len(s)
    assert M.auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)


def test_auroc_known_values():
    assert M.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert M.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert M.auroc([0, 0, 1], [0.1, 0.3, 0.2]) == 0.5
    assert np.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0 and 1"):
        M.auroc([0, 2], [0.1, 0.2])


def test_balanced_accuracy_by_hand():
    y = [0, 0, 0, 0, 1, 1]
    p = [0, 0, 0, 1, 1, 0]
    # recall(0) = 3/4, recall(1) = 1/2
    assert M.balanced_accuracy(y, p) == pytest.approx(0.625)


def test_mae_and_pearson_vs_references():
    rng = np.random.default_rng(5)
    y = rng.normal(size=23) * 7 + 40
    p = y + rng.normal(size=23) * 3
    assert M.mae(y, p) == pytest.approx(np.abs(y - p).mean(), rel=1e-14)
    assert M.pearson_r(y, p) == pytest.approx(scipy.stats.pearsonr(y, p)[0], rel=1e-12)
    assert np.isnan(M.pearson_r(y, np.ones_like(y)))


def test_aggregate_by_subject_averages_windows():
    subjects = ["b", "a", "b", "c", "a", "b"]
    preds = [1.0, 2.0, 3.0, 10.0, 4.0, 5.0]
    targets = [7.0, 1.0, 7.0, 3.0, 1.0, 7.0]
    keys, mean_pred, target = M.aggregate_by_subject(subjects, preds, targets)
    assert keys == ["a", "b", "c"]
    np.testing.assert_allclose(mean_pred, [3.0, 3.0, 10.0])
    np.testing.assert_allclose(target, [1.0, 7.0, 3.0])
    with pytest.raises(ValueError, match="different labels"):
        M.aggregate_by_subject(["a", "a"], [0.0, 0.0], [1.0, 2.0])


def test_score_subjects_classification_averages_probabilities_not_logits():
    # subject s1: logits +10 and -4 -> mean logit 3 (p~0.95) but mean probability ~0.51;
    # subject s2: logits 0.2, 0.2 -> p~0.55. On probabilities s2 ranks above s1; on logits it would not.
    subjects = ["s1", "s1", "s2", "s2"]
    logits = [10.0, -4.0, 0.2, 0.2]
    y = [0, 0, 1, 1]
    out = M.score_subjects("classification", subjects, logits, y)
    assert out["auroc"] == 1.0
    assert out["n_subjects"] == 2
    p1 = (1 / (1 + np.exp(-10)) + 1 / (1 + np.exp(4))) / 2
    assert p1 >= 0.5  # so s1 is predicted positive: bacc = (0 + 1) / 2
    assert out["bacc"] == 0.5


def test_score_subjects_regression_per_subject():
    subjects = ["x", "x", "y", "z", "z"]
    preds = [1.0, 3.0, 5.0, 0.0, 4.0]
    targets = [2.5, 2.5, 4.0, 1.0, 1.0]
    out = M.score_subjects("regression", subjects, preds, targets)
    # per subject: x 2 vs 2.5, y 5 vs 4, z 2 vs 1
    assert out["mae"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert out["pearson_r"] == pytest.approx(scipy.stats.pearsonr([2.5, 4.0, 1.0], [2.0, 5.0, 2.0])[0])
    with pytest.raises(ValueError, match="task_type"):
        M.score_subjects("ranking", subjects, preds, targets)
