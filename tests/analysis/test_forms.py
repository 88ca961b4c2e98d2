"""The registry of fit forms, the objectives, and each form recovering planted parameters from noisy data."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from scipy.special import huber, logsumexp, ndtr

from analysis.bootstrap import bootstrap_fit
from analysis.cli import build_parser, main
from analysis.fits import (CHINCHILLA_GRID, FitError, compute_optimal, extrapolation_check, fit_chinchilla, fit_form,
                           fit_isoflop, fit_loglog, fit_muennighoff)
from analysis.forms import FORMS, DataConstrainedForm, Form, cli_commands, get_form, register
from analysis.objective import LogLSEObjective, Objective, ReparamObjective, ResidualObjective
from analysis._threads import THREAD_ENV, limit_threads

HOFF = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. (2022) approach-3 values
HALF_GRID = {k: v[::2] for k, v in CHINCHILLA_GRID.items()}


def hoff(N, D, p=HOFF):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


# ------------------------------------------------------------------ the registry
def test_registry_is_the_list_of_forms():
    assert {"chinchilla", "power", "chinchilla-shared", "data-constrained", "loglog"} <= set(FORMS)
    for name, cls in FORMS.items():
        assert cls.name == name and cls.title and cls.paper and cls.variables and cls.param_names
        assert cls.command in cli_commands()
        if not cls.closed_form:
            assert set(cls.grid) == set(cls.param_names), name  # a default start for every raw parameter
    # the CLI's choices and flags come from the registry
    fit_cmd = build_parser()._subparsers._group_actions[0].choices["fit"]
    form_arg = next(a for a in fit_cmd._actions if a.dest == "form")
    assert set(form_arg.choices) == set(cli_commands()) | {"isoflop"}
    flags = {a.dest for a in fit_cmd._actions}
    assert {c.flag for c in FORMS.values() if c.flag} <= flags
    with pytest.raises(ValueError, match="allowed values are"):
        get_form("kaplan")
    with pytest.raises(ValueError, match="allowed values are"):
        Objective("l1")


def test_adding_a_form_is_one_class():
    """A Kaplan-style pure power law ``L = (N_c / N)**alpha_N``, written as one class, fits and bootstraps
    through the same machinery (then leaves the registry)."""

    @register
    class KaplanN(Form):
        name, title, paper, command = "kaplan-n", "L = (N_c/N)^alpha_N", "Kaplan et al. 2020", "kaplan-n"
        variables, param_names, exponents, se_params, asymptote = ("N",), ("log_nc", "alpha_n"), {"alpha_n": "N"}, (), None
        grid = {"log_nc": np.array([10.0, 20.0, 30.0]), "alpha_n": np.array([0.05, 0.2])}
        min_points = 3

        def objective(self, data, objective):
            lN = np.log(data["N"])
            return ResidualObjective(lambda th: th[:, 1:2] * (th[:, :1] - lN[None, :]), np.log(data["L"]), objective, 2), 1.0

        def named(self, theta, x_scale=1.0):
            return dict(N_c=np.exp(theta[0]), alpha_n=theta[1], log_nc=theta[0])

        def predict(self, p, N):
            return (p["N_c"] / np.asarray(N, float)) ** p["alpha_n"]

    try:
        N = np.geomspace(1e6, 1e9, 9)
        L = (8.8e13 / N) ** 0.076 * np.exp(np.random.default_rng(0).normal(0, 1e-3, 9))
        f = bootstrap_fit(fit_form("kaplan-n", dict(N=N, L=L)), 50, seed=0)
        assert f.params["alpha_n"] == pytest.approx(0.076, abs=0.003)
        assert f.valid and "kaplan-n" in cli_commands()
    finally:
        FORMS.pop("kaplan-n")


# ------------------------------------------------------------------ objectives against float64 references
def _planted(n=13, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n)); D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    return N, D, hoff(N, D) * np.exp(rng.normal(0, noise, n))


def _ref(th, N, D, L, name, delta=1e-3, w=None):
    """Plain loop over points with SciPy's logsumexp and huber (independent of the fast code)."""
    a, b, al, be, e = th[:5]
    w = np.ones(len(L)) if w is None else w
    tot = 0.0
    for n_, d_, l_, w_ in zip(N, D, L, w):
        lp = logsumexp([a - al * np.log(n_), b - be * np.log(d_), e])
        if name == "lsq":
            tot += w_ * 0.5 * (np.exp(lp) - l_) ** 2
        elif name == "huber-mle":
            s = np.exp(th[5])
            logz = np.log(np.sqrt(2 * np.pi) * (1 - 2 * ndtr(-delta)) + 2 * np.exp(-delta ** 2 / 2) / delta)
            tot += w_ * (huber(delta, (np.log(l_) - lp) / s) + logz + th[5])
        else:
            tot += w_ * huber(delta, lp - np.log(l_))
    return tot


