"""Scaling-law fits: one-variable saturating power law, Chinchilla approach 3 and approach 2.

Conventions
-----------
* Approach 3 (Hoffmann et al. 2022, appendix D.2) fits ``L(N, D) = E + A / N**alpha + B / D**beta``
  in log space, ``log L_i ~ LSE(a - alpha log N_i, b - beta log D_i, e)`` with ``A = exp(a)``,
  ``B = exp(b)``, ``E = exp(e)``, minimizing the Huber loss (``delta = 1e-3``) of the log residuals
  summed over points, with L-BFGS-B started from every point of a grid (alpha, beta in 0..2 step 0.5;
  e in -1..1 step 0.5; a, b in 0..25 step 5: 4500 starts) and the best optimum kept.
* Every start of the grid is optimized (never pruned): a batched L-BFGS in NumPy with analytic
  gradients runs all starts at once, then SciPy's L-BFGS-B polishes the best ones, so the result is
  the grid's best optimum under the reference algorithm (``method="scipy"`` runs the plain
  per-start SciPy loop, the slow reference).
* Bootstrap: runs are resampled with replacement (seeded); each replicate is a weighted refit
  (weights = multiplicities) warm-started from the full-data optimum. Intervals are percentile
  intervals; standard errors are the replicate standard deviations.

Errors (non-positive or missing values, too few points, no convergence) raise :class:`FitError`
(a ``ValueError``) whose message says which input or fit failed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from analysis._lbfgs import batched_lbfgs
from analysis.validity import THRESHOLDS, Thresholds, Validity, check_validity

__all__ = [
    "FitError", "CHINCHILLA_GRID", "POWER_GRID", "LogLSEObjective", "FitResult", "check_positive",
    "fit_lse", "fit_power_law", "fit_chinchilla", "bootstrap_fit", "compute_optimal",
    "extrapolation_check", "extrapolation_validity", "overtraining", "fit_isoflop", "IsoFLOPResult", "pareto_frontier", "fit_data_constrained",
]


class FitError(ValueError):
    """A fit could not be done or did not converge; the message says which input or step failed."""


#: The Chinchilla approach-3 grid of starts (6 * 6 * 5 * 5 * 5 = 4500 points).
CHINCHILLA_GRID: dict[str, np.ndarray] = {
    "a": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "b": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
    "beta": np.arange(0.0, 2.0 + 1e-9, 0.5),
}
#: Grid of starts for the one-variable law (x is rescaled by its geometric mean before fitting).
POWER_GRID: dict[str, np.ndarray] = {
    "a": np.arange(-5.0, 5.0 + 1e-9, 2.5),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
}


def check_positive(name: str, values) -> np.ndarray:
    """Return ``values`` as float64, raising :class:`FitError` if any is missing, infinite or <= 0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise FitError(f"{name}: expected a 1-D array of values, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise FitError(f"{name}: {int(bad.sum())} missing or non-finite value(s) at positions "
                       f"{np.nonzero(bad)[0][:5].tolist()}; drop or fill them before fitting")
    bad = arr <= 0
    if bad.any():
        raise FitError(f"{name}: {int(bad.sum())} non-positive value(s) (e.g. {arr[bad][0]!r} at position "
                       f"{int(np.nonzero(bad)[0][0])}); power-law fits need values > 0")
    return arr


