"""Scaling-law fits: objective against a float64 reference, planted-parameter recovery, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import huber, logsumexp

from analysis.fits import (CHINCHILLA_GRID, FitError, LogLSEObjective, bootstrap_fit, compute_optimal,
                           extrapolation_check, fit_chinchilla, overtraining, fit_data_constrained, fit_isoflop,
                           fit_power_law, pareto_frontier)

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. (2022) approach-3 values


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def planted(n=60, noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    return N, D, law(N, D) * np.exp(rng.normal(0, noise, n))


def reference_objective(theta, N, D, L, delta=1e-3, reduction="sum", w=None):
    """Plain float64 loop over points with SciPy's logsumexp and huber (independent of the fast code)."""
    a, b, alpha, beta, e = theta
    vals = []
    for n_, d_, l_ in zip(N, D, L):
        r = logsumexp([a - alpha * np.log(n_), b - beta * np.log(d_), e]) - np.log(l_)
        vals.append(huber(delta, r) if delta is not None else 0.5 * r * r)
    vals = np.array(vals) * (1.0 if w is None else w)
    return vals.sum() / (1.0 if reduction == "sum" else (len(L) if w is None else w.sum()))


@pytest.mark.parametrize("delta,reduction", [(1e-3, "sum"), (None, "mean"), (0.05, "mean")])
def test_objective_and_gradient_match_float64_reference(delta, reduction):
    N, D, L = planted(n=13, noise=0.05)
    rng = np.random.default_rng(1)
    thetas = np.column_stack([rng.uniform(0, 10, 7), rng.uniform(0, 10, 7), rng.uniform(0, 1, 7),
                              rng.uniform(0, 1, 7), rng.uniform(-1, 1, 7)])
    thetas[3, 0] = 700.0  # exp(a) overflows without the max shift: the shifted path must take over
    thetas[4, :] = [-800.0, -790.0, 0.1, 0.1, -700.0]  # every term underflows without the shift
    w = rng.integers(0, 3, size=13).astype(float)
    obj = LogLSEObjective(np.column_stack([np.log(N), np.log(D)]), np.log(L), delta=delta, reduction=reduction,
                          weights=np.tile(w, (7, 1)))
    f, g = obj(thetas, np.arange(7))
    for i, th in enumerate(thetas):
        assert f[i] == pytest.approx(reference_objective(th, N, D, L, delta, reduction, w), rel=1e-12, abs=1e-15)
        h = 1e-6
        fd = [(reference_objective(th + h * np.eye(5)[j], N, D, L, delta, reduction, w)
               - reference_objective(th - h * np.eye(5)[j], N, D, L, delta, reduction, w)) / (2 * h) for j in range(5)]
        np.testing.assert_allclose(g[i], fd, rtol=1e-5, atol=1e-9)


