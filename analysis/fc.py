"""The functional-connectivity (FC) baseline: connectivity features + ridge / logistic regression.

What a pre-trained model has to beat (CortexMAE, 2026: pre-trained fMRI models struggle to beat it on trait
prediction). Per task and repeat:

1. features: Fisher-z Pearson correlations of parcel time series (:mod:`data.connectivity`), or the tangent
   space of the parcel covariances (``kind="tangent"``, ``nilearn.connectome.ConnectivityMeasure``, whose
   reference mean is fitted on training subjects only, inside the cross-validation);
2. the **same subject splits as fine-tuning**: the model is fitted on the manifest's ``train`` subjects
   (``fit_splits``) and scored on ``val`` and ``test``; nothing of ``val``/``test`` enters the fit;
3. nested cross-validation: inside the training subjects, a shuffled (stratified) ``inner_folds``-fold CV picks
   the penalty (``C`` of an L2 logistic regression by log loss, ``alpha`` of ridge by MAE) from a log grid
   (selecting ``C`` by AUROC would pick the strongest penalty, whose probabilities all fall on one side of 0.5,
   since AUROC ignores calibration); the pipeline
   (standardise -> estimator) is refitted on all training subjects with it;
4. per-subject predictions (runs of one subject averaged) -> AUROC + balanced accuracy at 0.5 (classification)
   or MAE + Pearson r (regression), like :mod:`study.metrics` for the fine-tuned models;
5. repeats differ in the inner-CV seed (fold assignment), so ``mean ± std`` over repeats measures how much
   the conclusion depends on the hyper-parameter choice (the splits themselves are fixed, as for fine-tuning).

Every result row carries ``chance`` (0.5 for AUROC; the MAE of predicting the training mean for regression) and
``degenerate`` (non-empty when the predictions are constant over subjects, or every subject falls on one side
of the 0.5 threshold, which makes balanced accuracy 0.5 by construction).

Features come from :mod:`data.connectivity`; :mod:`study.fc_baseline` joins the two (``run_fc``) and is the CLI
(``python -m study.fc_baseline --manifest M``). This module works on arrays and imports neither ``data``, ``study``,
``ray`` nor ``torch`` (the analysis layering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

TASK_METRICS: dict[str, tuple[str, ...]] = {"classification": ("auroc", "bacc"), "regression": ("mae", "pearson_r")}
METHOD = "FC baseline"
STRATEGY = "fc"


@dataclass(frozen=True, kw_only=True)
class FCConfig:
    """Settings of the FC baseline."""

    atlas: str = "auto"
    """Parcellation (``data.connectivity.load_parcellation``): ``auto`` (``parcellation.npz`` beside the manifest,
    else ``blocks``), ``blocks[:edge]``, ``networks`` (a synthetic cohort's planted maps), or a labels file."""
    kind: str = "correlation"
    """Connectivity: ``correlation`` (Fisher-z Pearson) or ``tangent`` (nilearn, fitted on training subjects)."""
    inner_folds: int = 5
    """Folds of the inner (hyper-parameter) cross-validation; fewer when a class has fewer subjects."""
    penalties: tuple[float, ...] = tuple(np.logspace(-3, 3, 7))
    """Grid of ``C`` (logistic) or ``1 / alpha`` (ridge): larger is less regularised."""
    repeats: int = 3
    """Repeats (inner-CV seeds ``seed, seed + 1, ...``)."""
    seed: int = 0
    """First inner-CV seed."""
    fit_splits: tuple[str, ...] = ("train",)
    """Manifest splits the estimator is fitted on (fine-tuning fits on ``train``)."""

    def __post_init__(self):
        if self.kind not in ("correlation", "tangent"):
            raise ValueError(f"kind={self.kind!r}; allowed: ['correlation', 'tangent']")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds={self.inner_folds} must be >= 2")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")
        if not self.penalties or min(self.penalties) <= 0:
            raise ValueError(f"penalties={self.penalties} must be positive numbers")


