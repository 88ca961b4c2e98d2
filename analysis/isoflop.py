"""Chinchilla approach 2 (IsoFLOP profiles): per budget a parabola of loss in ``log size``, its vertex,
then ``opt = k C**a`` by (optionally weighted) least squares in log-log space (:func:`analysis.forms.wls_loglog`,
the same fit as the ``loglog`` form).

Robustness: ``drop_bad_budgets=True`` leaves out (and names, in ``dropped_budgets``) a budget whose
runs have fewer than 3 sizes or whose parabola opens downward, instead of failing the whole fit; the
bootstrap counts replicates in which some kept budget had no minimum (``bootstrap_failed`` of
``bootstrap_attempted``, a validity warning above 5%) and never aborts: with fewer than 2 usable
replicates the t-based interval is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis._common import FitError, check_positive
from analysis._threads import limit_threads
from analysis.forms import wls_loglog
from analysis.validity import THRESHOLDS, Checked, Thresholds, Validity, check_validity

__all__ = ["IsoFLOPResult", "fit_isoflop", "isoflop_vertices"]


@dataclass
class IsoFLOPResult(Checked):
    """IsoFLOP (approach 2) result.

    Attributes
    ----------
    vertices : pandas.DataFrame
        One row per budget: ``C, n_runs, log_opt`` (vertex in log of the size variable), ``opt``
        (``N_opt`` or ``D_opt``), ``L_min`` (parabola minimum), ``curvature`` and the parabola
        coefficients ``p2, p1, p0`` (in natural-log units).
    exponent, coef : float
        ``opt = coef * C**exponent`` (least squares in log-log space).
    exponent_ci : tuple
        ``level`` interval of the exponent (bootstrap percentile when bootstrapped, else t-based).
    level : float
        Level of ``exponent_ci``.
    bootstrap_failed, bootstrap_attempted : int
        Bootstrap replicates dropped because a budget's parabola had no minimum, of those attempted.
    dropped_budgets : list of dict
        ``C`` and ``reason`` of each budget left out (``drop_bad_budgets=True``).
    valid, warnings : bool, list of str
        Whether ``opt = coef * C**exponent`` is a law, and why not (:meth:`check`).
    """

    variable: str
    vertices: pd.DataFrame
    exponent: float
    coef: float
    exponent_se: float
    exponent_ci: tuple
    bootstrap: pd.DataFrame | None = None
    level: float = 0.95
    bootstrap_failed: int = 0
    bootstrap_attempted: int = 0
    dropped_budgets: list = field(default_factory=list)
    interval_method: str = "t"

    def predict_opt(self, C) -> np.ndarray:
        return self.coef * np.asarray(C, dtype=np.float64) ** self.exponent

    def check(self, thresholds: Thresholds = THRESHOLDS) -> Validity:
        """Is ``opt ~ C**a`` a law? ``0 < a < 1`` (both N_opt and D_opt = C / (6 N_opt) grow with C),
        its interval excluding 0, its SE below it, enough budgets, every vertex inside the sizes
        sampled at its budget, few failed bootstrap replicates (see :mod:`analysis.validity`)."""
        name = f"a in {self.variable}_opt ~ C^a"
        v = self.vertices
        optima = [(f"budget C={r.C:.3g}: {self.variable}_opt", r.opt, r.size_min, r.size_max)
                  for r in v.itertuples()] if "size_min" in v.columns else []
        n_boot = self.bootstrap_attempted or (0 if self.bootstrap is None else len(self.bootstrap) + self.bootstrap_failed)
        return check_validity(exponents={name: self.exponent}, exponent_range={name: (0.0, 1.0)},
                              exponent_of={name: "N_opt and D_opt = C / (6 N_opt) must both grow with C"},
                              intervals={name: self.exponent_ci}, level=self.level,
                              se={name: (self.exponent, self.exponent_se)},
                              distinct={"IsoFLOP budgets": (len(v), thresholds.min_budgets_isoflop)},
                              bootstrap=(self.bootstrap_failed, n_boot) if n_boot else None, optima=optima,
                              thresholds=thresholds)

    def to_dict(self) -> dict:
        return dict(variable=self.variable, exponent=self.exponent, coef=self.coef, exponent_se=self.exponent_se,
                    exponent_ci=list(self.exponent_ci), level=self.level, interval_method=self.interval_method,
                    vertices=self.vertices.to_dict(orient="records"),
                    n_bootstrap=0 if self.bootstrap is None else len(self.bootstrap),
                    n_bootstrap_failed=self.bootstrap_failed, bootstrap_attempted=self.bootstrap_attempted,
                    bootstrap_failed_fraction=(self.bootstrap_failed / self.bootstrap_attempted
                                               if self.bootstrap_attempted else 0.0),
                    dropped_budgets=list(self.dropped_budgets), **self.check().to_dict())


def _vertex(c, s_raw, l, variable):
    s = np.log(s_raw)
    if len(np.unique(s)) < 3:
        raise FitError(f"IsoFLOP budget C={c:.4g}: needs at least 3 distinct {variable} values for a "
                       f"parabola, got {len(np.unique(s))}")
    p2, p1, p0 = np.polyfit(s, l, 2)
    if not p2 > 0:
        raise FitError(f"IsoFLOP budget C={c:.4g}: the parabola of loss in log {variable} opens downward "
                       f"(curvature {p2:.3g}); the budget's runs do not bracket a minimum")
    v = -p1 / (2 * p2)
    return dict(C=c, n_runs=int(len(l)), log_opt=v, opt=np.exp(v), L_min=p0 - p1 * p1 / (4 * p2),
                curvature=p2, p2=p2, p1=p1, p0=p0, inside=bool(s.min() <= v <= s.max()),
                size_min=float(s_raw.min()), size_max=float(s_raw.max()))


def isoflop_vertices(C, S, L, variable, *, drop_bad: bool = False):
    """Parabola vertex per budget; with ``drop_bad`` a bad budget is left out and named.

    Returns
    -------
    (pandas.DataFrame, list of dict)
        Vertices, and the dropped budgets (``C``, ``reason``).
    """
    rows, dropped = [], []
    for c in np.unique(C):
        m = C == c
        try:
            rows.append(_vertex(c, S[m], L[m], variable))
        except FitError as exc:
            if not drop_bad:
                raise
            dropped.append(dict(C=float(c), reason=str(exc)))
    return pd.DataFrame(rows), dropped


def fit_isoflop(C, size, L, *, variable: str = "N", weighted: bool = False, n_boot: int = 0, seed: int = 0,
                level: float = 0.95, drop_bad_budgets: bool = False, threads: int | None = 1) -> IsoFLOPResult:
    """Chinchilla approach 2: per budget a parabola of loss in ``log size``, then ``opt = k C**a``.

    Parameters
    ----------
    C : array-like
        Compute budget per run (runs of one IsoFLOP profile share the same value).
    size : array-like
        ``N`` (or ``D``) per run.
    L : array-like
        Final loss per run.
    variable : str
        Name of the size variable (for messages and output).
    weighted : bool
        Weight the log-log regression by the number of runs per budget.
    n_boot : int
        Bootstrap replicates (runs resampled within each budget) for the exponent interval; 0 uses
        the t-based interval of the regression. Replicates where a budget has no minimum are
        dropped and counted (``bootstrap_failed`` of ``bootstrap_attempted``); never raises.
    drop_bad_budgets : bool
        Leave out budgets with fewer than 3 sizes or a parabola opening downward (named in
        ``dropped_budgets``) instead of raising.
    threads : int or None
        BLAS threads during the bootstrap (default 1).

    Raises
    ------
    FitError
        Missing or non-positive values, fewer than 3 budgets (after dropping), a budget with fewer
        than 3 sizes or a parabola without a minimum (unless ``drop_bad_budgets``).
    """
    from scipy import stats

    C = check_positive("C (compute budget)", C)
    S = check_positive(variable, size)
    L = check_positive("L (loss)", L)
    if not (len(C) == len(S) == len(L)):
        raise FitError(f"C, {variable} and L must have the same length, got {len(C)}, {len(S)}, {len(L)}")
    nb = len(np.unique(C))
    if nb < 3:
        raise FitError(f"approach 2 needs at least 3 compute budgets (IsoFLOP profiles), got {nb}")
    vert, dropped = isoflop_vertices(C, S, L, variable, drop_bad=drop_bad_budgets)
    if len(vert) < 3:
        raise FitError(f"approach 2 needs at least 3 compute budgets with a minimum, got {len(vert)} after "
                       f"dropping {len(dropped)}: " + "; ".join(d["reason"] for d in dropped))
    w = vert["n_runs"].to_numpy(float) if weighted else None
    slope, icpt = wls_loglog(vert["C"].to_numpy(), vert["opt"].to_numpy(), w)
    x = np.log(vert["C"].to_numpy()); y = np.log(vert["opt"].to_numpy())
    resid = y - (slope * x + icpt)
    dof = len(x) - 2
    se = float(np.sqrt(np.sum(resid ** 2) / dof / np.sum((x - x.mean()) ** 2))) if dof > 0 else float("nan")
    tq = stats.t.ppf(0.5 + level / 2, dof) if dof > 0 else float("nan")
    ci = (slope - tq * se, slope + tq * se)
    boot, method, failed = None, "t", 0
    if n_boot:
        rng = np.random.default_rng(seed)
        groups = [np.nonzero(C == c)[0] for c in vert["C"]]
        rows = []
        with limit_threads(threads):
            for _ in range(n_boot):
                idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
                try:
                    v, _ = isoflop_vertices(C[idx], S[idx], L[idx], variable)
                except FitError:
                    continue
                sl, ic = wls_loglog(v["C"].to_numpy(), v["opt"].to_numpy(),
                                    v["n_runs"].to_numpy(float) if weighted else None)
                rows.append(dict(exponent=sl, log_coef=ic))
        failed = n_boot - len(rows)
        if len(rows) >= 2:
            boot = pd.DataFrame(rows)
            q = (1 - level) / 2
            se = float(boot["exponent"].std(ddof=1))
            ci = (float(boot["exponent"].quantile(q)), float(boot["exponent"].quantile(1 - q)))
            method = "bootstrap"
    return IsoFLOPResult(variable, vert, float(slope), float(np.exp(icpt)), se, tuple(map(float, ci)), boot,
                         level=level, bootstrap_failed=failed, bootstrap_attempted=int(n_boot),
                         dropped_budgets=dropped, interval_method=method)
