"""Scaling-law fits: the public entry points (one module to import; the parts live in their own modules).

Layout
------
* :mod:`analysis.forms` -- the registry of fit forms (the only list): Chinchilla approach 3, the
  one-variable law, Gadre's shared exponent, Muennighoff's data-constrained law, Porian's weighted
  log-log power law.
* :mod:`analysis.objective` -- what is minimized: ``huber`` | ``lsq-log`` | ``lsq`` | ``huber-mle``.
* :mod:`analysis.fitter` -- :func:`fit_form` (any form, any objective, all grid starts) and :class:`FitResult`.
* :mod:`analysis.bootstrap` -- :func:`bootstrap_fit` (batched weighted refits, BLAS threads pinned).
* :mod:`analysis.isoflop` -- approach 2 (:func:`fit_isoflop`).
* here: the named wrappers (:func:`fit_chinchilla`, :func:`fit_power_law`, :func:`fit_muennighoff`,
  :func:`fit_loglog`), derived tables (:func:`compute_optimal`, :func:`overtraining`), the
  extrapolation check and the legacy one-R* :func:`fit_data_constrained`.

Conventions
-----------
* Approach 3 (Hoffmann et al. 2022, appendix D.2) fits ``L(N, D) = E + A / N**alpha + B / D**beta``
  in log space, ``log L_i ~ LSE(a - alpha log N_i, b - beta log D_i, e)`` with ``A = exp(a)``,
  ``B = exp(b)``, ``E = exp(e)``, minimizing the Huber loss (``delta = 1e-3``) of the log residuals
  summed over points, with L-BFGS-B started from every point of a grid (alpha, beta in 0..2 step 0.5;
  e in -1..1 step 0.5; a, b in 0..25 step 5: 4500 starts) and the best optimum kept.
* Bootstrap: runs are resampled with replacement (seeded); each replicate is a weighted refit
  (weights = multiplicities) warm-started from the full-data optimum. Intervals are percentile
  intervals; standard errors are the replicate standard deviations.

Errors (non-positive or missing values, too few points, no convergence) raise :class:`FitError`
(a ``ValueError``) whose message says which input or fit failed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from analysis._common import FitError, check_positive
from analysis.bootstrap import bootstrap_fit
from analysis.fitter import GRAD_TOL, SCIPY_OPTIONS, FitResult, fit_form, fit_lse, grid_points
from analysis.forms import (CHINCHILLA_GRID, FORMS, POWER_GRID, DataConstrainedForm, Form, get_form)
from analysis.isoflop import IsoFLOPResult, fit_isoflop
from analysis.objective import LogLSEObjective, Objective
from analysis.validity import THRESHOLDS, Thresholds, Validity, check_validity

__all__ = [
    "FitError", "CHINCHILLA_GRID", "POWER_GRID", "LogLSEObjective", "Objective", "FitResult", "FORMS", "check_positive",
    "fit_form", "fit_lse", "fit_power_law", "fit_chinchilla", "fit_muennighoff", "fit_loglog", "bootstrap_fit",
    "compute_optimal", "extrapolation_check", "extrapolation_validity", "overtraining", "fit_isoflop",
    "IsoFLOPResult", "pareto_frontier", "fit_data_constrained",
]

_grid_points = grid_points  # the benchmark's name


def fit_chinchilla(N, D, L, *, grid: Mapping[str, Sequence[float]] | None = None, delta: float | None = 1e-3,
                   reduction: str = "sum", method: str = "batched", scipy_options: Mapping | None = None,
                   progress: bool = False, objective: "str | Objective | None" = None,
                   shared_exponent: bool = False) -> FitResult:
    """Chinchilla approach 3: ``L = E + A / N**alpha + B / D**beta`` (see the module docstring).

    Parameters
    ----------
    N, D, L : array-like
        Parameters, training tokens and final loss per run (all > 0, no missing values).
    grid : dict, optional
        Starts per parameter (keys ``a, b, e, alpha, beta``); default :data:`CHINCHILLA_GRID` (4500 starts).
    delta : float or None
        Huber threshold (``None``: squared error of the log residual).
    reduction : {"sum", "mean"}
    method : {"batched", "scipy"}
        See :func:`analysis.fitter.fit_lse`.
    objective : {"huber", "lsq-log", "lsq", "huber-mle"}, optional
        Default ``huber`` (``lsq`` with ``shared_exponent``); see :mod:`analysis.objective`.
    shared_exponent : bool
        Gadre et al. 2024: one exponent ``eta`` for N and D (form ``chinchilla-shared``, 4 parameters,
        from 5 points).

    Returns
    -------
    FitResult

    Raises
    ------
    FitError
        On missing or non-positive values, fewer than 6 points (5 with ``shared_exponent``) or fewer
        than 2 distinct N or D, or a fit that did not converge.
    """
    form = get_form("chinchilla-shared" if shared_exponent else "chinchilla")
    n = np.size(L)
    if not (np.size(N) == np.size(D) == n):
        raise FitError(f"N, D and L must have the same length, got {np.size(N)}, {np.size(D)}, {n}")
    if n < form.min_points:
        k = len(form.param_names)
        raise FitError(f"approach 3 has {k} parameters and needs at least {form.min_points} points, got {n}")
    return fit_form(form, dict(N=N, D=D, L=L), objective=objective, delta=delta, reduction=reduction, grid=grid,
                    method=method, scipy_options=scipy_options, progress=progress, what="approach 3")


def fit_power_law(x, L, *, grid: Mapping[str, Sequence[float]] | None = None, delta: float | None = 1e-3,
                  reduction: str = "sum", method: str = "batched", scipy_options: Mapping | None = None,
                  objective: "str | Objective | None" = None) -> FitResult:
    """Saturating power law in one variable, ``L = E + A * x**(-alpha)`` (x = C, N or D).

    Fitted like approach 3 (log-space LSE, Huber loss, grid of L-BFGS-B starts); ``x`` is divided by
    its geometric mean internally so the default grid (:data:`POWER_GRID`) suits any unit.

    Raises
    ------
    FitError
        On missing or non-positive values, fewer than 4 points or 3 distinct x, or no convergence.
    """
    if np.size(x) != np.size(L):
        raise FitError(f"x and L must have the same length, got {np.size(x)} and {np.size(L)}")
    if np.size(L) < 4:
        x_ = np.asarray(x, dtype=float)
        raise FitError(f"the one-variable law has 3 parameters and needs at least 4 points with 3 distinct "
                       f"x values, got {np.size(L)} points and {len(np.unique(x_))} distinct x")
    return fit_form("power", dict(x=x, L=L), objective=objective, delta=delta, reduction=reduction, grid=grid,
                    method=method, scipy_options=scipy_options, what="power law")


def fit_muennighoff(N, D, U, L, *, base: Mapping[str, float], objective: "str | Objective | None" = None,
                    delta: float | None = 1e-3, grid: Mapping[str, Sequence[float]] | None = None) -> FitResult:
    """Muennighoff et al. 2023 data-constrained law with a frozen base: fits ``R_D*`` and ``R_N*``
    (:class:`analysis.forms.DataConstrainedForm`; params ``r_d_star``, ``r_n_star``).

    Parameters
    ----------
    N, D, U, L : array-like
        Parameters, tokens seen, unique tokens (``U <= D``) and loss per run.
    base : dict
        ``E, A, B, alpha, beta`` of the base law (a first-stage approach-3 fit on single-epoch runs,
        or the paper's), kept fixed.
    """
    return fit_form(DataConstrainedForm(base), dict(N=N, D=D, U=U, L=L), objective=objective, delta=delta, grid=grid)


def fit_loglog(x, y, weights=None) -> FitResult:
    """Porian et al. 2024: ``y = k x**a`` by weighted least squares of ``log y`` on ``log x``
    (weights e.g. ``1 / std**2`` of each optimum's bootstrap spread). ``FitResult.to_dict()`` has
    ``exponent``, ``exponent_se`` and ``exponent_ci`` (t-based; bootstrap percentile after
    :func:`bootstrap_fit`)."""
    return fit_form("loglog", dict(x=x, y=y, w=weights))


def _alpha_beta(p):
    """``alpha`` and ``beta`` of an approach-3 parameter set (a shared ``eta`` stands for both)."""
    if "alpha" in p:
        return p
    return {"A": p["A"], "B": p["B"], "E": p["E"], "alpha": p["eta"], "beta": p["eta"]}


def compute_optimal(fit: FitResult, C, *, flops_per_param_token: float = 6.0, level: float = 0.95
                    ) -> pd.DataFrame:
    """Compute-optimal allocation from an approach-3 fit under ``C = k N D`` (k = 6 by default).

    ``N_opt = G (C/k)**(beta/(alpha+beta))``, ``D_opt = (C/k)**(alpha/(alpha+beta)) / G`` with
    ``G = (alpha A / (beta B))**(1/(alpha+beta))``. With bootstrap replicates, percentile intervals
    (``*_lo``, ``*_hi``) are added for ``N_opt``, ``D_opt`` and ``tokens_per_param``.

    Returns
    -------
    pandas.DataFrame
        One row per budget ``C``: ``C, N_opt, D_opt, tokens_per_param, L_opt`` (+ intervals).
    """
    if tuple(fit.form.variables) != ("N", "D"):
        raise FitError(f"compute_optimal needs an approach-3 fit of N and D (chinchilla or chinchilla-shared), "
                       f"got {fit.kind!r}")
    C = check_positive("C (compute budget)", np.atleast_1d(C))

    def alloc(A, B, alpha, beta, E):
        A, B, alpha, beta, E = (np.asarray(v, dtype=np.float64)[..., None] for v in (A, B, alpha, beta, E))
        with np.errstate(all="ignore"):
            G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
            Nopt = G * (C / flops_per_param_token) ** (beta / (alpha + beta))
            Dopt = (C / flops_per_param_token) ** (alpha / (alpha + beta)) / G
            Lopt = E + A / Nopt ** alpha + B / Dopt ** beta
        return Nopt, Dopt, Lopt

    p = _alpha_beta(fit.params)
    if p["alpha"] <= 0 or p["beta"] <= 0:
        raise FitError(f"compute-optimal allocation needs alpha > 0 and beta > 0, got alpha={p['alpha']:.4g}, "
                       f"beta={p['beta']:.4g}")
    Nopt, Dopt, Lopt = alloc(p["A"], p["B"], p["alpha"], p["beta"], p["E"])
    out = pd.DataFrame(dict(C=C, N_opt=Nopt, D_opt=Dopt, tokens_per_param=Dopt / Nopt, L_opt=Lopt))
    if fit.bootstrap is not None:
        b = _alpha_beta(fit.bootstrap)
        Nb, Db, _ = alloc(b["A"], b["B"], b["alpha"], b["beta"], b["E"])
        q = (1 - level) / 2
        for name, arr in (("N_opt", Nb), ("D_opt", Db), ("tokens_per_param", Db / Nb)):
            arr = np.where(np.isfinite(arr), arr, np.nan)
            out[f"{name}_lo"] = np.nanquantile(arr, q, axis=0)
            out[f"{name}_hi"] = np.nanquantile(arr, 1 - q, axis=0)
            out[f"{name}_se"] = np.nanstd(arr, axis=0, ddof=1)
    return out


def overtraining(fit: FitResult, C, tokens_per_param, *, flops_per_param_token: float = 6.0) -> pd.DataFrame:
    """Loss of an approach-3 fit at budget ``C`` when trained with ``M`` tokens per parameter.

    With ``C = k N D`` and ``D = M N``: ``N = sqrt(C / (k M))``, ``D = M N``. Comparing with
    :func:`compute_optimal` shows the loss paid for over- (or under-) training at a fixed budget.

    Returns
    -------
    pandas.DataFrame
        One row per (C, M): ``C, tokens_per_param, N, D, L``.
    """
    if tuple(fit.form.variables) != ("N", "D"):
        raise FitError(f"overtraining needs an approach-3 fit of N and D, got {fit.kind!r}")
    C = check_positive("C (compute budget)", np.atleast_1d(C))
    M = check_positive("tokens_per_param", np.atleast_1d(tokens_per_param))
    CC, MM = np.meshgrid(C, M, indexing="ij")
    N = np.sqrt(CC / (flops_per_param_token * MM))
    D = MM * N
    return pd.DataFrame(dict(C=CC.ravel(), tokens_per_param=MM.ravel(), N=N.ravel(), D=D.ravel(),
                             L=fit.predict(N.ravel(), D.ravel())))


def extrapolation_check(kind: "str | Form", data: Mapping[str, np.ndarray], *, n_holdout: int = 1,
                        compute=None, flops_per_param_token: float = 6.0, **fit_kwargs) -> dict:
    """Fit on all but the largest compute budgets; report the error on the held-out largest runs.

    Parameters
    ----------
    kind : str or Form
        A registered form (:data:`analysis.forms.FORMS`: ``"chinchilla"``, ``"power"``, ...) or an instance.
    data : dict
        The form's variables and target: ``N, D, L`` (chinchilla) or ``x, L`` (power), ...
    n_holdout : int
        Number of largest distinct budgets held out (all rows at those budgets).
    compute : array-like, optional
        Budget per row; default the form's (``k N D`` for chinchilla, ``x`` for power).
    **fit_kwargs
        Passed to :func:`analysis.fitter.fit_form` (``grid``, ``objective``, ``delta``, ...).

    Returns
    -------
    dict
        ``n_train, n_holdout, predicted, actual, rel_error`` (per held-out row),
        ``mean_abs_rel_error``, the fit on the reduced data (``params``) and ``valid``/``warnings``
        (:func:`extrapolation_validity`).
    """
    form = get_form(kind)
    L = np.asarray(data[form.target], dtype=np.float64)
    if compute is None:
        compute = form.compute(data, flops_per_param_token)
    compute = np.asarray(compute, dtype=np.float64)
    budgets = np.unique(compute)
    if n_holdout < 1 or len(budgets) <= n_holdout:
        raise FitError(f"extrapolation check: {len(budgets)} distinct budgets cannot hold out {n_holdout}")
    hold = compute >= budgets[-n_holdout]
    tr = ~hold
    cols = {k: np.asarray(v) for k, v in data.items() if v is not None}
    f = fit_form(form, {k: v[tr] for k, v in cols.items()}, **fit_kwargs)
    pred = f.predict(*[cols[v][hold] for v in form.variables])
    rel = (pred - L[hold]) / L[hold]
    return dict(n_train=int(tr.sum()), n_holdout=int(hold.sum()), holdout_budgets=budgets[-n_holdout:].tolist(),
                predicted=pred.tolist(), actual=L[hold].tolist(), rel_error=rel.tolist(),
                mean_abs_rel_error=float(np.mean(np.abs(rel))),
                params={k: float(v) for k, v in f.params.items()}, **extrapolation_validity(rel, f).to_dict())


def extrapolation_validity(rel_error, fit: FitResult | None = None, thresholds: Thresholds = THRESHOLDS) -> Validity:
    """Validity of an extrapolation: every held-out relative error within
    ``thresholds.max_extrapolation_error``, and the fit on the smaller budgets itself a law (its
    warnings are prefixed ``"fit on the smaller budgets: "``)."""
    w = check_validity(extrapolation=rel_error, thresholds=thresholds).warnings
    if fit is not None:
        w = w + [f"fit on the smaller budgets: {x}" for x in fit.check(thresholds=thresholds).warnings]
    return Validity(w)


def pareto_frontier(x, L) -> np.ndarray:
    """Indices of the lower envelope: points whose loss is below that of every point with smaller x."""
    x = np.asarray(x, dtype=np.float64); L = np.asarray(L, dtype=np.float64)
    order = np.lexsort((L, x))
    keep, best = [], np.inf
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return np.array(keep, dtype=np.int64)


# ---------------------------------------------------------------------------------------- data-constrained
def fit_data_constrained(N, D, U, L, *, base: FitResult | None = None, R_star_grid=(1.0, 5.0, 15.0, 50.0),
                         delta: float | None = 1e-3) -> dict:
    """Data-constrained law, one-R* variant with the base refitted jointly (kept for compatibility; the
    paper's form with R_D*, R_N* and a frozen base is :func:`fit_muennighoff`).

    ``L = E + A / N**alpha + B / D_eff**beta`` with ``D_eff = U + U R* (1 - exp(-R / R*))`` where
    ``U`` is the number of unique tokens and ``R = D / U - 1`` the number of repetitions. ``E, A, B,
    alpha, beta`` start from an approach-3 fit (``base``, or one fitted on the single-epoch runs);
    ``R*`` (the repetition half-life) is fitted jointly with them (L-BFGS-B on the same log-space
    Huber objective, best over ``R_star_grid``).

    Returns
    -------
    dict
        ``params`` (``E, A, B, alpha, beta, R_star``), ``objective``, ``converged``, ``valid`` and
        ``warnings`` (exponents > 0, ``E`` away from its bounds, >= 3 distinct N and U).
    """
    N = check_positive("N (parameters)", N); D = check_positive("D (tokens)", D)
    U = check_positive("U (unique tokens)", U); L = check_positive("L (loss)", L)
    if np.any(U > D * (1 + 1e-12)):
        raise FitError("U (unique tokens) must not exceed D (tokens seen)")
    if base is None:
        single = D <= U * (1 + 1e-9)
        if single.sum() < 6:
            raise FitError(f"data-constrained fit needs a base fit or at least 6 single-epoch runs, got {single.sum()}")
        base = fit_chinchilla(N[single], D[single], L[single], delta=delta)
    R = D / U - 1.0
    logN, logU, logL = np.log(N), np.log(U), np.log(L)

    def fun(z):
        a, b, al, be, e, lr = z
        Rs = np.exp(lr)
        ex = np.exp(-R / Rs)
        deff_over_u = 1.0 + Rs * (1.0 - ex)
        logDe = logU + np.log(deff_over_u)
        T = np.stack([a - al * logN, b - be * logDe, np.full_like(logN, e)], axis=1)
        mx = T.max(axis=1, keepdims=True)
        P = np.exp(T - mx); s = P.sum(axis=1, keepdims=True); P /= s
        r = (mx + np.log(s))[:, 0] - logL
        if delta is None:
            h, dh = 0.5 * r * r, r
        else:
            h = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)); dh = np.clip(r, -delta, delta)
        dlogDe_dlr = (Rs * (1 - ex) - R * ex) / deff_over_u  # d logDe / d log R*
        g = np.array([np.sum(dh * P[:, 0]), np.sum(dh * P[:, 1]), -np.sum(dh * P[:, 0] * logN),
                      -np.sum(dh * P[:, 1] * logDe), np.sum(dh * P[:, 2]),
                      np.sum(dh * P[:, 1] * (-be) * dlogDe_dlr)])
        return float(h.sum()), g

    best = None
    for rs in R_star_grid:
        z0 = np.r_[base.theta, np.log(rs)]
        res = minimize(fun, z0, jac=True, method="L-BFGS-B", options=SCIPY_OPTIONS)
        if best is None or res.fun < best.fun:
            best = res
    a, b, al, be, e, lr = best.x
    if not np.all(np.isfinite(best.x)):
        raise FitError("data-constrained fit did not converge (non-finite parameters)")
    validity = check_validity(exponents=dict(alpha=al, beta=be), exponent_of=dict(alpha="N", beta="D_eff"), asymptote=("E", float(np.exp(e)), float(L.min())),
                              distinct={"sizes N": (len(np.unique(N)), THRESHOLDS.min_distinct_chinchilla),
                                        "unique-token counts U": (len(np.unique(U)), THRESHOLDS.min_distinct_chinchilla)})
    return dict(params=dict(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(al),
                            beta=float(be), R_star=float(np.exp(lr))),
                objective=float(best.fun), converged=bool(best.success), message=str(best.message),
                **validity.to_dict())
