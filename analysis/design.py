"""Adaptive design of a scaling ladder: which runs to make next so that the prediction a user cares
about (the loss at a target compute ``C*``, or the compute-optimal ``N*, D*`` at ``C*``) gets as
precise as possible per unit of cost (issue #26).

Pure NumPy/SciPy/pandas: reads arrays, imports neither ``study`` nor ``ray`` nor ``torch``.

The pieces
----------
* :func:`candidates` - the runs one could make next: ``(N, D)`` with a cost (``C = 6 N D`` by default;
  pass the run planner's GPU-hours as ``cost=`` where it exists).
* :class:`Target` - what is predicted; :func:`predict_target` - its point value and predictive
  interval from the bootstrap of the approach-3 fit (``fit_form("chinchilla")`` + ``bootstrap_fit``).
* :func:`acquire` - the next batch: greedy, each pick maximizing the expected reduction of the
  target's variance per unit cost, with the covariance updated after each pick (below).
* :func:`stop_reason` - stop when the budget is spent or the interval is narrower than asked.
* :func:`design_round` - one round: fit, bootstrap, predict, score, choose. Deterministic given ``seed``.

The acquisition (delta method on the bootstrap covariance)
----------------------------------------------------------
Let ``theta = (a, b, alpha, beta, e)`` be the raw approach-3 parameters (``log L = LSE(a - alpha log N,
b - beta log D, e)``), ``S`` the covariance of the bootstrap replicates of ``theta`` (trimmed of wild
replicates and rescaled to the target's robust bootstrap variance, :func:`robust_covariance`), ``g = dT/dtheta``
the gradient of the target at the fit (central differences), ``j_c = d log L(N_c, D_c)/dtheta`` the
gradient of the law at candidate ``c`` (analytic: softmax weights of the three terms), and ``s2`` the
noise variance of ``log L`` of one run (robust: ``(1.4826 MAD)^2`` of the fit's log residuals, scaled by
``n / (n - 5)``). Treating ``S`` as a Gaussian posterior and the law as linear in ``theta`` near the fit,
one more run at ``c`` lowers the target's variance ``g' S g`` by ``(g' S j_c)^2 / (s2 + j_c' S j_c)``
(a rank-one Kalman update). The score is that reduction divided by the candidate's cost; the batch is
built greedily, applying the rank-one update ``S <- S - S j j' S / (s2 + j' S j)`` after each pick, so a
second run that would tell the same thing scores low.

Why this and not a refit per candidate: a pseudo-observation refit costs (candidates x replicates)
fits per round; the linearized update costs O(candidates x 25) and uses the bootstrap's covariance,
which already carries the fit's non-Gaussian, outlier-robust (Huber) spread. What it assumes: the
approach-3 form is right over the candidates and up to ``C*`` (no data repetition, no regime change);
the law is close to linear in ``theta`` within the bootstrap's spread; run noise is independent,
homoscedastic in ``log L`` and not heavy-tailed (bad runs are down-weighted by the Huber fit, not by
the acquisition); the bootstrap covariance is an honest posterior, which it is not with very few
points (the percentile bootstrap under-covers there). Where it fails: see analysis/README.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis._threads import limit_threads
from analysis.bootstrap import bootstrap_fit
from analysis.fitter import FitResult, fit_form

__all__ = ["Target", "DesignRound", "candidates", "fit_law", "predict_target", "target_gradient",
           "law_gradient", "noise_variance", "robust_covariance", "acquire", "stop_reason", "design_round", "TARGET_KINDS",
           "RAW", "QUICK_GRID", "ROUNDS_TABLE", "read_rounds", "plot_rounds", "acquire_best", "acquire_relaxed", "fisher_covariance", "acquire_by_rule", "relaxed_design", "RULES",
           "rounds_markdown"]

#: Raw approach-3 parameters, in the order of ``ChinchillaForm.param_names``.
RAW = ("a", "b", "alpha", "beta", "e")
TARGET_KINDS = ("loss", "optimum")
#: Acquisition rules of :func:`design_round` (``--acquisition`` of the study and the benchmark).
RULES = ("best", "ratio", "plain", "relaxed", "local")
#: Store table of the adaptive study's rounds (one row per round; written by ``study/adaptive.py``).
ROUNDS_TABLE = "adaptive_rounds"
#: A small grid of starts (3 x 3 x 2 x 2 x 2 = 72) for fresh fits where the full 4500-start grid is too
#: slow (the benchmark's many refits); later rounds also start from the previous round's optimum.
QUICK_GRID = {"a": np.array([0.0, 6.0, 12.0]), "b": np.array([0.0, 6.0, 12.0]), "alpha": np.array([0.3, 0.8]),
              "beta": np.array([0.3, 0.8]), "e": np.array([-0.5, 0.5])}


def _check_array(name: str, values, n: int | None = None) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name}: expected {n} values (one per candidate), got {arr.size}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise ValueError(f"{name}: values must be finite and > 0; bad at positions {np.nonzero(bad)[0][:5].tolist()} "
                         f"(e.g. {arr[bad][0]!r})")
    return arr


@dataclass(frozen=True, kw_only=True)
class Target:
    """What the study wants predicted.

    Attributes
    ----------
    kind : {"loss", "optimum"}
        ``loss``: the compute-optimal loss ``L_opt`` at ``compute`` under the fitted law. ``optimum``:
        the compute-optimal ``N*`` (and ``D* = C* / (k N*)``); its variance is taken in ``log N*``.
    compute : float
        Target compute ``C*`` in FLOPs.
    flops_per_param_token : float
        ``k`` in ``C = k N D`` (6).
    """

    kind: str
    compute: float
    flops_per_param_token: float = 6.0

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind={self.kind!r}: allowed values are {list(TARGET_KINDS)}")
        if not (np.isfinite(self.compute) and self.compute > 0):
            raise ValueError(f"target compute={self.compute!r}: must be a finite FLOP count > 0")
        if not (np.isfinite(self.flops_per_param_token) and self.flops_per_param_token > 0):
            raise ValueError(f"flops_per_param_token={self.flops_per_param_token!r}: must be > 0")

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``"loss@1e21"`` or ``"optimum@1e21"`` (the study's ``--target``)."""
        kind, sep, c = str(text).partition("@")
        if not sep:
            raise ValueError(f"target={text!r}: expected 'loss@C' or 'optimum@C' (C in FLOPs, e.g. loss@1e21)")
        try:
            compute = float(c)
        except ValueError:
            raise ValueError(f"target={text!r}: compute {c!r} is not a number") from None
        return cls(kind=kind, compute=compute)

    def optimum(self, theta_SP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(N_opt, D_opt, L_opt)`` at ``compute`` for raw parameters ``theta`` (``(5,)`` or ``(5, S)``)."""
        a, b, al, be, e = (np.asarray(v, dtype=np.float64) for v in np.asarray(theta_SP, dtype=np.float64)[:5])
        x = np.log(self.compute / self.flops_per_param_token)
        with np.errstate(all="ignore"):
            # alpha A N^-alpha = beta B D^-beta at N D = x: log N = (log(alpha A / beta B) + beta x) / (alpha + beta)
            logN = (np.log(al) + a - np.log(be) - b + be * x) / (al + be)
            logD = x - logN
            L = np.exp(e) + np.exp(a - al * logN) + np.exp(b - be * logD)
        return np.exp(logN), np.exp(logD), L

    def value(self, theta_SP) -> np.ndarray:
        """The scalar whose variance is reduced: ``L_opt`` (loss) or ``log N_opt`` (optimum)."""
        N, _, L = self.optimum(theta_SP)
        return L if self.kind == "loss" else np.log(N)


def candidates(N, D, cost=None, *, flops_per_param_token: float = 6.0) -> pd.DataFrame:
    """The candidate runs: ``N, D, C (= k N D), cost`` (``cost`` defaults to ``C``).

    Raises
    ------
    ValueError
        Naming ``N``, ``D`` or ``cost`` when a value is missing, non-finite or <= 0, or lengths differ.
    """
    N = _check_array("N (parameters)", N)
    D = _check_array("D (tokens)", D, len(N))
    C = flops_per_param_token * N * D
    cost = C if cost is None else _check_array("cost", cost, len(N))
    return pd.DataFrame(dict(N=N, D=D, C=C, cost=cost))


def fit_law(data: Mapping[str, np.ndarray], *, warm: np.ndarray | None = None,
            grid: Mapping[str, Sequence[float]] | None = None) -> FitResult:
    """The approach-3 fit (``fit_form("chinchilla")``, Huber delta 1e-3 on log L) from ``grid`` (default:
    the form's 4500 starts) and, when given, from ``warm`` (raw parameters of a previous fit); the lower
    objective is kept. With ``warm`` and ``grid=None`` only the warm start is run."""
    fits = []
    with limit_threads(1):
        if warm is not None:
            w = np.asarray(warm, dtype=np.float64)
            if w.shape != (5,) or not np.all(np.isfinite(w)):
                raise ValueError(f"warm: expected 5 finite raw parameters {RAW}, got {warm!r}")
            fits.append(fit_form("chinchilla", data, grid={k: [v] for k, v in zip(RAW, w)}))
        if warm is None or grid is not None:
            fits.append(fit_form("chinchilla", data, grid=grid))
    return min(fits, key=lambda f: f.objective)


def _replicates(fit: FitResult) -> np.ndarray:
    if fit.bootstrap is None:
        raise ValueError("fit: needs bootstrap replicates (run analysis.bootstrap.bootstrap_fit first)")
    if fit.kind != "chinchilla":
        raise ValueError(f"fit: needs an approach-3 fit (form 'chinchilla'), got {fit.kind!r}")
    return fit.bootstrap[list(RAW)].to_numpy(dtype=np.float64)


def predict_target(fit: FitResult, target: Target, level: float = 0.9) -> dict:
    """Point value and percentile interval of the target from the bootstrap replicates.

    Returns
    -------
    dict
        ``point, lo, hi, median, sd`` of the target (``L_opt``; for ``optimum``: ``N_opt`` with
        ``D_opt, D_lo, D_hi`` too), ``rel_width`` (``(hi - lo) / point``; optimum: ``hi / lo - 1`` of
        ``N_opt``), ``level``, ``n_boot`` (finite replicates).
    """
    if not (0 < level < 1):
        raise ValueError(f"level={level!r}: must lie in (0, 1)")
    R = _replicates(fit)
    v = target.value(R.T)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        raise ValueError("fit: fewer than 2 bootstrap replicates give a finite target")
    q = (1 - level) / 2
    lo, hi = np.quantile(v, [q, 1 - q])
    p = float(target.value(fit.theta[:5]))
    out = dict(kind=target.kind, compute=target.compute, level=level, n_boot=int(len(v)))
    if target.kind == "loss":
        out.update(point=p, lo=float(lo), hi=float(hi), median=float(np.median(v)), sd=float(np.std(v, ddof=1)),
                   rel_width=float((hi - lo) / p))
    else:
        x = np.log(target.compute / target.flops_per_param_token)
        out.update(point=float(np.exp(p)), lo=float(np.exp(lo)), hi=float(np.exp(hi)),
                   median=float(np.exp(np.median(v))), sd=float(np.std(v, ddof=1)),  # sd of log N_opt
                   D_opt=float(np.exp(x - p)), D_lo=float(np.exp(x - hi)), D_hi=float(np.exp(x - lo)),
                   rel_width=float(np.exp(hi - lo) - 1))
    return out


def target_gradient(theta: np.ndarray, target: Target, h: float = 1e-5) -> np.ndarray:
    """``dT/dtheta`` at the raw parameters (central differences, step ``h``)."""
    theta = np.asarray(theta, dtype=np.float64)[:5]
    E = np.eye(5) * h
    return (target.value((theta + E).T) - target.value((theta - E).T)) / (2 * h)


def law_gradient(theta: np.ndarray, N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """``d log L / dtheta`` at each ``(N, D)``: ``(n, 5)`` in the order of :data:`RAW` (analytic)."""
    a, b, al, be, e = np.asarray(theta, dtype=np.float64)[:5]
    lN, lD = np.log(N), np.log(D)
    Z = np.column_stack([a - al * lN, b - be * lD, np.full_like(lN, e)])
    W = np.exp(Z - Z.max(axis=1, keepdims=True))
    W /= W.sum(axis=1, keepdims=True)
    return np.column_stack([W[:, 0], W[:, 1], -W[:, 0] * lN, -W[:, 1] * lD, W[:, 2]])


def noise_variance(fit: FitResult, floor: float = 1e-6) -> float:
    """Variance of one run's ``log L`` around the law: ``(1.4826 MAD)^2 n/(n-5)`` of the log residuals
    (robust to bad runs), at least ``floor``."""
    d = fit.extra["_data"]
    r = np.log(d["L"]) - np.log(fit.form.predict(fit.params, d["N"], d["D"]))
    n = len(r)
    s = 1.4826 * np.median(np.abs(r - np.median(r)))
    return float(max(s * s * n / max(n - 5, 1), floor))


def robust_covariance(fit: FitResult, target: Target, g: np.ndarray | None = None, trim: float = 0.025) -> np.ndarray:
    """Covariance ``(5, 5)`` of the raw parameters from the bootstrap replicates, robust to wild ones.

    A few replicates of a weakly determined fit run off (``E -> 0``, ``A -> 1e12``) and would dominate a
    plain covariance. Replicates outside the ``[trim, 1 - trim]`` quantiles of any raw parameter or of
    the target are dropped; the covariance of the rest is then rescaled so that the delta-method
    variance ``g' S g`` equals the robust variance ``(IQR / 1.349)^2`` of the target over all replicates.
    """
    R = _replicates(fit)
    R = R[np.all(np.isfinite(R), axis=1)]
    v = target.value(R.T)
    keep = np.isfinite(v)
    R, v = R[keep], v[keep]
    if len(R) < 10:
        raise ValueError(f"fit: only {len(R)} bootstrap replicates give a finite target; need at least 10")
    X = np.column_stack([R, v])
    lo, hi = np.quantile(X, [trim, 1 - trim], axis=0)
    inside = np.all((X >= lo) & (X <= hi), axis=1)
    if inside.sum() < 10:
        inside[:] = True
    S = np.cov(R[inside].T) + 1e-12 * np.eye(5)
    if g is None:
        g = target_gradient(fit.theta, target)
    q75, q25 = np.quantile(v, [0.75, 0.25])
    var_t = ((q75 - q25) / 1.349) ** 2
    lin = float(g @ S @ g)
    if var_t > 0 and lin > 0:
        S = S * (var_t / lin)
    return S


def _acquisition_inputs(fit: FitResult, cands: pd.DataFrame, target: Target, batch_size, budget,
                        noise_var: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """The acquisitions' checked arguments and their linearization: ``(g, S, J, s2, cost)`` (module docstring)."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if budget is not None and not (np.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r}: must be a finite cost > 0")
    for col in ("N", "D", "cost"):
        if col not in cands:
            raise ValueError(f"cands: missing column {col!r} (build it with analysis.design.candidates)")
        _check_array(f"cands[{col!r}]", cands[col])
    g = target_gradient(fit.theta, target)
    S = robust_covariance(fit, target, g)
    J = law_gradient(fit.theta, cands["N"].to_numpy(), cands["D"].to_numpy())
    s2 = noise_variance(fit) if noise_var is None else float(noise_var)
    cost = cands["cost"].to_numpy(dtype=np.float64)
    return g, S, J, s2, cost


def _rank_one(S: np.ndarray, j: np.ndarray, s2: float) -> np.ndarray:
    """``S`` after one more run with law gradient ``j`` and noise variance ``s2`` (the Kalman update)."""
    v = S @ j
    return S - np.outer(v, v) / (s2 + j @ v)


def acquire(fit: FitResult, cands: pd.DataFrame, target: Target, *, batch_size: int = 4,
            budget: float | None = None, exclude: Sequence[int] = (), allow_repeats: bool = False,
            noise_var: float | None = None, cost_power: float = 1.0) -> tuple[list[int], pd.DataFrame]:
    """Greedy batch maximizing the target's expected variance reduction per unit cost (module docstring).

    Parameters
    ----------
    fit : FitResult
        Approach-3 fit with bootstrap replicates.
    cands : DataFrame
        From :func:`candidates` (``N, D, cost``).
    target : Target
    batch_size : int
        Most runs picked.
    budget : float, optional
        Most total cost of the batch (a candidate that does not fit is skipped).
    exclude : sequence of int
        Candidate rows not to pick (e.g. runs already made).
    allow_repeats : bool
        Whether one candidate may be picked twice in a batch (a second seed of the same run).
    noise_var : float, optional
        Noise variance of one run's ``log L`` (default :func:`noise_variance`).
    cost_power : float
        Score = reduction / cost ** cost_power (1: per unit cost; 0: ignore cost within the budget).

    Returns
    -------
    (chosen, scores)
        Row positions picked, in order; the candidates with ``reduction`` and ``score`` (per cost) of
        the first pick, and ``pick`` (1-based order, 0 if not picked).
    """
    if not (np.isfinite(cost_power) and cost_power >= 0):
        raise ValueError(f"cost_power={cost_power!r}: must be a finite number >= 0")
    g, S, J, s2, cost = _acquisition_inputs(fit, cands, target, batch_size, budget, noise_var)
    avail = np.ones(len(cands), bool)
    avail[list(exclude)] = False
    left = np.inf if budget is None else float(budget)
    S0 = S
    chosen: list[int] = []
    first = None
    while len(chosen) < batch_size:
        SJ = J @ S                      # (n, 5)
        gSj = SJ @ g                    # (n,)
        red = gSj ** 2 / (s2 + np.einsum("ij,ij->i", SJ, J))
        score = red / cost ** cost_power
        if first is None:
            first = (red.copy(), score.copy())
        ok = avail & (cost <= left)
        if not ok.any():
            break
        i = int(np.argmax(np.where(ok, score, -np.inf)))
        chosen.append(i)
        left -= cost[i]
        if not allow_repeats:
            avail[i] = False
        S = _rank_one(S, J[i], s2)
    scores = cands.copy()
    scores["reduction"], scores["score"] = first
    scores["pick"] = 0
    for k, i in enumerate(chosen):
        scores.iloc[i, scores.columns.get_loc("pick")] = k + 1
    # the whole batch's expected reduction of the target's variance (linearized), and what it leaves
    scores.attrs.update(variance_before=float(g @ S0 @ g), variance_after=float(g @ S @ g),
                        batch_reduction=float(g @ S0 @ g - g @ S @ g), cost_power=float(cost_power))
    return chosen, scores


def relaxed_design(P0: np.ndarray, J: np.ndarray, cost: np.ndarray, g: np.ndarray, s2: float, *,
                   budget: float = np.inf, count: float = np.inf) -> tuple[np.ndarray, float]:
    """``(w, variance)``: the relaxed c-optimal design over candidates with law gradients ``J`` ``(n, 5)``.

    Minimizes ``g' (P0 + sum_c w_c j_c j_c' / s2)^-1 g`` over ``w`` in ``[0, 1]^n`` subject to
    ``sum_c w_c cost_c <= budget`` and ``sum_c w_c <= count``; ``P0`` is the precision already held (the
    runs made; zeros for none, then the candidates alone must identify the target). Convex (a matrix-fractional
    function of an affine map of ``w``), solved by SLSQP with the analytic gradient; the optimum bounds the
    linearized variance of every design that takes each candidate at most once within the same budget.
    """
    from scipy.optimize import minimize

    J = np.asarray(J, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    P0 = (np.asarray(P0, dtype=np.float64) + np.asarray(P0, dtype=np.float64).T) / 2
    n = len(J)
    if n == 0:
        return np.zeros(0), float("nan")
    ridge = 1e-12 * max(1.0, float(np.abs(P0).max()))
    full = P0 + J.T @ J / s2 + ridge * np.eye(5)
    v_all = float(g @ np.linalg.solve(full, g))  # every candidate: the scale of the objective

    def f(w):
        M = P0 + (J * w[:, None]).T @ J / s2 + ridge * np.eye(5)
        v = np.linalg.solve(M, g)
        return float(g @ v) / v_all, -((J @ v) ** 2) / s2 / v_all

    cons = []
    if np.isfinite(count):
        cons.append(dict(type="ineq", fun=lambda w: count - w.sum(), jac=lambda w: -np.ones_like(w)))
    if np.isfinite(budget):
        scale = float(cost.max())
        cons.append(dict(type="ineq", fun=lambda w: (budget - w @ cost) / scale, jac=lambda w: -cost / scale))
    w0 = np.full(n, min(1.0, count / n, budget / cost.sum()))
    res = minimize(lambda w: f(w)[0], w0, jac=lambda w: f(w)[1], method="SLSQP", bounds=[(0.0, 1.0)] * n,
                   constraints=cons, options=dict(maxiter=500, ftol=1e-12))
    w = np.clip(res.x, 0.0, 1.0)
    return w, f(w)[0] * v_all


def fisher_covariance(fit: FitResult, s2: float) -> np.ndarray:
    """``(J'J / s2)^-1``: the linearized covariance of the raw parameters at the point estimate, from the runs
    the fit was made on (``J`` their law gradients; a tiny ridge keeps it finite when they do not identify
    all five parameters)."""
    d = fit.extra["_data"]
    Jm = law_gradient(fit.theta, np.asarray(d["N"], np.float64), np.asarray(d["D"], np.float64))
    P = Jm.T @ Jm / s2
    return np.linalg.inv(P + 1e-12 * max(1.0, float(np.abs(P).max())) * np.eye(5))


def acquire_relaxed(fit: FitResult, cands: pd.DataFrame, target: Target, *, batch_size: int = 4,
                    budget: float | None = None, exclude: Sequence[int] = (), noise_var: float | None = None,
                    precision: str = "bootstrap", **_ignored) -> tuple[list[int], pd.DataFrame]:
    """The batch that minimizes the target's variance *jointly*: the relaxed c-optimal design, rounded.

    The greedy rules add one run at a time, and a run that pins a direction only together with another
    (the two ends of an IsoFLOP curve, which fix its curvature) scores low alone. Here the batch is chosen
    as a whole: with ``P0 = S^-1`` the precision of the fit so far (``S``: :func:`robust_covariance`) and
    ``w_c`` in ``[0, 1]`` the share of candidate ``c`` taken, minimize ``g' (P0 + sum_c w_c j_c j_c' / s2)^-1 g``
    subject to ``sum_c w_c cost_c <= budget`` and ``sum_c w_c <= batch_size``. The objective is convex in
    ``w`` (a matrix-fractional function of an affine map), so the relaxation has one optimum (SLSQP, with its
    analytic gradient ``-(j_c' M^-1 g)^2 / s2``), and its value bounds every batch of those runs from below.
    Rounding: candidates in order of ``w``, each taken if it fits the budget and the count, with the
    rank-one update of :func:`acquire`; what room is left goes to the plain greedy. ``scores`` carries the
    relaxed weights (``weight``) and the relaxation's variance (``attrs["variance_relaxed"]``).

    ``precision="fisher"`` (rule ``local``): ``S`` is :func:`fisher_covariance`, the information of the runs
    made at the current point estimate, so the batch is the *locally* c-optimal one (the classical sequential
    design: re-linearize at each round's estimate), and a batch is only the runs the relaxation weights (no
    greedy fill: compute left in a round is spent in the next, with a better estimate). The noise variance then
    cancels out of the relaxation.
    With few runs the bootstrap covariance is dominated by the replicates' nonlinear spread, which the
    relaxation reads as prior uncertainty to be reduced anywhere; the Fisher information says which directions
    the runs made already pin.
    """
    if precision not in ("bootstrap", "fisher"):
        raise ValueError(f"precision={precision!r}: 'bootstrap' or 'fisher'")
    g, S, J, s2, cost = _acquisition_inputs(fit, cands, target, batch_size, budget, noise_var)
    if precision == "fisher":
        S = fisher_covariance(fit, s2)
    left = np.inf if budget is None else float(budget)
    avail = np.ones(len(cands), bool)
    avail[list(exclude)] = False
    avail &= cost <= left
    idx = np.nonzero(avail)[0]
    v0 = float(g @ S @ g)
    weights = np.zeros(len(cands))
    v_relaxed = v0
    if len(idx):
        P0 = np.linalg.inv(S)
        weights[idx], v_relaxed = relaxed_design(P0, J[idx], cost[idx], g, s2, budget=left, count=batch_size)
    chosen: list[int] = []
    Sb = S
    for i in sorted(idx, key=lambda i: (-weights[i], cost[i])):
        if len(chosen) >= batch_size or weights[i] < 1e-3:
            break
        if cost[i] <= left:
            chosen.append(int(i))
            left -= cost[i]
            Sb = _rank_one(Sb, J[i], s2)
    if len(chosen) < batch_size and precision == "bootstrap":  # room left: the plain greedy from here
        rest = np.setdiff1d(idx, chosen)
        while len(chosen) < batch_size:
            ok = [i for i in rest if cost[i] <= left and i not in chosen]
            if not ok:
                break
            SJ = J[ok] @ Sb
            red = (SJ @ g) ** 2 / (s2 + np.einsum("ij,ij->i", SJ, J[ok]))
            i = int(ok[int(np.argmax(red))])
            chosen.append(i)
            left -= cost[i]
            Sb = _rank_one(Sb, J[i], s2)
    SJ = J @ S
    red = (SJ @ g) ** 2 / (s2 + np.einsum("ij,ij->i", SJ, J))
    scores = cands.copy()
    scores["reduction"], scores["score"], scores["weight"] = red, red / cost, weights
    scores["pick"] = 0
    for k, i in enumerate(chosen):
        scores.iloc[i, scores.columns.get_loc("pick")] = k + 1
    scores.attrs.update(variance_before=v0, variance_after=float(g @ Sb @ g),
                        batch_reduction=float(v0 - g @ Sb @ g), variance_relaxed=v_relaxed, cost_power=None)
    return chosen, scores


def acquire_best(fit: FitResult, cands: pd.DataFrame, target: Target, *, cost_powers: Sequence[float] = (1.0, 0.0),
                 **kw) -> tuple[list[int], pd.DataFrame]:
    """The batch of :func:`acquire` with the largest expected reduction of the target's variance among
    the greedy rules ``reduction / cost ** p`` for ``p`` in ``cost_powers`` (default: per unit cost, and
    by reduction alone within the budget).

    Why: the greedy by reduction per cost is myopic under a budget. It buys the cheap runs first, and
    in a long extrapolation their reductions are each small and overlap (they pin the same small-scale
    directions), while one run at the top of the ladder moves the target more than the whole cheap
    batch. Taking the better of the ratio greedy and the plain greedy is the classic fix for budgeted
    submodular selection (Khuller, Moss & Naor 1999; Krause & Guestrin 2005), with a constant-factor
    guarantee that neither rule has alone. ``kw`` as :func:`acquire` (``budget`` should be set: without
    it the plain greedy ignores cost entirely)."""
    best = None
    for p in cost_powers:
        c, sc = acquire(fit, cands, target, cost_power=p, **kw)
        if best is None or sc.attrs["batch_reduction"] > best[1].attrs["batch_reduction"]:
            best = (c, sc)
    return best


def acquire_by_rule(rule: str, fit: FitResult, cands: pd.DataFrame, target: Target,
                    **kw) -> tuple[list[int], pd.DataFrame]:
    """The batch of acquisition ``rule`` (:data:`RULES`): ``best`` (:func:`acquire_best`), ``relaxed``
    (:func:`acquire_relaxed`), ``local`` (:func:`acquire_relaxed` with the Fisher precision), ``ratio`` / ``plain``
    (:func:`acquire` with cost power 1 / 0); ``kw`` as theirs."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: allowed values are {list(RULES)}")
    if rule == "best":
        return acquire_best(fit, cands, target, **kw)
    if rule == "relaxed":
        return acquire_relaxed(fit, cands, target, **kw)
    if rule == "local":
        return acquire_relaxed(fit, cands, target, precision="fisher", **kw)
    return acquire(fit, cands, target, cost_power=1.0 if rule == "ratio" else 0.0, **kw)


def stop_reason(*, spent: float, budget: float, rel_width: float | None = None,
                width_goal: float | None = None, next_cost: float | None = None) -> str | None:
    """Why to stop, or ``None`` to go on: the budget is spent (or the cheapest next run does not fit in
    it), or the interval's relative width is at most ``width_goal``."""
    if not (np.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r}: must be a finite cost > 0")
    if spent >= budget:
        return f"budget spent ({spent:.4g} of {budget:.4g})"
    if next_cost is not None and spent + next_cost > budget:
        return f"no candidate fits in the budget left ({budget - spent:.4g} < {next_cost:.4g})"
    if width_goal is not None and rel_width is not None and rel_width <= width_goal:
        return f"interval narrow enough (relative width {rel_width:.4g} <= {width_goal:.4g})"
    return None


@dataclass
class DesignRound:
    """One round of the adaptive design: ``fit`` (bootstrapped), ``prediction`` (:func:`predict_target`),
    ``scores`` (:func:`acquire`'s table) and ``chosen`` (row positions of the candidates)."""

    fit: FitResult
    prediction: dict
    scores: pd.DataFrame
    chosen: list = field(default_factory=list)


def design_round(data: Mapping[str, np.ndarray], cands: pd.DataFrame, target: Target, *, seed: int = 0,
                 n_boot: int = 200, level: float = 0.9, batch_size: int = 4, budget: float | None = None,
                 exclude: Sequence[int] = (), warm: np.ndarray | None = None,
                 grid: Mapping[str, Sequence[float]] | None = None, polish: bool = True,
                 rule: str = "best") -> DesignRound:
    """Fit the runs so far (``data``: ``N, D, L``), bootstrap (``n_boot``, ``seed``), predict the target
    and pick the next batch by ``rule``: ``best`` (:func:`acquire_best`), ``ratio`` (reduction per unit
    cost), ``plain`` (reduction alone, cost only through ``budget``) or ``relaxed`` (the batch chosen jointly,
    :func:`acquire_relaxed`). Same inputs and seed, same round."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: allowed values are {list(RULES)}")
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 20):
        raise ValueError(f"n_boot={n_boot!r}: needs at least 20 replicates for a {level:.0%} interval")
    fit = fit_law(data, warm=warm, grid=grid)
    fit = bootstrap_fit(fit, n_boot, seed=seed, polish=polish)
    pred = predict_target(fit, target, level)
    chosen, scores = acquire_by_rule(rule, fit, cands, target, batch_size=batch_size, budget=budget, exclude=exclude)
    return DesignRound(fit=fit, prediction=pred, scores=scores, chosen=chosen)


def read_rounds(store_dir) -> pd.DataFrame | None:
    """The adaptive rounds of a results store (table :data:`ROUNDS_TABLE`, last row per round, sorted
    by round), or None when there are none."""
    from analysis.store import read_table

    try:
        df = read_table(store_dir, ROUNDS_TABLE)
    except (FileNotFoundError, ValueError):
        return None
    if df is None or df.empty or "round" not in df:
        return None
    return df.sort_values("round").drop_duplicates("round", keep="last").reset_index(drop=True)


def plot_rounds(rounds: pd.DataFrame):
    """The target's interval against cumulative GPU-hours, one point per round: top, the point value
    and its interval; bottom, the interval's relative width (log scale). Rounds whose fit failed
    (no interval) are left out."""
    from matplotlib.figure import Figure

    r = rounds[np.isfinite(pd.to_numeric(rounds.get("hi"), errors="coerce"))] if "hi" in rounds else rounds.iloc[:0]
    fig = Figure(figsize=(6.5, 6.5), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    if r.empty:
        ax.text(0.5, 0.5, "no round has an interval yet", ha="center", va="center", transform=ax.transAxes)
        return fig
    x = r["spent_gpu_hours"].to_numpy(float)
    p, lo, hi = (r[c].to_numpy(float) for c in ("point", "lo", "hi"))
    lvl = float(r["level"].iloc[-1]) if "level" in r else 0.9
    ax.errorbar(x, p, yerr=[p - lo, hi - p], fmt="o-", capsize=3, label=f"point and {lvl:.0%} interval")
    for xi, pi, k in zip(x, p, r["round"]):
        ax.annotate(f"r{int(k)}", (xi, pi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_ylabel(str(r["target"].iloc[-1]) if "target" in r else "target")
    ax.set_title("Adaptive ladder: the target's interval per round")
    ax.legend(fontsize=8)
    ax2.plot(x, r["rel_width"].to_numpy(float), "o-")
    ax2.set_yscale("log")
    ax2.set_xlabel("cumulative GPU-hours spent (" + str(r["cost_source"].iloc[-1] if "cost_source" in r else "") + ")")
    ax2.set_ylabel("relative width of the interval")
    return fig


def rounds_markdown(rounds: pd.DataFrame) -> str:
    """The rounds as a Markdown table (round, GPU-hours spent, runs, point, interval, width, choice, stop)."""
    lines = ["## Adaptive rounds", "", "| round | GPU-hours spent | runs | point | interval | rel. width | chosen | stop |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None or not np.isfinite(float(v)) else f"{float(v):.4g}"  # noqa: E731
    for _, r in rounds.iterrows():
        ch = ", ".join(json.loads(r["chosen"])) if isinstance(r.get("chosen"), str) else ""
        lines.append(f"| {int(r['round'])} | {f(r.get('spent_gpu_hours'))} | {int(r.get('n_runs', 0))} | "
                     f"{f(r.get('point', np.nan))} | [{f(r.get('lo', np.nan))}, {f(r.get('hi', np.nan))}] | "
                     f"{f(r.get('rel_width', np.nan))} | {ch or '-'} | {r.get('stop_reason') or ''} |")
    return "\n".join(lines) + "\n"

