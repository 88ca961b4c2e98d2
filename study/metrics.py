"""Downstream metrics, scored per subject as in the seed report.

A subject contributes several windows (segments); the model predicts every window, the predictions
of one subject are averaged, and only then is the task scored (one point per subject):

* classification: AUROC (rank statistic, ties get half credit) and balanced accuracy (mean recall
  of the two classes at probability 0.5), on the mean of the window *probabilities*;
* regression: MAE and Pearson r, on the mean of the window predictions in the target's own units.

Everything is float64 NumPy; scikit-learn is not needed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: Metrics per task type; the first one is the headline metric of the seed's tables.
TASK_METRICS: dict[str, tuple[str, ...]] = {"classification": ("auroc", "bacc"),
                                             "regression": ("mae", "pearson_r")}
#: True when larger is better.
HIGHER_IS_BETTER: dict[str, bool] = {"auroc": True, "bacc": True, "mae": False, "pearson_r": True}


def parse_tasks(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["label:classification", ...]`` -> ``[(label, task_type), ...]`` (``ValueError`` naming the bad one)."""
    out = []
    for it in items:
        target, _, task_type = it.partition(":")
        if task_type not in TASK_METRICS or not target:
            raise ValueError(f"task {it!r} must be '<label column>:<task type>' with task type in {list(TASK_METRICS)}")
        out.append((target, task_type))
    return out


def _check_task_type(task_type: str) -> None:
    if task_type not in TASK_METRICS:
        raise ValueError(f"task_type={task_type!r}; allowed: {list(TASK_METRICS)}")


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values`` with ties given their average rank (like ``scipy.stats.rankdata``)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(v)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)  # mean of ranks s+1 .. e
    return ranks


def auroc(y_true: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2).

    Parameters
    ----------
    y_true : array of {0, 1}
        Binary labels.
    scores : array of float
        Higher means more likely class 1.

    Returns
    -------
    float
        AUROC in [0, 1]; ``nan`` when only one class is present.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but scores has {s.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1")
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def balanced_accuracy(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Mean per-class recall of binary (or multi-class) labels; classes absent from ``y_true`` are skipped."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    classes = np.unique(y)
    if classes.size == 0:
        return float("nan")
    return float(np.mean([np.mean(p[y == c] == c) for c in classes]))


def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Mean absolute error (float64)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    return float(np.mean(np.abs(y - p))) if y.size else float("nan")


def pearson_r(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Pearson correlation (float64); ``nan`` when either side is constant or has < 2 values."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    if y.size < 2:
        return float("nan")
    yc, pc = y - y.mean(), p - p.mean()
    den = np.sqrt((yc * yc).sum() * (pc * pc).sum())
    return float((yc * pc).sum() / den) if den > 0 else float("nan")


def aggregate_by_subject(subjects: Sequence[str], preds: Sequence[float], targets: Sequence[float]
                         ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Average window predictions per subject.

    Parameters
    ----------
    subjects : sequence of str
        Subject key of every window (use ``cohort/subject`` so names never collide across cohorts).
    preds, targets : sequences of float
        Window prediction and window label (the label is a subject property: it must be constant
        within a subject).

    Returns
    -------
    keys : list of str
        Sorted subject keys.
    mean_pred : ndarray, float64
        Mean prediction per subject.
    target : ndarray, float64
        Label per subject.
    """
    subj = np.asarray(list(subjects), dtype=object)
    p = np.asarray(preds, dtype=np.float64).ravel()
    t = np.asarray(targets, dtype=np.float64).ravel()
    if not (subj.size == p.size == t.size):
        raise ValueError(f"got {subj.size} subjects, {p.size} predictions and {t.size} targets")
    keys = sorted(set(subj.tolist()))
    mean_pred = np.empty(len(keys))
    target = np.empty(len(keys))
    for j, k in enumerate(keys):
        sel = subj == k
        if np.ptp(t[sel]) > 1e-6 * max(1.0, np.abs(t[sel]).max()):
            raise ValueError(f"subject {k!r} has different labels in different windows: {np.unique(t[sel])}")
        mean_pred[j] = p[sel].mean()
        target[j] = t[sel][0]
    return keys, mean_pred, target


def sigmoid(z: Sequence[float]) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def score_subjects(task_type: str, subjects: Sequence[str], outputs: Sequence[float], targets: Sequence[float]
                   ) -> dict[str, float]:
    """Per-subject metrics of one split.

    Parameters
    ----------
    task_type : {"classification", "regression"}
        ``classification``: ``outputs`` are logits; window probabilities are averaged per subject.
        ``regression``: ``outputs`` are predictions in the target's own units.
    subjects, outputs, targets : sequences
        One entry per window.

    Returns
    -------
    dict
        ``auroc`` and ``bacc`` (classification) or ``mae`` and ``pearson_r`` (regression), plus
        ``n_subjects``.
    """
    _check_task_type(task_type)
    values = sigmoid(outputs) if task_type == "classification" else np.asarray(outputs, dtype=np.float64)
    keys, pred, target = aggregate_by_subject(subjects, values, targets)
    if task_type == "classification":
        out = {"auroc": auroc(target, pred), "bacc": balanced_accuracy(target, (pred >= 0.5).astype(np.float64))}
    else:
        out = {"mae": mae(target, pred), "pearson_r": pearson_r(target, pred)}
    out["n_subjects"] = float(len(keys))
    return out
