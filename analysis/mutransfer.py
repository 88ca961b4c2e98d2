"""µTransfer analysis: optimal learning rate per width and its drift with width (SP vs muP)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.fits import FitError, check_positive
from analysis.validity import THRESHOLDS, Thresholds, check_validity

__all__ = ["optimal_lr", "lr_transfer", "slope_validity"]


def optimal_lr(lr, loss, *, window: int = 2) -> dict:
    """Optimal LR from a quadratic fit of loss against ``log2 lr`` around the best point.

    Parameters
    ----------
    lr, loss : array-like
        One value per run of one width (LRs may repeat, e.g. seeds: they are averaged).
    window : int
        Points on each side of the best LR used in the fit (at least 3 points in all).

    Returns
    -------
    dict
        ``log2_lr_opt, lr_opt, loss_opt, curvature, n_points, interior`` (vertex inside the fitted
        range), ``best_lr`` (the best grid point), ``at_grid_edge`` (the best grid point is the smallest
        or largest LR tried: the optimum may lie outside the grid; an LR that diverged next to the best
        one brackets it), ``log2_grid_lo``, ``log2_grid_hi`` (the LRs tried) and ``log2_fit_lo``,
        ``log2_fit_hi`` (the points fitted).
    """
    lr = check_positive("lr", lr)
    loss = np.asarray(loss, dtype=np.float64)
    if not np.all(np.isfinite(loss)):
        loss = np.where(np.isfinite(loss), loss, np.nan)  # diverged runs: excluded
    tried = np.unique(np.log2(lr))  # every LR tried: a diverged one still brackets the optimum (its loss is worse)
    g = pd.DataFrame(dict(x=np.log2(lr), y=loss)).dropna().groupby("x", as_index=False)["y"].mean()
    if len(g) < 3:
        raise FitError(f"optimal LR needs at least 3 distinct learning rates with finite loss, got {len(g)}")
    i = int(np.argmin(g.y.to_numpy()))
    lo, hi = max(0, i - window), min(len(g), i + window + 1)
    while hi - lo < 3:
        lo, hi = max(0, lo - (hi - lo < 3)), min(len(g), hi + (hi - lo < 3))
    sub = g.iloc[lo:hi]
    p2, p1, p0 = np.polyfit(sub.x, sub.y, 2)
    if p2 <= 0:
        raise FitError(f"optimal LR: the loss is not convex in log2 lr around the best point (curvature {p2:.3g})")
    v = -p1 / (2 * p2)
    return dict(log2_lr_opt=float(v), lr_opt=float(2 ** v), loss_opt=float(p0 - p1 * p1 / (4 * p2)), curvature=float(p2),
                n_points=int(len(sub)), interior=bool(sub.x.min() <= v <= sub.x.max()), best_lr=float(2 ** g.x.iloc[i]),
                at_grid_edge=bool(g.x.iloc[i] in (tried[0], tried[-1])), log2_grid_lo=float(tried[0]),
                log2_grid_hi=float(tried[-1]),
                log2_fit_lo=float(sub.x.min()), log2_fit_hi=float(sub.x.max()))


def slope_validity(par, per_width: pd.DataFrame, slope_row: dict, thresholds: Thresholds = THRESHOLDS):
    """Can the transfer verdict of one parametrization be trusted?

    Not when there are fewer than ``thresholds.min_widths_mutransfer`` widths, when the slope
    interval is missing or wider than ``+-thresholds.max_slope_halfwidth``, or when at some width the
    best LR is at the edge of the LR grid (or the quadratic's vertex falls outside the points it was
    fitted on): then the optimum was not bracketed and LR* is a guess.

    Returns
    -------
    analysis.validity.Validity
    """
    optima = []
    for r in per_width.itertuples():
        if r.at_grid_edge:
            optima.append((f"{par} width {r.width:g}: best log2 LR", np.log2(r.best_lr), r.log2_grid_lo, r.log2_grid_hi))
        else:
            optima.append((f"{par} width {r.width:g}: log2 LR*", r.log2_lr_opt, r.log2_fit_lo, r.log2_fit_hi))
    return check_validity(distinct={"widths": (len(per_width), thresholds.min_widths_mutransfer)},
                          wide={f"{par} slope": (slope_row["lo"], slope_row["hi"], thresholds.max_slope_halfwidth)},
                          optima=optima, thresholds=thresholds)


def lr_transfer(df: pd.DataFrame, *, lr_col: str = "lr", loss_col: str = "val_loss", width_col: str = "width",
                param_col: str | None = "parametrization", window: int = 2, level: float = 0.95
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optimal LR per (parametrization, width) and the slope of ``log2 LR*`` against ``log2 width``.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per run (final loss), with LR, loss, width and optionally parametrization columns.
    level : float
        Confidence level of the slope interval (t-distribution on the regression).

    Returns
    -------
    per_width : pandas.DataFrame
        ``parametrization, width`` + the fields of :func:`optimal_lr`.
    slopes : pandas.DataFrame
        Per parametrization: ``slope, se, lo, hi, n_widths, transfers`` (the interval contains 0:
        the optimal LR does not drift with width, which muP should give and SP should not), ``valid``
        and ``warnings`` (:func:`slope_validity`: whether that verdict can be trusted).
    """
    for c in (lr_col, loss_col, width_col):
        if c not in df.columns:
            raise ValueError(f"column {c!r} not found; columns are {list(df.columns)}")
    groups = df.groupby(param_col) if param_col and param_col in df.columns else [("all", df)]
    rows, slopes = [], []
    for par, d in groups:
        failed = []  # a width without an optimum (too few finite losses, not convex) is named, not fatal
        for w, dw in d.groupby(width_col):
            try:
                r = optimal_lr(dw[lr_col], dw[loss_col], window=window)
            except FitError as exc:
                failed.append(f"{par} width {float(w):g}: no optimal LR ({exc}); left out of the slope")
                continue
            rows.append(dict(parametrization=par, width=float(w), **r))
        pw = pd.DataFrame([r for r in rows if r["parametrization"] == par])
        if len(pw) < 2:
            if failed:
                slopes.append(dict(parametrization=par, slope=float("nan"), se=float("nan"), lo=float("nan"),
                                   hi=float("nan"), n_widths=len(pw), transfers=None, valid=False, warnings=failed))
            continue
        x, y = np.log2(pw.width.to_numpy()), pw.log2_lr_opt.to_numpy()
        slope, icpt = np.polyfit(x, y, 1)
        se, lo, hi = float("nan"), float("nan"), float("nan")
        if len(pw) >= 3:  # residual-based SE (linregress gives NaN when every LR* is the same: a perfect fit)
            se = float(np.sqrt(np.sum((y - slope * x - icpt) ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2)))
            tq = stats.t.ppf(0.5 + level / 2, len(pw) - 2)
            lo, hi = slope - tq * se, slope + tq * se
        row = dict(parametrization=par, slope=float(slope), se=se, lo=float(lo),
                   hi=float(hi), n_widths=len(pw), transfers=bool(lo <= 0 <= hi) if np.isfinite(lo) else None)
        verdict = slope_validity(par, pw, row).to_dict()
        if failed:
            verdict = {**verdict, "valid": False, "warnings": [*failed, *verdict["warnings"]]}
        slopes.append({**row, **verdict})
    return pd.DataFrame(rows), pd.DataFrame(slopes)
