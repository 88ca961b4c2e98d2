"""Bootstrap of any fit (:class:`analysis.fitter.FitResult`) of any registered form.

Runs are resampled with replacement (seeded); each replicate is a weighted refit (weights =
multiplicities) warm-started from the full-data optimum, all replicates batched in one L-BFGS and
each confirmed by SciPy L-BFGS-B (closed-form forms are solved per replicate directly). BLAS
threads are pinned while it runs (:func:`analysis._threads.limit_threads`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from analysis._common import FitError
from analysis._lbfgs import batched_lbfgs
from analysis._threads import limit_threads
from analysis.fitter import SCIPY_OPTIONS, FitResult, named_params
from analysis.objective import Objective

__all__ = ["bootstrap_fit", "resample_weights"]


def resample_weights(n: int, n_boot: int, rng: np.random.Generator, groups=None) -> np.ndarray:
    """Multiplicities ``(n_boot, n)`` of a bootstrap over rows (or whole ``groups``)."""
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    codes, uniq = pd.factorize(pd.Series(np.asarray(groups)))
    if len(codes) != n:
        raise ValueError(f"groups has {len(codes)} entries, the fit has {n} points")
    G = len(uniq)
    Wg = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
    return Wg[:, codes]


def bootstrap_fit(fit: FitResult, n_boot: int = 1000, *, seed: int = 0, groups=None, polish: bool = True,
                  progress: bool = False, threads: int | None = 1) -> FitResult:
    """Bootstrap a fit: resample runs with replacement and refit, warm-started from the optimum.

    Parameters
    ----------
    fit : FitResult
        A result of :func:`analysis.fitter.fit_form` (or ``fit_chinchilla``, ``fit_power_law``).
    n_boot : int
        Number of replicates.
    seed : int
        Seed of the resampling (same seed, same replicates).
    groups : array-like, optional
        Resample whole groups (e.g. run ids when a run contributes several rows) instead of rows.
    polish : bool
        Confirm each replicate with SciPy L-BFGS-B after the batched refit.
    threads : int or None
        BLAS/OpenMP threads while refitting (default 1: no oversubscription on a loaded machine).

    Returns
    -------
    FitResult
        ``fit`` with ``bootstrap`` set (one row per replicate with finite parameters) and
        ``extra["bootstrap_attempted"]``, ``extra["bootstrap_failed"]`` (replicates with non-finite
        parameters, dropped, or stopped without meeting a convergence criterion, kept): more than
        :attr:`~analysis.validity.Thresholds.max_bootstrap_failed` failed makes the fit not valid.

    Raises
    ------
    FitError
        When fewer than half of the replicates have finite parameters.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot={n_boot}: needs at least 2 replicates")
    form = fit.form
    rng = np.random.default_rng(seed)
    data = fit.extra["_data"]
    n = len(data[form.target])
    W = resample_weights(n, n_boot, rng, groups)
    ob = fit.extra.get("_objective") or Objective.of(fit.fit_objective if fit.fit_objective != "wls-log" else None,
                                                      delta=fit.delta, reduction=fit.reduction)
    with limit_threads(threads):
        if form.closed_form:
            X = form.solve(data, W)
            F = np.zeros(n_boot)
            conv = np.ones(n_boot, bool)
        else:
            bobj = fit.extra["_obj"].with_weights(W)
            x0 = np.repeat(fit.theta[None, :], n_boot, axis=0)
            X, F, _, conv = batched_lbfgs(bobj, x0)
            if polish:
                it = range(n_boot)
                if progress:
                    from tqdm.auto import tqdm
                    it = tqdm(it, desc="bootstrap polish", leave=False)
                for i in it:
                    res = minimize(bobj.scipy_fun(i), X[i], jac=True, method="L-BFGS-B", options=SCIPY_OPTIONS)
                    conv[i] |= bool(res.success)
                    if res.fun <= F[i]:
                        X[i], F[i] = res.x, res.fun
    ok = np.all(np.isfinite(X), axis=1) & np.isfinite(F)
    # a replicate fails when its parameters are not finite (dropped) or neither the batched run nor the
    # SciPy polish stopped on its own criteria (kept, counted); many failures mark the fit not valid
    fit.extra["bootstrap_attempted"] = int(n_boot)
    fit.extra["bootstrap_failed"] = int((~ok | ~conv).sum())
    if ok.sum() < max(2, n_boot // 2):
        raise FitError(f"bootstrap: {int((~ok).sum())} of {n_boot} refits gave non-finite parameters; "
                       "too few are left for intervals")
    named = named_params(form, ob, X[ok].T, fit.x_scale)
    df = pd.DataFrame({k: np.broadcast_to(np.asarray(v, dtype=np.float64), (int(ok.sum()),)) for k, v in named.items()})
    df["objective"] = F[ok]
    fit.bootstrap = df
    return fit