@pytest.mark.parametrize("name", ["lsq", "huber-mle"])
def test_new_objectives_and_gradients_match_reference(name):
    N, D, L = _planted()
    rng = np.random.default_rng(1)
    ob = Objective(name)
    P = 5 + len(ob.extra_params)
    th = np.column_stack([rng.uniform(2, 8, 5), rng.uniform(2, 8, 5), rng.uniform(0.1, 0.6, 5), rng.uniform(0.1, 0.6, 5),
                          rng.uniform(0, 1, 5)] + ([rng.uniform(-5, -1, 5)] if P == 6 else []))
    w = rng.integers(0, 3, 13).astype(float)
    obj = LogLSEObjective.for_objective(np.column_stack([np.log(N), np.log(D)]), np.log(L), ob, weights=np.tile(w, (5, 1)))
    f, g = obj(th, np.arange(5))
    for i in range(5):
        assert f[i] == pytest.approx(_ref(th[i], N, D, L, name, w=w), rel=1e-11)
        h = 1e-6
        fd = [(_ref(th[i] + h * np.eye(P)[j], N, D, L, name, w=w) - _ref(th[i] - h * np.eye(P)[j], N, D, L, name, w=w))
              / (2 * h) for j in range(P)]
        np.testing.assert_allclose(g[i], fd, rtol=2e-5, atol=1e-7)


def test_reparam_ties_exponents():
    N, D, L = _planted()
    inner = LogLSEObjective(np.column_stack([np.log(N), np.log(D)]), np.log(L))
    M = np.zeros((5, 4)); M[0, 0] = M[1, 1] = M[2, 2] = M[3, 2] = M[4, 3] = 1
    rep = ReparamObjective(inner, M)
    th = np.array([[5.0, 6.0, 0.3, 0.4]])
    f, g = rep(th)
    f2, g2 = inner(np.array([[5.0, 6.0, 0.3, 0.3, 0.4]]))
    assert f[0] == f2[0] and g[0, 2] == pytest.approx(g2[0, 2] + g2[0, 3])


# ------------------------------------------------------------------ planted parameters, one form at a time
def test_lsq_and_huber_mle_recover_hoffmann():
    N, D, L = _planted(n=60, noise=0.01, seed=5)
    lsq = fit_chinchilla(N, D, L, grid=HALF_GRID, objective="lsq")
    mle = fit_chinchilla(N, D, L, grid=HALF_GRID, objective="huber-mle")
    for f in (lsq, mle):
        assert f.params["alpha"] == pytest.approx(HOFF["alpha"], abs=0.05), f.fit_objective
        assert f.params["beta"] == pytest.approx(HOFF["beta"], abs=0.05), f.fit_objective
        # noise SD 1%: the fitted surface stays within 2 noise SDs of the noise-free law at every point
        assert np.max(np.abs(f.predict(N, D) / hoff(N, D) - 1)) < 0.02
    # with |r| / sigma >> delta every point sits in the Huber tails, -log p = delta |r| / sigma + log sigma + c,
    # so the MLE of the scale is sigma = delta * mean |r| (Epoch's density, delta = 1e-3, behaves the same)
    r = np.log(mle.predict(N, D)) - np.log(L)
    assert mle.params["sigma"] == pytest.approx(1e-3 * np.mean(np.abs(r)), rel=0.01)
    assert 0.005 < np.mean(np.abs(r)) < 0.012  # normal noise of SD 0.01: E|r| = 0.008
    assert mle.to_dict()["fit_objective"] == "huber-mle" and mle.valid


def _gadre_design(p, noise, seed):
    """Gadre et al.'s default design: four sizes at M = D/N = 20 and the smallest at M = 320."""
    N = np.array([1.1e7, 7.9e7, 1.54e8, 4.12e8, 1.1e7])
    D = N * np.array([20, 20, 20, 20, 320])
    L = (p["E"] + p["A"] / N ** p["eta"] + p["B"] / D ** p["eta"]) * np.exp(np.random.default_rng(seed).normal(0, noise, 5))
    return N, D, L


