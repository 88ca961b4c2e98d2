"""The fitter: any registered form (:mod:`analysis.forms`) under any objective (:mod:`analysis.objective`).

:func:`fit_form` minimizes the form's objective from every start of its grid (never pruned): a batched
L-BFGS in NumPy runs all starts at once, then SciPy's L-BFGS-B polishes the best distinct optima, so
the result is the grid's best optimum under the reference algorithm (``method="scipy"`` runs the
plain per-start SciPy loop). Closed-form forms (``Form.closed_form``) are solved directly.
``huber-mle`` runs in two stages: the Huber fit from the grid, then the likelihood with the scale
``sigma`` free, started from that optimum (and the form's ``mle_starts``, e.g. Hoffmann's values) for
each ``sigma`` of :data:`LOG_SIGMA_STARTS`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from analysis._common import FitError
from analysis._lbfgs import batched_lbfgs
from analysis.forms import Form, get_form
from analysis.objective import Objective
from analysis.validity import THRESHOLDS, Checked, Thresholds, Validity, check_validity

__all__ = ["FitResult", "fit_form", "fit_lse", "GRAD_TOL", "SCIPY_OPTIONS", "LOG_SIGMA_STARTS", "grid_points"]

GRAD_TOL = 1e-7  # largest |gradient| component accepted as converged when L-BFGS-B stops abnormally
SCIPY_OPTIONS = {"maxiter": 15000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 10}
#: Starts of log sigma for the huber-mle stage (sigma = 1e-3 ... 0.3 in log-loss units).
LOG_SIGMA_STARTS = np.log([1e-3, 1e-2, 3e-2, 0.1, 0.3])


def grid_points(grid: Mapping[str, Sequence[float]], names: Sequence[str]) -> np.ndarray:
    """The full product of the grid's axes, in the order of ``names``."""
    missing = [n for n in names if n not in grid]
    if missing:
        raise ValueError(f"grid is missing {missing}; it needs values for each of {list(names)}")
    axes = [np.asarray(grid[n], dtype=np.float64).ravel() for n in names]
    if any(ax.size == 0 for ax in axes):
        raise ValueError(f"grid: every axis of {list(names)} needs at least one value")
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