def test_approach3_recovers_planted_parameters_full_grid():
    N, D, L = planted(n=40, noise=0.005)
    fit = fit_chinchilla(N, D, L)
    assert fit.n_starts == 4500 and fit.converged
    p = fit.params
    assert p["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert p["beta"] == pytest.approx(TRUE["beta"], abs=0.02)
    assert p["E"] == pytest.approx(TRUE["E"], rel=0.03)
    # the fitted surface reproduces the noise-free law within the noise level
    assert np.max(np.abs(fit.predict(N, D) / law(N, D) - 1)) < 0.01
    assert fit.objective == pytest.approx(reference_objective(fit.theta, N, D, L), rel=1e-10)


def test_batched_reaches_the_same_optimum_as_scipy_loop():
    N, D, L = planted(n=40, noise=0.02, seed=3)
    grid = {k: v[::2] for k, v in CHINCHILLA_GRID.items()}  # 3*3*3*3*3 = 243 starts: the reference loop is slow
    fast = fit_chinchilla(N, D, L, grid=grid)
    ref = fit_chinchilla(N, D, L, grid=grid, method="scipy")
    assert fast.n_starts == ref.n_starts == 243
    assert fast.objective <= ref.objective * (1 + 1e-9)
    np.testing.assert_allclose(fast.theta, ref.theta, atol=1e-5)


def test_power_law_recovery_and_bootstrap_interval():
    rng = np.random.default_rng(4)
    C = np.geomspace(1e15, 1e20, 25)
    L = (2.0 + 3e3 * C ** -0.2) * np.exp(rng.normal(0, 0.003, C.size))
    fit = fit_power_law(C, L)
    assert fit.params["alpha"] == pytest.approx(0.2, abs=0.02)
    assert fit.params["E"] == pytest.approx(2.0, rel=0.03)
    assert fit.params["A"] == pytest.approx(3e3, rel=0.5)
    np.testing.assert_allclose(fit.predict(C), 2.0 + 3e3 * C ** -0.2, rtol=0.005)
    bootstrap_fit(fit, 200, seed=0)
    iv = fit.intervals()
    assert iv.loc["alpha", "lo"] < 0.2 < iv.loc["alpha", "hi"]
    assert 0 < iv.loc["alpha", "se"] < 0.05
    b2 = bootstrap_fit(fit_power_law(C, L), 200, seed=0).bootstrap
    np.testing.assert_allclose(b2["alpha"], fit.bootstrap["alpha"])  # seeded: same replicates


def test_bootstrap_chinchilla_and_compute_optimal():
    N, D, L = planted(n=60, noise=0.01, seed=5)
    fit = bootstrap_fit(fit_chinchilla(N, D, L, grid={k: v[::2] for k, v in CHINCHILLA_GRID.items()}), 100, seed=1)
    iv = fit.intervals()
    assert iv.loc["alpha", "lo"] <= fit.params["alpha"] <= iv.loc["alpha", "hi"]
    co = compute_optimal(fit, [1e20, 1e22])
    np.testing.assert_allclose(6 * co.N_opt * co.D_opt, co.C, rtol=1e-10)
    # the allocation minimizes the fitted loss along the IsoFLOP curve C = 6 N D
    for C, n_opt in zip(co.C, co.N_opt):
        Ns = n_opt * np.geomspace(0.5, 2, 201)
        Ls = fit.predict(Ns, C / (6 * Ns))
        assert abs(np.log(Ns[np.argmin(Ls)] / n_opt)) < np.log(2) / 100 + 1e-9
    assert (co.N_opt_lo <= co.N_opt).all() and (co.N_opt <= co.N_opt_hi).all()
    assert np.all(np.diff(co.tokens_per_param) != 0)
    # over-training: at the optimal tokens per parameter the loss is the optimum; 10x more costs loss
    ot = overtraining(fit, co.C[0], [co.tokens_per_param[0], 10 * co.tokens_per_param[0]])
    assert ot.L[0] == pytest.approx(co.L_opt[0], rel=1e-12) and ot.N[0] == pytest.approx(co.N_opt[0], rel=1e-12)
    assert ot.L[1] > ot.L[0]


def test_extrapolation_check_on_planted_law():
    N, D, L = planted(n=50, noise=0.002, seed=6)
    out = extrapolation_check("chinchilla", dict(N=N, D=D, L=L), n_holdout=3,
                              grid={k: v[::2] for k, v in CHINCHILLA_GRID.items()})
    assert out["n_holdout"] == 3 and out["n_train"] == 47
    assert out["mean_abs_rel_error"] < 0.01


def test_isoflop_recovers_planted_exponent():
    p = dict(E=1.5, A=400.0, B=400.0, alpha=0.3, beta=0.3)  # alpha = beta: N_opt ~ C**0.5 exactly
    rng = np.random.default_rng(7)
    rows = []
    for C in [1e18, 1e19, 1e20, 1e21, 1e22]:
        n_star = (C / 6) ** 0.5
        for N in n_star * np.geomspace(0.25, 4, 9):
            rows.append((C, N, law(N, C / (6 * N), p) * np.exp(rng.normal(0, 1e-4))))
    C, N, L = map(np.array, zip(*rows))
    res = fit_isoflop(C, N, L, n_boot=100, seed=0)
    assert res.exponent == pytest.approx(0.5, abs=0.01)
    assert res.exponent_ci[0] <= res.exponent <= res.exponent_ci[1]
    np.testing.assert_allclose(res.vertices.opt, (res.vertices.C / 6) ** 0.5, rtol=0.03)
    resw = fit_isoflop(C, N, L, weighted=True)
    assert resw.exponent == pytest.approx(res.exponent, abs=1e-6)  # equal run counts: weights change nothing


def test_data_constrained_recovers_half_life():
    rng = np.random.default_rng(8)
    Rs = 15.0
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 80))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 80))
    U = np.where(np.arange(80) < 40, D, D / rng.uniform(2, 60, 80))
    R = D / U - 1
    Deff = U + U * Rs * (1 - np.exp(-R / Rs))
    L = law(N, Deff) * np.exp(rng.normal(0, 1e-3, 80))
    single = D <= U
    base = fit_chinchilla(N[single], D[single], L[single], grid={k: v[::2] for k, v in CHINCHILLA_GRID.items()})
    out = fit_data_constrained(N, D, U, L, base=base)
    assert out["params"]["R_star"] == pytest.approx(Rs, rel=0.25)
    assert out["params"]["beta"] == pytest.approx(TRUE["beta"], abs=0.03)


def test_pareto_frontier():
    x = np.array([3.0, 1.0, 2.0, 4.0, 5.0])
    L = np.array([2.0, 5.0, 3.0, 2.5, 1.0])
    assert pareto_frontier(x, L).tolist() == [1, 2, 0, 4]


def test_bad_input_messages():
    N, D, L = planted(n=20)
    with pytest.raises(FitError, match="non-positive"):
        fit_chinchilla(N, D, np.r_[L[:-1], -1.0])
    with pytest.raises(FitError, match="missing or non-finite"):
        fit_chinchilla(np.r_[N[:-1], np.nan], D, L)
    with pytest.raises(FitError, match="at least 6 points"):
        fit_chinchilla(N[:5], D[:5], L[:5])
    with pytest.raises(FitError, match="at least 4 points"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.0, 1.5])
    with pytest.raises(FitError, match="at least 3 compute budgets"):
        fit_isoflop([1e18] * 4 + [1e19] * 4, [1, 2, 3, 4] * 2, [2.0, 1.0, 1.0, 2.0] * 2)
    with pytest.raises(FitError, match="opens downward"):
        fit_isoflop([1e18] * 3 + [1e19] * 3 + [1e20] * 3, [1, 2, 4] * 3, [1.0, 2.0, 1.0] * 2 + [2.0, 1.0, 2.0])
    with pytest.raises(FitError, match="did not converge"):
        fit_chinchilla(N, D, L, grid={"a": [5.0], "b": [5.0], "e": [0.5], "alpha": [0.5], "beta": [0.5]},
                       method="scipy", scipy_options={"maxiter": 2})
    with pytest.raises(ValueError, match="reduction"):
        fit_chinchilla(N, D, L, reduction="median")
    with pytest.raises(ValueError, match="grid is missing"):
        fit_chinchilla(N, D, L, grid={"a": [0.0]})