def test_shared_exponent_recovers_planted_from_five_points(tmp_path, capsys):
    p = dict(E=1.9, A=80.0, B=350.0, eta=0.25)
    N, D, L = _gadre_design(p, 0.002, 0)
    f = fit_chinchilla(N, D, L, shared_exponent=True)
    assert f.kind == "chinchilla-shared" and f.fit_objective == "lsq" and len(f.theta) == 4 and f.n_starts == 128
    assert f.params["eta"] == pytest.approx(p["eta"], abs=0.05)
    # what the recipe is for: the 32x over-trained 1.4B and the 6.9B compute-optimal runs
    Nb, Db = np.array([1.4e9, 6.9e9]), np.array([9e11, 1.38e11])
    truth = p["E"] + p["A"] / Nb ** p["eta"] + p["B"] / Db ** p["eta"]
    np.testing.assert_allclose(f.predict(Nb, Db), truth, rtol=0.01)
    assert len(compute_optimal(f, [1e21])) == 1  # the shared exponent stands for alpha and beta
    with pytest.raises(FitError, match="at least 6 points"):
        fit_chinchilla(N, D, L)  # the 5-parameter form refuses 5 points
    pd.DataFrame(dict(N=N, D=D, L=L)).to_csv(tmp_path / "g.csv", index=False)
    assert main(["fit", "chinchilla", str(tmp_path / "g.csv"), "--params", "N", "--tokens", "D", "--loss", "L",
                 "--shared-exponent", "--objective", "lsq", "--predict", "1.4e9:9e11,6.9e9:1.38e11", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "chinchilla-shared" and set(out["params"]) >= {"E", "A", "B", "eta"}
    assert [q["N"] for q in out["predictions"]] == [1.4e9, 6.9e9]
    np.testing.assert_allclose([q["L"] for q in out["predictions"]], truth, rtol=0.01)


MUENNIGHOFF_BASE = HOFF  # any positive base works for planting


def _repeated_runs(rd, rn, noise, seed, base=MUENNIGHOFF_BASE):
    """Runs on U unique tokens repeated up to ~60 epochs, sizes past the compute-optimal size of U."""
    rng = np.random.default_rng(seed)
    form = DataConstrainedForm(base)
    rows = []
    for U in (1e9, 4e9, 1.6e10):
        for N in np.geomspace(1e8, 1e10, 5):
            for epochs in (1, 2, 4, 10, 25, 60):
                rows.append((N, U * epochs, U))
    N, D, U = map(np.array, zip(*rows))
    L = form.predict(dict(r_d_star=rd, r_n_star=rn), N, D, U) * np.exp(rng.normal(0, noise, len(N)))
    return N, D, U, L


def test_data_constrained_recovers_planted_r_star(tmp_path, capsys):
    N, D, U, L = _repeated_runs(15.4, 5.3, 1e-3, 0)
    f = fit_muennighoff(N, D, U, L, base=MUENNIGHOFF_BASE)
    assert f.params["r_d_star"] == pytest.approx(15.4, rel=0.1)
    assert f.params["r_n_star"] == pytest.approx(5.3, rel=0.1)
    assert f.valid, f.warnings
    # U_N: the compute-optimal size of U tokens; runs below it have no excess parameters
    form = DataConstrainedForm(MUENNIGHOFF_BASE)
    Np, Dp = form.effective(np.array([1e6]), np.array([1e9]), np.array([1e9]), 15.4, 5.3)
    assert Np[0] == 1e6 and Dp[0] == 1e9  # one epoch of a small model: nothing discounted
    pd.DataFrame(dict(N=N, D=D, U=U, L=L)).to_csv(tmp_path / "dc.csv", index=False)
    base = ",".join(str(MUENNIGHOFF_BASE[k]) for k in ("A", "B", "E", "alpha", "beta"))
    assert main(["fit", "data-constrained", str(tmp_path / "dc.csv"), "--params", "N", "--tokens", "D", "--unique", "U",
                 "--loss", "L", "--base", base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["r_d_star"] == pytest.approx(f.params["r_d_star"], rel=1e-6)
    assert out["r_n_star"] == pytest.approx(f.params["r_n_star"], rel=1e-6)
    assert main(["fit", "data-constrained", str(tmp_path / "dc.csv"), "--params", "N", "--tokens", "D", "--unique", "U",
                 "--loss", "L"]) == 2
    assert "--base A,B,E,alpha,beta" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected 5 comma-separated"):
        DataConstrainedForm.parse_base("1,2,3")


def test_loglog_weighted_recovers_exponent_and_interval(tmp_path, capsys):
    rng = np.random.default_rng(3)
    C = np.geomspace(1e16, 1e19, 9)
    std = np.linspace(0.02, 0.3, 9)  # the large budgets' optima are the uncertain ones
    n_opt = 0.1 * C ** 0.5 * np.exp(rng.normal(0, std))
    f = fit_loglog(C, n_opt, weights=1 / std ** 2)
    d = f.to_dict()
    assert d["exponent"] == pytest.approx(0.5, abs=3 * d["exponent_se"])
    assert d["exponent_ci"][0] < 0.5 < d["exponent_ci"][1] and d["interval_method"] == "t"
    # same numbers as a plain weighted least-squares solve
    X = np.column_stack([np.log(C), np.ones(9)]) * np.sqrt(1 / std ** 2)[:, None]
    ref = np.linalg.lstsq(X, np.log(n_opt) * np.sqrt(1 / std ** 2), rcond=None)[0]
    assert d["exponent"] == pytest.approx(ref[0], rel=1e-10)
    b = bootstrap_fit(fit_loglog(C, n_opt, weights=1 / std ** 2), 300, seed=0).to_dict()
    assert b["interval_method"] == "bootstrap" and b["exponent_ci"][0] < b["exponent"] < b["exponent_ci"][1]
    pd.DataFrame(dict(C=C, n=n_opt, w=1 / std ** 2)).to_csv(tmp_path / "o.csv", index=False)
    assert main(["fit", "power", str(tmp_path / "o.csv"), "--x", "C", "--y", "n", "--weights", "w", "--loglog",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exponent"] == pytest.approx(d["exponent"]) and out["exponent_ci"] == pytest.approx(d["exponent_ci"])
    assert main(["fit", "power", str(tmp_path / "o.csv"), "--x", "C", "--y", "n", "--weights", "w", "--loglog"]) == 0
    assert "exponent interval (95%, t): [" in capsys.readouterr().out


def test_extrapolation_check_takes_any_registered_form():
    p = dict(E=1.9, A=80.0, B=350.0, eta=0.25)
    rng = np.random.default_rng(2)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e9), 30)); D = N * rng.uniform(10, 300, 30)
    L = p["E"] + p["A"] / N ** p["eta"] + p["B"] / D ** p["eta"]
    out = extrapolation_check("chinchilla-shared", dict(N=N, D=D, L=L), n_holdout=2)
    assert out["mean_abs_rel_error"] < 1e-3 and out["valid"]


# ------------------------------------------------------------------ approach 2 robustness
def _iso_rows(budgets, bad=None, seed=0, noise=1e-4):
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        for N in (C / 6) ** 0.5 * np.geomspace(0.25, 4, 7):
            L = hoff(N, C / (6 * N), dict(E=1.5, A=400.0, B=400.0, alpha=0.3, beta=0.3))
            if C == bad:
                L = 3.0 - 0.01 * (np.log(N) - np.log((C / 6) ** 0.5)) ** 2  # no interior minimum
            rows.append((C, N, L * np.exp(rng.normal(0, noise))))
    return map(np.array, zip(*rows))


def test_isoflop_drops_bad_budgets_and_names_them(tmp_path, capsys):
    C, N, L = _iso_rows([1e18, 1e19, 1e20, 1e21, 1e22], bad=1e20)
    with pytest.raises(FitError, match="C=1e\\+20: the parabola of loss in log N opens downward"):
        fit_isoflop(C, N, L)
    res = fit_isoflop(C, N, L, drop_bad_budgets=True)
    assert [d["C"] for d in res.dropped_budgets] == [1e20] and "opens downward" in res.dropped_budgets[0]["reason"]
    assert len(res.vertices) == 4 and res.exponent == pytest.approx(0.5, abs=0.01) and res.valid
    pd.DataFrame(dict(C=C, N=N, L=L)).to_csv(tmp_path / "iso.csv", index=False)
    args = ["fit", "isoflop", str(tmp_path / "iso.csv"), "--flops", "C", "--params", "N", "--loss", "L"]
    assert main(args) == 2
    assert main(args + ["--drop-bad-budgets", "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "dropped_budgets:" in text and "1e+20" in text and "opens downward" in text
    assert "exponent interval (95%, bootstrap): [" in text and " of 50 replicates failed (" in text


def test_isoflop_bootstrap_reports_failures_instead_of_aborting():
    # every budget's profile is nearly flat and noisy: many resamples lose their minimum
    C, N, L = _iso_rows([1e18, 1e19, 1e20, 1e21], noise=0.004, seed=1)
    res = fit_isoflop(C, N, L, n_boot=200, seed=0)
    d = res.to_dict()
    assert d["bootstrap_attempted"] == 200 and 0 < d["n_bootstrap_failed"] < 200
    assert d["bootstrap_failed_fraction"] == pytest.approx(d["n_bootstrap_failed"] / 200)
    if d["bootstrap_failed_fraction"] > 0.05:
        assert any(w.startswith(f"bootstrap: {d['n_bootstrap_failed']} of 200") for w in d["warnings"])


# ------------------------------------------------------------------ BLAS threads pinned during bootstraps
def test_limit_threads_uses_threadpoolctl_or_env(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info

    with limit_threads(1) as how:
        assert how == "threadpoolctl"
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    import builtins
    real_import = builtins.__import__

    def no_tpc(name, *a, **k):
        if name == "threadpoolctl":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tpc)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with limit_threads(2) as how:
        assert how == "env" and all(os.environ[k] == "2" for k in THREAD_ENV)
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    with pytest.raises(ValueError, match="threads="):
        with limit_threads(0):
            pass