class LogLSEObjective:
    """Huber loss of ``LSE(a_k - alpha_k log X_k, e) - log y`` over points, batched over parameter sets.

    Parameters are ordered ``[a_1..a_K, alpha_1..alpha_K, e]`` (for Chinchilla: ``a, b, alpha, beta, e``).

    Parameters
    ----------
    logX : ndarray (n, K)
        Log of the K variables (N, D, or C).
    logy : ndarray (n,)
        Log of the loss.
    delta : float or None
        Huber threshold on the log residual; ``None`` gives the squared error ``r**2 / 2``.
    reduction : {"sum", "mean"}
        Sum over points (Chinchilla) or the (weighted) mean.
    weights : ndarray (n,) or (S, n), optional
        Per-point multiplicities; a 2-D array gives one weight vector per batch row (bootstrap).
    """

    def __init__(self, logX, logy, *, delta: float | None = 1e-3, reduction: str = "sum", weights=None):
        self.logX = np.asarray(logX, dtype=np.float64)
        if self.logX.ndim == 1:
            self.logX = self.logX[:, None]
        self.logy = np.asarray(logy, dtype=np.float64)
        self.n, self.K = self.logX.shape
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction={reduction!r}: allowed values are 'sum' and 'mean'")
        if delta is not None and not delta > 0:
            raise ValueError(f"delta={delta!r}: must be a positive float or None (squared error)")
        self.delta, self.reduction = delta, reduction
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)

    @property
    def n_params(self) -> int:
        return 2 * self.K + 1

    def _w(self, rows):
        if self.weights is None:
            return None
        if self.weights.ndim == 1:
            return self.weights[None, :]
        return self.weights[rows]

    def _terms(self, th: np.ndarray):
        """Exponentiated LSE terms, their sum ``s`` and the log residual ``r``.

        Fast path without the max shift (exp(e) is then one value per row); rows whose sum leaves
        ``[e^-600, e^600]`` (where precision could be lost) send the block to the shifted path.
        """
        K = self.K
        ex = []
        for k in range(K):
            t = np.multiply(th[:, K + k, None], self.logX[None, :, k])
            np.subtract(th[:, k, None], t, out=t)
            np.exp(t, out=t)
            ex.append(t)
        ee = np.exp(th[:, 2 * K, None])
        s = ex[0] + ee
        for t in ex[1:]:
            s += t
        with np.errstate(divide="ignore"):  # an underflowed sum (log 0) takes the shifted path below
            r = np.log(s)
        if np.abs(r).max(initial=0.0) < 600.0:
            r -= self.logy[None, :]
            return ex, ee, s, r
        return self._terms_shifted(th)

    def _terms_shifted(self, th: np.ndarray):
        """Exponentiated LSE terms (shifted by their max), their sum and the log residual."""
        K = self.K
        T = [th[:, k, None] - th[:, K + k, None] * self.logX[None, :, k] for k in range(K)]
        e = th[:, 2 * K, None]
        mx = np.maximum(T[0], e)
        for t in T[1:]:
            np.maximum(mx, t, out=mx)
        ex = []
        for t in T:
            np.subtract(t, mx, out=t)
            np.exp(t, out=t)
            ex.append(t)
        ee = np.exp(e - mx)
        s = ee.copy()
        for t in ex:
            s += t
        r = np.log(s)
        r += mx
        r -= self.logy[None, :]
        return ex, ee, s, r

    def residuals(self, theta_SP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log residuals ``r_Sn`` and the softmax weights ``p_SnK1`` of the LSE terms."""
        th = np.atleast_2d(np.asarray(theta_SP, dtype=np.float64))
        ex, ee, s, r = self._terms(th)
        return r, np.stack([t / s for t in ex] + [ee / s], axis=2)

    #: Problems evaluated per block: keeps the (block, n) temporaries in cache (the evaluation is
    #: memory-bound otherwise).
    block_elems: int = 32768

    def __call__(self, theta_SP: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Objective values ``f_S`` and gradients ``g_SP`` for a batch of parameter vectors."""
        th = np.atleast_2d(np.asarray(theta_SP, dtype=np.float64))
        S = th.shape[0]
        rows = None if rows is None else np.asarray(rows)
        f = np.empty(S); g = np.empty_like(th)
        bs = max(1, self.block_elems // max(self.n, 1))
        with np.errstate(over="ignore", invalid="ignore"):  # far-off starts overflow to inf: rejected by the search
            for i in range(0, S, bs):
                sl = slice(i, min(S, i + bs))
                f[sl], g[sl] = self._value_grad(th[sl], None if rows is None else rows[sl])
        return f, g

    def _value_grad(self, th, rows):
        ex, ee, s, r = self._terms(th)
        if self.delta is None:
            c = r
            f = 0.5 * np.einsum("sn,sn->s", r, r) if self.weights is None else None
        else:
            # Huber: with c = clip(r, -delta, delta), h(r) = c * (r - c / 2) and h'(r) = c
            c = np.clip(r, -self.delta, self.delta)
            f = (np.einsum("sn,sn->s", c, r) - 0.5 * np.einsum("sn,sn->s", c, c)) if self.weights is None else None
        w = self._w(rows)
        if w is not None:
            h = c * (r - 0.5 * c) if self.delta is not None else 0.5 * r * r
            f = np.einsum("sn,sn->s", h, np.broadcast_to(w, h.shape))
            c = c * w
        elif c is r:
            c = r.copy()
        if self.reduction == "mean":
            tot = (np.broadcast_to(w, r.shape).sum(axis=1) if w is not None else np.full(th.shape[0], float(self.n)))
            f = f / tot
            c /= tot[:, None]
        c /= s  # d f / d T_k = h'(r) * exp(T_k - max) / sum_j exp(T_j - max)
        K = self.K
        g = np.empty_like(th)
        for k, t in enumerate(ex):
            t *= c
            g[:, k] = t.sum(axis=1)
            g[:, K + k] = -(t @ self.logX[:, k])
        g[:, 2 * K] = ee[:, 0] * c.sum(axis=1) if ee.shape[1] == 1 else np.einsum("sn,sn->s", ee, c)
        return f, g

    def value(self, theta_P: np.ndarray) -> float:
        """Objective at one parameter vector (float)."""
        return float(self(np.asarray(theta_P)[None, :])[0][0])

    def scipy_fun(self, row: int | None = None):
        """``fun(theta) -> (f, grad)`` for :func:`scipy.optimize.minimize` with ``jac=True``."""
        rows = None if row is None else np.array([row])

        def fun(theta):
            f, g = self(np.asarray(theta)[None, :], rows)
            return float(f[0]), g[0].copy()
        return fun


def _grid_points(grid: Mapping[str, Sequence[float]], names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in grid]
    if missing:
        raise ValueError(f"grid is missing {missing}; it needs values for each of {list(names)}")
    axes = [np.asarray(grid[n], dtype=np.float64).ravel() for n in names]
    if any(ax.size == 0 for ax in axes):
        raise ValueError(f"grid: every axis of {list(names)} needs at least one value")
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


GRAD_TOL = 1e-7  # largest |gradient| component accepted as converged when L-BFGS-B stops abnormally
SCIPY_OPTIONS = {"maxiter": 15000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 10}


@dataclass
class FitResult:
    """Result of a log-space LSE fit.

    Attributes
    ----------
    kind : str
        ``"chinchilla"`` or ``"power"`` (or ``"data_constrained"``).
    theta : ndarray
        Raw parameters ``[a_1..a_K, alpha_1..alpha_K, e]``.
    params : dict
        Named parameters (``E, A, alpha`` [+ ``B, beta``] and the logs ``a, e`` [+ ``b``]).
    objective : float
        Objective at the optimum.
    n_points, n_starts : int
    starts_at_best : int
        Starts whose optimum is within ``1e-9`` (relative) of the best objective.
    converged : bool
        SciPy L-BFGS-B reported success on the polish of the best start.
    bootstrap : pandas.DataFrame or None
        One row per replicate (named parameters), after :func:`bootstrap_fit`.
    valid, warnings : bool, list of str
        Whether the result is a law, and why not (:meth:`check`, at the 95% level; the rules are
        those of :func:`analysis.validity.check_validity`).
    """

    kind: str
    theta: np.ndarray
    params: dict
    objective: float
    n_points: int
    n_starts: int
    starts_at_best: int
    converged: bool
    message: str
    names: tuple
    x_scale: float = 1.0
    delta: float | None = 1e-3
    reduction: str = "sum"
    bootstrap: pd.DataFrame | None = None
    extra: dict = field(default_factory=dict)

    def predict(self, *X) -> np.ndarray:
        """Predicted loss at the given variables (``N, D`` for Chinchilla, ``x`` for power)."""
        return _predict(self.kind, self.params, *X)

    def intervals(self, level: float = 0.95) -> pd.DataFrame:
        """Point estimate, bootstrap standard error and percentile interval per parameter."""
        if self.bootstrap is None:
            raise FitError("no bootstrap replicates: call bootstrap_fit(...) first")
        q = (1 - level) / 2
        rows = []
        for k, v in self.params.items():
            if k not in self.bootstrap.columns:
                continue
            col = self.bootstrap[k].to_numpy(dtype=np.float64)
            rows.append(dict(param=k, estimate=v, se=float(np.std(col, ddof=1)),
                             lo=float(np.quantile(col, q)), hi=float(np.quantile(col, 1 - q))))
        return pd.DataFrame(rows).set_index("param")

    def check(self, level: float = 0.95, thresholds: Thresholds = THRESHOLDS) -> Validity:
        """Is this fit a law? Exponents > 0 (and, when bootstrapped, their intervals excluding 0 and
        every SE below its estimate), ``E`` away from 0 and below the lowest loss, enough distinct
        sizes/tokens (or x), few failed bootstrap replicates (see :mod:`analysis.validity`)."""
        p = self.params
        data = self.extra.get("_data", {})
        L = data.get("L")
        names = ("E", "A", "B", "alpha", "beta") if self.kind == "chinchilla" else ("E", "A", "alpha")
        expo = ("alpha", "beta") if self.kind == "chinchilla" else ("alpha",)
        if self.kind == "chinchilla":
            distinct = {"sizes N": (len(np.unique(data["N"])), thresholds.min_distinct_chinchilla),
                        "token counts D": (len(np.unique(data["D"])), thresholds.min_distinct_chinchilla)} if data else {}
        else:
            distinct = {"x values": (len(np.unique(data["x"])), thresholds.min_distinct_power)} if data else {}
        intervals = se = boot = None
        if self.bootstrap is not None:
            iv = self.intervals(level)
            intervals = {k: (iv.loc[k, "lo"], iv.loc[k, "hi"]) for k in expo}
            se = {k: (p[k], iv.loc[k, "se"]) for k in names}
            boot = (int(self.extra.get("bootstrap_failed", 0)),
                    int(self.extra.get("bootstrap_attempted", len(self.bootstrap))))
        return check_validity(exponents={k: p[k] for k in expo}, exponent_of=dict(alpha="N", beta="D") if
                              self.kind == "chinchilla" else dict(alpha="x"), intervals=intervals, level=level, se=se,
                              asymptote=("E", p["E"], float(np.min(L))) if L is not None else None,
                              distinct=distinct, bootstrap=boot, thresholds=thresholds)

    @property
    def valid(self) -> bool:
        return self.check().valid

    @property
    def warnings(self) -> list[str]:
        return self.check().warnings

    def to_dict(self, level: float = 0.95) -> dict:
        """JSON-ready summary (parameters, objective, intervals when bootstrapped, ``valid`` and
        ``warnings`` from :meth:`check` at ``level``)."""
        out = dict(kind=self.kind, params={k: float(v) for k, v in self.params.items()},
                   objective=self.objective, n_points=self.n_points, n_starts=self.n_starts,
                   starts_at_best=self.starts_at_best, converged=self.converged, delta=self.delta,
                   reduction=self.reduction)
        if self.bootstrap is not None:
            iv = self.intervals(level)
            out["level"] = level
            out["n_bootstrap"] = int(len(self.bootstrap))
            out["intervals"] = {k: dict(se=r.se, lo=r.lo, hi=r.hi) for k, r in iv.iterrows()}
        out.update({k: v for k, v in self.extra.items() if not k.startswith("_")})
        out.update(self.check(level).to_dict())
        return out


def _predict(kind: str, params: Mapping[str, float], *X) -> np.ndarray:
    if kind == "chinchilla":
        N, D = (np.asarray(v, dtype=np.float64) for v in X)
        return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]
    if kind == "power":
        (x,) = X
        return params["E"] + params["A"] * np.asarray(x, dtype=np.float64) ** (-params["alpha"])
    raise ValueError(f"kind={kind!r}: allowed values are 'chinchilla' and 'power'")


def _named(kind: str, theta: np.ndarray, x_scale: float = 1.0) -> dict:
    if kind == "chinchilla":
        a, b, al, be, e = theta
        return dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=al, beta=be, a=a, b=b, e=e)
    a, al, e = theta
    a = a + al * np.log(x_scale)  # undo the rescaling x -> x / x_scale
    return dict(E=np.exp(e), A=np.exp(a), alpha=al, a=a, e=e)