# --------------------------------------------------------------------------------------------------
# metrics (float64, per subject)
# --------------------------------------------------------------------------------------------------
def per_subject(keys: Sequence[str], values: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """Average ``values`` per key (a subject's runs), keys in first-seen order."""
    s = pd.Series(np.asarray(values, dtype=np.float64), index=list(keys))
    g = s.groupby(level=0, sort=False).mean()
    return list(g.index), g.to_numpy()


def degenerate(task_type: str, preds: np.ndarray) -> str:
    """Why the metrics of these per-subject predictions are degenerate, or ``""``.

    Constant predictions (spread below 1e-9 of their scale) make AUROC 0.5 and Pearson r undefined; every
    probability on one side of 0.5 makes balanced accuracy 0.5 whatever the ranking.
    """
    p = np.asarray(preds, dtype=np.float64)
    if p.size == 0:
        return "no predictions"
    if np.ptp(p) <= 1e-9 * max(1.0, float(np.abs(p).max())):
        return "constant prediction"
    if task_type == "classification" and ((p >= 0.5).all() or (p < 0.5).all()):
        return "one class predicted (bacc = 0.5 by construction)"
    return ""


def score(task_type: str, y: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """AUROC + balanced accuracy (probabilities, threshold 0.5) or MAE + Pearson r."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    if task_type == "classification":
        both = len(np.unique(y)) == 2
        return {"auroc": float(roc_auc_score(y, p)) if both else float("nan"),
                "bacc": float(balanced_accuracy_score(y, (p >= 0.5).astype(float))) if y.size else float("nan")}
    r = float(np.corrcoef(y, p)[0, 1]) if y.size > 1 and np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan")
    return {"mae": float(np.mean(np.abs(y - p))) if y.size else float("nan"), "pearson_r": r}


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
def make_estimator(task_type: str, cfg: FCConfig, seed: int, y_train: np.ndarray):
    """A ``GridSearchCV`` over the penalty of standardise -> (tangent ->) logistic / ridge regression."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = []
    if cfg.kind == "tangent":
        from nilearn.connectome import ConnectivityMeasure

        steps.append(("fc", ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)))
    steps.append(("scale", StandardScaler()))
    n = len(y_train)
    if task_type == "classification":
        min_class = int(np.bincount(np.asarray(y_train, dtype=int)).min()) if n else 0
        folds = min(cfg.inner_folds, min_class)
        if folds < 2:
            raise ValueError(f"{min_class} training subject(s) in the smaller class: no inner cross-validation")
        steps.append(("est", LogisticRegression(max_iter=5000)))
        grid = {"est__C": list(cfg.penalties)}
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        scoring = "neg_log_loss"  # a proper score: AUROC alone picks the strongest penalty, whose probabilities
        # all sit on one side of 0.5 (balanced accuracy 0.5 by construction)
    else:
        folds = min(cfg.inner_folds, n)
        if folds < 2:
            raise ValueError(f"{n} training subject(s): no inner cross-validation")
        steps.append(("est", Ridge()))
        grid = {"est__alpha": [1.0 / c for c in cfg.penalties]}
        cv = KFold(folds, shuffle=True, random_state=seed)
        scoring = "neg_mean_absolute_error"
    return GridSearchCV(Pipeline(steps), grid, cv=cv, scoring=scoring, refit=True, n_jobs=1)


def _predict(est, task_type: str, X) -> np.ndarray:
    return est.predict_proba(X)[:, 1] if task_type == "classification" else est.predict(X)


def fc_baseline(features, keys: Sequence[str], splits: Sequence[str], labels: pd.DataFrame,
                tasks: Sequence[tuple[str, str]], cfg: FCConfig = FCConfig()) -> pd.DataFrame:
    """Fit and score the FC baseline on precomputed features.

    Parameters
    ----------
    features : array ``(N, F)`` or object array of ``(T, P)`` series (``kind="tangent"``)
        One row per manifest row (run).
    keys, splits : sequences of str
        ``cohort/subject`` and split of every row.
    labels : DataFrame
        One row per manifest row (same order) with a column per task's target.
    tasks : sequence of (target, task_type)

    Returns
    -------
    DataFrame
        One row per (task, repeat): ``task, task_type, repeat, seed, metric, value`` (headline metric), every test
        metric as a column, ``val_*`` metrics, ``chance``, ``degenerate``, ``best_penalty``, ``n_train``,
        ``n_test_subjects``, ``method``, ``strategy``, ``checkpoint``, ``kind``.
    """
    keys = np.asarray(list(keys), dtype=object)
    splits = np.asarray(list(splits), dtype=object)
    if len(keys) != len(features) or len(splits) != len(features) or len(labels) != len(features):
        raise ValueError(f"features ({len(features)}), keys ({len(keys)}), splits ({len(splits)}) and labels "
                         f"({len(labels)}) must have one entry per manifest row")
    rows = []
    for target, task_type in tasks:
        if task_type not in TASK_METRICS:
            raise ValueError(f"task type {task_type!r}; allowed: {list(TASK_METRICS)}")
        if target not in labels.columns:
            raise ValueError(f"label column {target!r} not in the manifest; columns: {list(labels.columns)}")
        y_all = labels[target].to_numpy(dtype=np.float64)
        ok = np.isfinite(y_all)
        fit = ok & np.isin(splits, list(cfg.fit_splits))
        if not fit.any():
            raise ValueError(f"{target}: no labelled subjects in the fit splits {list(cfg.fit_splits)}")
        y_fit = y_all[fit]
        chance = 0.5 if task_type == "classification" else float("nan")
        for r in range(cfg.repeats):
            seed = cfg.seed + r
            try:
                est = make_estimator(task_type, cfg, seed, y_fit)
            except ValueError as exc:  # too few training subjects: a row that says so, not a number
                rows.append({"task": target, "task_type": task_type, "repeat": r, "seed": seed, "method": METHOD,
                             "strategy": STRATEGY, "checkpoint": "fc", "kind": cfg.kind, "chance": chance,
                             "metric": TASK_METRICS[task_type][0], "value": float("nan"),
                             "degenerate": f"not fitted: {exc}", "n_train": int(len(set(keys[fit])))})
                continue
            X_fit = features[fit]
            est.fit(list(X_fit) if cfg.kind == "tangent" else X_fit, y_fit)
            param = next(iter(est.best_params_.values()))
            row = {"task": target, "task_type": task_type, "repeat": r, "seed": seed, "method": METHOD,
                   "strategy": STRATEGY, "checkpoint": "fc", "kind": cfg.kind,
                   "best_penalty": float(param if task_type == "classification" else 1.0 / param),
                   "n_train": int(len(set(keys[fit])))}
            for split, prefix in (("val", "val_"), ("test", "")):
                sel = ok & (splits == split)
                if not sel.any():
                    for m in TASK_METRICS[task_type]:
                        row[prefix + m] = float("nan")
                    continue
                X = features[sel]
                p = _predict(est, task_type, list(X) if cfg.kind == "tangent" else X)
                k, p_subj = per_subject(keys[sel], p)
                _, y_subj = per_subject(keys[sel], y_all[sel])
                for m, v in score(task_type, y_subj, p_subj).items():
                    row[prefix + m] = v
                if split == "test":
                    row["n_test_subjects"] = len(k)
                    row["degenerate"] = degenerate(task_type, p_subj)
                    if task_type == "regression":  # predicting the mean of the training subjects
                        _, y_tr = per_subject(keys[fit], y_fit)
                        chance = float(np.mean(np.abs(y_subj - y_tr.mean())))
            row["chance"] = chance
            row["metric"] = TASK_METRICS[task_type][0]
            row["value"] = row.get(row["metric"], float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# gains against a baseline
# --------------------------------------------------------------------------------------------------
def below_chance(metric: str, mean: float, chance: float | None) -> bool:
    """A baseline no better than chance: AUROC < 0.5 (``chance`` 0.5), or an MAE at or above that of predicting
    the training mean (``chance``). Unknown ``chance`` (None / NaN): False for MAE."""
    if not np.isfinite(mean):
        return True
    if metric == "auroc":
        return mean < 0.5
    if metric == "mae":
        return chance is not None and np.isfinite(chance) and mean >= chance
    return False


def paired_gain(values: Sequence[float], baseline: Sequence[float], *, level: float = 0.95) -> dict[str, float]:
    """Difference ``values - baseline`` (paired by repeat index when both have the same length, else unpaired):
    mean, a t ``level`` interval and the two-sided p-value (paired t-test, or Welch's). NaN where n < 2."""
    from scipy import stats

    a = np.asarray(values, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    a, b = (a, b) if len(a) != len(b) else (a[np.isfinite(a) & np.isfinite(b)], b[np.isfinite(a) & np.isfinite(b)])
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    nan = dict(diff=float("nan"), lo=float("nan"), hi=float("nan"), p=float("nan"), n=0, paired=False)
    if not a.size or not b.size:
        return nan
    diff = float(a.mean() - b.mean())
    paired = len(a) == len(b)
    if paired:
        d = a - b
        n = len(d)
        se = d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
        dof = n - 1
    else:
        n = min(len(a), len(b))
        va = a.var(ddof=1) / len(a) if len(a) > 1 else float("nan")
        vb = b.var(ddof=1) / len(b) if len(b) > 1 else float("nan")
        se = float(np.sqrt(va + vb))
        dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if n > 1 and va + vb > 0 else 1
    if not np.isfinite(se):
        return dict(nan, diff=diff, n=n, paired=paired)
    if se == 0:
        p = 0.0 if diff != 0 else 1.0
        return dict(diff=diff, lo=diff, hi=diff, p=p, n=n, paired=paired)
    q = float(stats.t.ppf(0.5 + level / 2, dof))
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return dict(diff=diff, lo=diff - q * se, hi=diff + q * se, p=p, n=n, paired=paired)