@dataclass
class FitResult(Checked):
    """Result of a fit of a registered form.

    Attributes
    ----------
    kind : str
        Registry name of the form (``"chinchilla"``, ``"power"``, ...).
    theta : ndarray
        Raw parameters (the form's ``param_names``, then the objective's extras, e.g. ``log_sigma``).
    params : dict
        Named parameters (``E, A, alpha`` [+ ``B, beta``] and the logs ``a, e`` [+ ``b``]; per form).
    objective : float
        Objective at the optimum.
    n_points, n_starts : int
    starts_at_best : int
        Starts whose optimum is within ``1e-9`` (relative) of the best objective.
    converged : bool
        SciPy L-BFGS-B reported success on the polish of the best start.
    bootstrap : pandas.DataFrame or None
        One row per replicate (named parameters), after :func:`analysis.bootstrap.bootstrap_fit`.
    fit_objective : str
        Name of the objective (:data:`analysis.objective.OBJECTIVES`).
    form : Form
        The form instance (the registry's, or one with options such as a frozen base).
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
    fit_objective: str = "huber"
    form: Form | None = None

    def __post_init__(self):
        if self.form is None:
            self.form = get_form(self.kind)

    def predict(self, *X) -> np.ndarray:
        """Predicted value at the given variables (the form's ``variables``: ``N, D`` for Chinchilla, ``x`` for power)."""
        return self.form.predict(self.params, *X)

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
        """Is this fit a law? The form's exponents > 0 (and, when bootstrapped, their intervals excluding 0
        and every SE below its estimate), ``E`` away from 0 and below the lowest loss, enough distinct
        values of each variable, few failed bootstrap replicates (see :mod:`analysis.validity`)."""
        form, p = self.form, self.params
        data = self.extra.get("_data", {})
        expo = dict(form.exponents)
        distinct = form.distinct(data, thresholds) if data else {}
        L = data.get(form.target) if form.asymptote else None
        intervals = se = boot = None
        if self.bootstrap is not None:
            iv = self.intervals(level)
            intervals = {k: (iv.loc[k, "lo"], iv.loc[k, "hi"]) for k in expo if k in iv.index}
            se = self._se_facts(iv, data)
            boot = (int(self.extra.get("bootstrap_failed", 0)),
                    int(self.extra.get("bootstrap_attempted", len(self.bootstrap))))
        facts = dict(exponents={k: p[k] for k in expo}, exponent_of=expo, intervals=intervals, se=se,
                     asymptote=(form.asymptote, p[form.asymptote], float(np.min(L))) if L is not None else None,
                     distinct=distinct, bootstrap=boot)
        for k, v in form.validity_facts(self).items():
            if isinstance(facts.get(k), dict) and isinstance(v, dict):
                facts[k] = {**facts[k], **v}
            elif v is not None or k not in facts:
                facts[k] = v
        return check_validity(level=level, thresholds=thresholds, **facts)

    def _se_facts(self, iv: pd.DataFrame, data: Mapping) -> dict:
        """``name -> (estimate, bootstrap SE)`` for the SE rule. A scale of a term ``scale / v**exponent``
        (``Form.scale_terms``) is judged as that term at the geometric mean of the data's ``v``: the verdict then
        does not depend on the units of ``v`` (the coefficient itself is the term at ``v = 1``)."""
        p, boot, out = self.params, self.bootstrap, {}
        for k in self.form.se_params:
            if k not in iv.index:
                continue
            ex, var = self.form.scale_terms.get(k, (None, None))
            v = np.asarray(data.get(var, ()), dtype=np.float64) if var else np.empty(0)
            if ex is None or ex not in boot.columns or v.size == 0 or not np.all(v > 0):
                out[k] = (p[k], iv.loc[k, "se"])
                continue
            ref = float(np.exp(np.mean(np.log(v))))
            with np.errstate(invalid="ignore", over="ignore"):  # a wild replicate: inf x 0, dropped below
                reps = boot[k].to_numpy(np.float64) * ref ** -boot[ex].to_numpy(np.float64)
            reps = reps[np.isfinite(reps)]
            se = float(np.std(reps, ddof=1)) if reps.size > 1 else float("nan")
            out[f"{k}/{var}^{ex} at {var} = {ref:.3g}"] = (p[k] * ref ** -p[ex], se)
        return out

    def to_dict(self, level: float = 0.95) -> dict:
        """JSON-ready summary (parameters, objective, intervals when bootstrapped, ``valid`` and
        ``warnings`` from :meth:`check` at ``level``)."""
        out = dict(kind=self.kind, params={k: float(v) for k, v in self.params.items()},
                   objective=self.objective, n_points=self.n_points, n_starts=self.n_starts,
                   starts_at_best=self.starts_at_best, converged=self.converged, delta=self.delta,
                   reduction=self.reduction, fit_objective=self.fit_objective)
        if self.bootstrap is not None:
            iv = self.intervals(level)
            out["level"] = level
            out["n_bootstrap"] = int(len(self.bootstrap))
            out["intervals"] = {k: dict(se=r.se, lo=r.lo, hi=r.hi) for k, r in iv.iterrows()}
        out.update(self.form.to_dict(self))
        out.update({k: v for k, v in self.extra.items() if not k.startswith("_")})
        out.update(self.check(level).to_dict())
        return out


def named_params(form: Form, objective: Objective, theta, x_scale: float = 1.0) -> dict:
    """The form's named parameters plus the objective's (``sigma`` for huber-mle); ``theta`` may be (P, S)."""
    out = form.named(theta, x_scale)
    if objective.mle:
        ls = theta[len(form.param_names)]
        out.update(sigma=np.exp(ls), log_sigma=ls)
    return out


def fit_lse(obj, starts_SP: np.ndarray, *, method: str = "batched", polish_top: int = 8,
            scipy_options: Mapping | None = None, progress: bool = False) -> dict:
    """Minimize a batched objective from every start; return the best optimum.

    Parameters
    ----------
    obj : batched objective (``obj(theta_SP, rows) -> (f_S, g_SP)``, ``obj.scipy_fun()``)
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


def _check_converged(res: dict, obj, what: str, tol: float = GRAD_TOL) -> None:
    theta = res["theta"]
    if not np.all(np.isfinite(theta)) or not np.isfinite(res["objective"]):
        raise FitError(f"{what}: the fit did not converge (non-finite parameters {theta})")
    if not res["converged"]:
        g = obj(theta[None, :])[1][0]
        if np.max(np.abs(g)) > tol:
            raise FitError(f"{what}: L-BFGS-B did not converge ({res['message']}; "
                           f"max |gradient| {np.max(np.abs(g)):.3g} at objective {res['objective']:.6g})")


def fit_form(form: "str | Form", data: Mapping[str, np.ndarray], *, objective: "str | Objective | None" = None,
             delta: float | None = 1e-3, reduction: str = "sum", grid: Mapping[str, Sequence[float]] | None = None,
             method: str = "batched", scipy_options: Mapping | None = None, progress: bool = False,
             what: str | None = None) -> FitResult:
    """Fit a registered form to data.

    Parameters
    ----------
    form : str or Form
        Registry name (:data:`analysis.forms.FORMS`) or an instance (e.g. with a frozen base).
    data : dict
        Arrays keyed by the form's ``variables`` and ``target`` (``N, D, L``; ``x, L``; ``x, y[, w]``; ...).
    objective : str or Objective, optional
        ``huber`` | ``lsq-log`` | ``lsq`` | ``huber-mle``; default: the form's ``default_objective``.
    delta : float or None
        Huber threshold (``objective="huber"`` with ``delta=None`` is ``lsq-log``).
    reduction : {"sum", "mean"}
    grid : dict, optional
        Starts per raw parameter; default the form's grid.
    method : {"batched", "scipy"}
        See :func:`fit_lse`.

    Raises
    ------
    FitError
        On missing or non-positive values, too few points for the form, or a fit that did not converge.
    ValueError
        On an unknown form, objective, reduction or a grid missing a parameter.
    """
    form = get_form(form)
    ob = Objective.of(objective or form.default_objective, delta=delta, reduction=reduction)
    arrays = form.check_data(data)
    what = what or form.title
    n = len(arrays[form.target])
    if form.closed_form:
        theta = form.solve(arrays)[0]
        if not np.all(np.isfinite(theta)):
            raise FitError(f"{what}: the fit gave non-finite parameters {theta}")
        return FitResult(form.name, theta, named_params(form, ob, theta), 0.0, n, 0, 0, True, "closed form",
                         form.param_names, delta=ob.huber_delta, reduction=ob.reduction, fit_objective="wls-log",
                         form=form, extra=dict(_data=arrays))
    obj, scale = form.objective(arrays, ob)
    names = tuple(form.param_names) + ob.extra_params
    if ob.mle:
        first = fit_form(form, arrays, objective=Objective("huber", ob.delta, ob.reduction), grid=grid,
                         method=method, scipy_options=scipy_options, what=what)
        bases = [first.theta] + [np.asarray(s, float) for s in form.mle_starts]
        pts = np.array([np.r_[b, ls] for b in bases for ls in LOG_SIGMA_STARTS])
        if grid is not None and "log_sigma" in grid:
            pts = np.array([np.r_[b, ls] for b in bases for ls in np.ravel(grid["log_sigma"])])
    else:
        pts = grid_points(dict(form.grid if grid is None else grid), form.param_names)
    res = fit_lse(obj, pts, method=method, scipy_options=scipy_options, progress=progress)
    _check_converged(res, obj, what)
    at_best = int(np.sum(res["f_starts"] <= res["objective"] * (1 + 1e-9) + 1e-15))
    if res["objective"] < 0:  # huber-mle can be negative
        at_best = int(np.sum(res["f_starts"] <= res["objective"] + 1e-9 * abs(res["objective"]) + 1e-15))
    return FitResult(form.name, res["theta"], named_params(form, ob, res["theta"], scale), res["objective"], n,
                     len(pts), at_best, res["converged"], res["message"], names, x_scale=scale,
                     delta=ob.huber_delta, reduction=ob.reduction,
                     fit_objective=ob.name, form=form,
                     extra=dict(_obj=obj, _data=arrays, _objective=ob, grad_max=res["grad_max"],
                                **{k: res[k] for k in ("starts_stopped", "starts_at_maxiter", "best_objective_at_maxiter")
                                   if k in res}))