def _named_batch(kind: str, theta_SP: np.ndarray, x_scale: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in _named(kind, theta_SP.T, x_scale).items()})


def fit_lse(obj: LogLSEObjective, starts_SP: np.ndarray, *, method: str = "batched", polish_top: int = 8,
            scipy_options: Mapping | None = None, progress: bool = False) -> dict:
    """Minimize ``obj`` from every start; return the best optimum.

    Parameters
    ----------
    obj : LogLSEObjective
    starts_SP : ndarray
        All starts (none is dropped).
    method : {"batched", "scipy"}
        ``"batched"``: vectorized L-BFGS over all starts, then SciPy L-BFGS-B polishes the
        ``polish_top`` best distinct optima. ``"scipy"``: the reference loop, SciPy L-BFGS-B with the
        analytic gradient from every start.
    scipy_options : dict, optional
        Options for SciPy L-BFGS-B (default :data:`SCIPY_OPTIONS`).

    Returns
    -------
    dict
        ``theta, objective, converged, message, f_starts`` (per-start optimum objective).
    """
    opts = dict(SCIPY_OPTIONS, **(scipy_options or {}))
    starts_SP = np.asarray(starts_SP, dtype=np.float64)
    fun = obj.scipy_fun()
    if method == "scipy":
        f_all = np.empty(len(starts_SP)); x_all = np.empty_like(starts_SP); ok = np.zeros(len(starts_SP), bool)
        msgs = []
        it = starts_SP
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(starts_SP, desc="L-BFGS-B starts", leave=False)
        for i, x0 in enumerate(it):
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", options=opts)
            f_all[i], x_all[i], ok[i] = res.fun, res.x, res.success
            msgs.append(str(res.message))
        f_all = np.where(np.isfinite(f_all), f_all, np.inf)
        best = int(np.argmin(f_all))
        gmax = float(np.max(np.abs(obj(x_all[best][None, :])[1][0])))
        return dict(theta=x_all[best], objective=float(f_all[best]), converged=bool(ok[best] or gmax <= GRAD_TOL),
                    message=msgs[best], f_starts=f_all, x_starts=x_all, grad_max=gmax)
    if method != "batched":
        raise ValueError(f"method={method!r}: allowed values are 'batched' and 'scipy'")
    x_all, f_all, n_it, conv = batched_lbfgs(obj, starts_SP)
    f_all = np.where(np.isfinite(f_all), f_all, np.inf)
    order = np.argsort(f_all, kind="stable")
    # polish the best few *distinct* optima with the reference algorithm
    chosen: list[int] = []
    for i in order:
        if not np.isfinite(f_all[i]):
            break
        if all(np.max(np.abs(x_all[i] - x_all[j])) > 1e-6 for j in chosen):
            chosen.append(int(i))
        if len(chosen) >= polish_top:
            break
    if not chosen:
        raise FitError("the objective is not finite at any start: check the data for overflow")
    best = None
    for i in chosen:
        res = minimize(fun, x_all[i], jac=True, method="L-BFGS-B", options=opts)
        if best is None or res.fun < best.fun:
            best = res
        f_all[i] = min(f_all[i], res.fun)
    gmax = float(np.max(np.abs(obj(best.x[None, :])[1][0])))
    # a polish that starts at an optimum can end in "ABNORMAL" (no further decrease possible): accept
    # it when the gradient vanishes
    return dict(theta=best.x, objective=float(best.fun), converged=bool(best.success or gmax <= GRAD_TOL),
                message=str(best.message), f_starts=f_all, x_starts=x_all, grad_max=gmax,
                starts_stopped=int(conv.sum()), starts_at_maxiter=int((~conv).sum()),
                best_objective_at_maxiter=float(np.min(f_all[~conv])) if (~conv).any() else None)


def _check_converged(res: dict, obj: LogLSEObjective, what: str) -> None:
    theta = res["theta"]
    if not np.all(np.isfinite(theta)) or not np.isfinite(res["objective"]):
        raise FitError(f"{what}: the fit did not converge (non-finite parameters {theta})")
    if not res["converged"]:
        g = obj(theta[None, :])[1][0]
        if np.max(np.abs(g)) > GRAD_TOL:
            raise FitError(f"{what}: L-BFGS-B did not converge ({res['message']}; "
                           f"max |gradient| {np.max(np.abs(g)):.3g} at objective {res['objective']:.6g})")


def fit_chinchilla(N, D, L, *, grid: Mapping[str, Sequence[float]] | None = None, delta: float | None = 1e-3,
                   reduction: str = "sum", method: str = "batched", scipy_options: Mapping | None = None,
                   progress: bool = False) -> FitResult:
    """Chinchilla approach 3: ``L = E + A / N**alpha + B / D**beta`` (see the module docstring).

    Parameters
    ----------
    N, D, L : array-like
        Parameters, training tokens and final loss per run (all > 0, no missing values).
    grid : dict, optional
        Starts per parameter (keys ``a, b, e, alpha, beta``); default :data:`CHINCHILLA_GRID` (4500 starts).
    delta : float or None
        Huber threshold (``None``: squared error).
    reduction : {"sum", "mean"}
    method : {"batched", "scipy"}
        See :func:`fit_lse`.

    Returns
    -------
    FitResult

    Raises
    ------
    FitError
        On missing or non-positive values, fewer than 6 points or fewer than 2 distinct N or D, or
        a fit that did not converge.
    """
    N = check_positive("N (parameters)", N)
    D = check_positive("D (tokens)", D)
    L = check_positive("L (loss)", L)
    if not (len(N) == len(D) == len(L)):
        raise FitError(f"N, D and L must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    if len(L) < 6:
        raise FitError(f"approach 3 has 5 parameters and needs at least 6 points, got {len(L)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise FitError(f"approach 3 needs at least 2 distinct N and 2 distinct D, got "
                       f"{len(np.unique(N))} and {len(np.unique(D))}")
    obj = LogLSEObjective(np.column_stack([np.log(N), np.log(D)]), np.log(L), delta=delta, reduction=reduction)
    g = dict(CHINCHILLA_GRID if grid is None else grid)
    # grid order a, b, e, alpha, beta (paper's listing) -> parameter order a, b, alpha, beta, e
    pts = _grid_points(g, ("a", "b", "alpha", "beta", "e"))
    res = fit_lse(obj, pts, method=method, scipy_options=scipy_options, progress=progress)
    _check_converged(res, obj, "approach 3")
    f_starts = res["f_starts"]
    at_best = int(np.sum(f_starts <= res["objective"] * (1 + 1e-9) + 1e-15))
    return FitResult("chinchilla", res["theta"], _named("chinchilla", res["theta"]), res["objective"], len(L),
                     len(pts), at_best, res["converged"], res["message"], ("a", "b", "alpha", "beta", "e"),
                     delta=delta, reduction=reduction,
                     extra=dict(_obj=obj, _data=dict(N=N, D=D, L=L), grad_max=res["grad_max"],
                                **{k: res[k] for k in ("starts_stopped", "starts_at_maxiter", "best_objective_at_maxiter")
                                   if k in res}))


def fit_power_law(x, L, *, grid: Mapping[str, Sequence[float]] | None = None, delta: float | None = 1e-3,
                  reduction: str = "sum", method: str = "batched", scipy_options: Mapping | None = None
                  ) -> FitResult:
    """Saturating power law in one variable, ``L = E + A * x**(-alpha)`` (x = C, N or D).

    Fitted like approach 3 (log-space LSE, Huber loss, grid of L-BFGS-B starts); ``x`` is divided by
    its geometric mean internally so the default grid (:data:`POWER_GRID`) suits any unit.

    Raises
    ------
    FitError
        On missing or non-positive values, fewer than 4 points or 3 distinct x, or no convergence.
    """
    x = check_positive("x", x)
    L = check_positive("L (loss)", L)
    if len(x) != len(L):
        raise FitError(f"x and L must have the same length, got {len(x)} and {len(L)}")
    if len(L) < 4 or len(np.unique(x)) < 3:
        raise FitError(f"the one-variable law has 3 parameters and needs at least 4 points with 3 distinct "
                       f"x values, got {len(L)} points and {len(np.unique(x))} distinct x")
    scale = float(np.exp(np.mean(np.log(x))))
    obj = LogLSEObjective(np.log(x / scale)[:, None], np.log(L), delta=delta, reduction=reduction)
    pts = _grid_points(dict(POWER_GRID if grid is None else grid), ("a", "alpha", "e"))
    res = fit_lse(obj, pts, method=method, scipy_options=scipy_options)
    _check_converged(res, obj, "power law")
    at_best = int(np.sum(res["f_starts"] <= res["objective"] * (1 + 1e-9) + 1e-15))
    return FitResult("power", res["theta"], _named("power", res["theta"], scale), res["objective"], len(L),
                     len(pts), at_best, res["converged"], res["message"], ("a", "alpha", "e"), x_scale=scale,
                     delta=delta, reduction=reduction, extra=dict(_obj=obj, _data=dict(x=x, L=L)))


def bootstrap_fit(fit: FitResult, n_boot: int = 1000, *, seed: int = 0, groups=None, polish: bool = True,
                  progress: bool = False) -> FitResult:
    """Bootstrap a fit: resample runs with replacement and refit, warm-started from the optimum.

    Parameters
    ----------
    fit : FitResult
        A result of :func:`fit_chinchilla` or :func:`fit_power_law`.
    n_boot : int
        Number of replicates.
    seed : int
        Seed of the resampling (same seed, same replicates).
    groups : array-like, optional
        Resample whole groups (e.g. run ids when a run contributes several rows) instead of rows.
    polish : bool
        Confirm each replicate with SciPy L-BFGS-B after the batched refit.

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
    obj: LogLSEObjective = fit.extra["_obj"]
    rng = np.random.default_rng(seed)
    n = obj.n
    if groups is None:
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    else:
        codes, uniq = pd.factorize(pd.Series(np.asarray(groups)))
        if len(codes) != n:
            raise ValueError(f"groups has {len(codes)} entries, the fit has {n} points")
        G = len(uniq)
        Wg = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
        W = Wg[:, codes]
    bobj = LogLSEObjective(obj.logX, obj.logy, delta=obj.delta, reduction=obj.reduction, weights=W)
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
    df = _named_batch(fit.kind, X[ok], fit.x_scale)
    df["objective"] = F[ok]
    fit.bootstrap = df
    return fit


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
    if fit.kind != "chinchilla":
        raise FitError(f"compute_optimal needs an approach-3 (chinchilla) fit, got {fit.kind!r}")
    C = check_positive("C (compute budget)", np.atleast_1d(C))

    def alloc(A, B, alpha, beta, E):
        A, B, alpha, beta, E = (np.asarray(v, dtype=np.float64)[..., None] for v in (A, B, alpha, beta, E))
        with np.errstate(all="ignore"):
            G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
            Nopt = G * (C / flops_per_param_token) ** (beta / (alpha + beta))
            Dopt = (C / flops_per_param_token) ** (alpha / (alpha + beta)) / G
            Lopt = E + A / Nopt ** alpha + B / Dopt ** beta
        return Nopt, Dopt, Lopt

    p = fit.params
    if p["alpha"] <= 0 or p["beta"] <= 0:
        raise FitError(f"compute-optimal allocation needs alpha > 0 and beta > 0, got alpha={p['alpha']:.4g}, "
                       f"beta={p['beta']:.4g}")
    Nopt, Dopt, Lopt = alloc(p["A"], p["B"], p["alpha"], p["beta"], p["E"])
    out = pd.DataFrame(dict(C=C, N_opt=Nopt, D_opt=Dopt, tokens_per_param=Dopt / Nopt, L_opt=Lopt))
    if fit.bootstrap is not None:
        b = fit.bootstrap
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
    if fit.kind != "chinchilla":
        raise FitError(f"overtraining needs an approach-3 (chinchilla) fit, got {fit.kind!r}")
    C = check_positive("C (compute budget)", np.atleast_1d(C))
    M = check_positive("tokens_per_param", np.atleast_1d(tokens_per_param))
    CC, MM = np.meshgrid(C, M, indexing="ij")
    N = np.sqrt(CC / (flops_per_param_token * MM))
    D = MM * N
    return pd.DataFrame(dict(C=CC.ravel(), tokens_per_param=MM.ravel(), N=N.ravel(), D=D.ravel(),
                             L=fit.predict(N.ravel(), D.ravel())))


def extrapolation_check(kind: str, data: Mapping[str, np.ndarray], *, n_holdout: int = 1,
                        compute=None, flops_per_param_token: float = 6.0, **fit_kwargs) -> dict:
    """Fit on all but the largest compute budgets; report the error on the held-out largest runs.

    Parameters
    ----------
    kind : {"chinchilla", "power"}
    data : dict
        ``N, D, L`` (chinchilla) or ``x, L`` (power).
    n_holdout : int
        Number of largest distinct budgets held out (all rows at those budgets).
    compute : array-like, optional
        Budget per row; default ``k N D`` (chinchilla) or ``x`` (power).

    Returns
    -------
    dict
        ``n_train, n_holdout, predicted, actual, rel_error`` (per held-out row),
        ``mean_abs_rel_error``, the fit on the reduced data (``params``) and ``valid``/``warnings``
        (:func:`extrapolation_validity`).
    """
    L = np.asarray(data["L"], dtype=np.float64)
    if compute is None:
        compute = (flops_per_param_token * np.asarray(data["N"], float) * np.asarray(data["D"], float)
                   if kind == "chinchilla" else np.asarray(data["x"], float))
    compute = np.asarray(compute, dtype=np.float64)
    budgets = np.unique(compute)
    if n_holdout < 1 or len(budgets) <= n_holdout:
        raise FitError(f"extrapolation check: {len(budgets)} distinct budgets cannot hold out {n_holdout}")
    hold = compute >= budgets[-n_holdout]
    tr = ~hold
    if kind == "chinchilla":
        f = fit_chinchilla(data["N"][tr], data["D"][tr], L[tr], **fit_kwargs)
        pred = f.predict(data["N"][hold], data["D"][hold])
    elif kind == "power":
        f = fit_power_law(data["x"][tr], L[tr], **fit_kwargs)
        pred = f.predict(data["x"][hold])
    else:
        raise ValueError(f"kind={kind!r}: allowed values are 'chinchilla' and 'power'")
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


# ---------------------------------------------------------------------------------------- approach 2
@dataclass
class IsoFLOPResult:
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
        95% interval of the exponent (bootstrap percentile when bootstrapped, else t-based).
    level : float
        Level of ``exponent_ci``.
    bootstrap_failed : int
        Bootstrap replicates dropped because a budget's parabola had no minimum.
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
        n_boot = 0 if self.bootstrap is None else len(self.bootstrap) + self.bootstrap_failed
        return check_validity(exponents={name: self.exponent}, exponent_range={name: (0.0, 1.0)},
                              exponent_of={name: "N_opt and D_opt = C / (6 N_opt) must both grow with C"},
                              intervals={name: self.exponent_ci}, level=self.level,
                              se={name: (self.exponent, self.exponent_se)},
                              distinct={"IsoFLOP budgets": (len(v), thresholds.min_budgets_isoflop)},
                              bootstrap=(self.bootstrap_failed, n_boot) if n_boot else None, optima=optima,
                              thresholds=thresholds)

    @property
    def valid(self) -> bool:
        return self.check().valid

    @property
    def warnings(self) -> list[str]:
        return self.check().warnings

    def to_dict(self) -> dict:
        return dict(variable=self.variable, exponent=self.exponent, coef=self.coef, exponent_se=self.exponent_se,
                    exponent_ci=list(self.exponent_ci), vertices=self.vertices.to_dict(orient="records"),
                    n_bootstrap=0 if self.bootstrap is None else len(self.bootstrap),
                    n_bootstrap_failed=self.bootstrap_failed, **self.check().to_dict())


def _isoflop_vertices(C, S, L, variable):
    rows = []
    for c in np.unique(C):
        m = C == c
        s, l = np.log(S[m]), L[m]
        if len(np.unique(s)) < 3:
            raise FitError(f"IsoFLOP budget C={c:.4g}: needs at least 3 distinct {variable} values for a "
                           f"parabola, got {len(np.unique(s))}")
        p2, p1, p0 = np.polyfit(s, l, 2)
        if not p2 > 0:
            raise FitError(f"IsoFLOP budget C={c:.4g}: the parabola of loss in log {variable} opens downward "
                           f"(curvature {p2:.3g}); the budget's runs do not bracket a minimum")
        v = -p1 / (2 * p2)
        rows.append(dict(C=c, n_runs=int(m.sum()), log_opt=v, opt=np.exp(v), L_min=p0 - p1 * p1 / (4 * p2),
                         curvature=p2, p2=p2, p1=p1, p0=p0, inside=bool(s.min() <= v <= s.max()),
                         size_min=float(S[m].min()), size_max=float(S[m].max())))
    return pd.DataFrame(rows)


def _loglog_fit(C, opt, weights=None):
    x, y = np.log(C), np.log(opt)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    W = np.sqrt(w)
    A = np.column_stack([x, np.ones_like(x)]) * W[:, None]
    coef, *_ = np.linalg.lstsq(A, y * W, rcond=None)
    return coef  # slope, intercept


def fit_isoflop(C, size, L, *, variable: str = "N", weighted: bool = False, n_boot: int = 0, seed: int = 0,
                level: float = 0.95) -> IsoFLOPResult:
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
        dropped and counted (``bootstrap_failed``).

    Raises
    ------
    FitError
        Missing or non-positive values, fewer than 3 budgets, a budget with fewer than 3 sizes, a
        parabola without a minimum, or a bootstrap where fewer than half of the replicates had a
        minimum in every budget.
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
    vert = _isoflop_vertices(C, S, L, variable)
    w = vert["n_runs"].to_numpy(float) if weighted else None
    slope, icpt = _loglog_fit(vert["C"].to_numpy(), vert["opt"].to_numpy(), w)
    x = np.log(vert["C"].to_numpy()); y = np.log(vert["opt"].to_numpy())
    resid = y - (slope * x + icpt)
    dof = len(x) - 2
    se = float(np.sqrt(np.sum(resid ** 2) / dof / np.sum((x - x.mean()) ** 2))) if dof > 0 else float("nan")
    tq = stats.t.ppf(0.5 + level / 2, dof) if dof > 0 else float("nan")
    ci = (slope - tq * se, slope + tq * se)
    boot = None
    if n_boot:
        rng = np.random.default_rng(seed)
        groups = [np.nonzero(C == c)[0] for c in vert["C"]]
        rows = []
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
            try:
                v = _isoflop_vertices(C[idx], S[idx], L[idx], variable)
            except FitError:
                continue
            sl, ic = _loglog_fit(v["C"].to_numpy(), v["opt"].to_numpy(), v["n_runs"].to_numpy(float) if weighted else None)
            rows.append(dict(exponent=sl, log_coef=ic))
        if len(rows) < max(2, n_boot // 2):
            raise FitError(f"approach 2 bootstrap: only {len(rows)} of {n_boot} replicates had a minimum "
                           "in every budget; the profiles are too flat or too sparse")
        boot = pd.DataFrame(rows)
        q = (1 - level) / 2
        se = float(boot["exponent"].std(ddof=1))
        ci = (float(boot["exponent"].quantile(q)), float(boot["exponent"].quantile(1 - q)))
    return IsoFLOPResult(variable, vert, float(slope), float(np.exp(icpt)), se, tuple(map(float, ci)), boot,
                         level=level, bootstrap_failed=n_boot - (0 if boot is None else len(boot)))


# ---------------------------------------------------------------------------------------- data-constrained
def fit_data_constrained(N, D, U, L, *, base: FitResult | None = None, R_star_grid=(1.0, 5.0, 15.0, 50.0),
                         delta: float | None = 1e-3) -> dict:
    """Data-constrained law (Muennighoff et al. 2023): repeated tokens are worth less.

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
