"""Bootstrap percentile intervals cover planted parameters at about the nominal rate."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.fits import CHINCHILLA_GRID, bootstrap_fit, fit_chinchilla, fit_power_law


SMALL_GRID = {"a": [0.0, 2.5], "alpha": [0.5, 1.0], "e": [0.0, 0.5]}  # 8 starts: this test is about the bootstrap


def _power_coverage(draws, n_boot, level, polish, grid=None):
    hits = np.zeros(2)
    for d in range(draws):
        rng = np.random.default_rng(1000 + d)
        C = np.geomspace(1e15, 1e20, 30)
        L = (2.0 + 3e3 * C ** -0.2) * np.exp(rng.normal(0, 0.01, C.size))
        iv = bootstrap_fit(fit_power_law(C, L, grid=grid), n_boot, seed=d, polish=polish).intervals(level)
        hits += [iv.loc["alpha", "lo"] <= 0.2 <= iv.loc["alpha", "hi"], iv.loc["E", "lo"] <= 2.0 <= iv.loc["E", "hi"]]
    return hits / draws


def test_power_law_bootstrap_coverage_fast():
    cov = _power_coverage(draws=30, n_boot=100, level=0.9, polish=False, grid=SMALL_GRID)
    # 30 draws: binomial sd ~0.055 around 0.9; intervals 3x too narrow would cover ~0.4
    assert np.all(cov >= 0.73) and np.all(cov <= 1.0), cov


@pytest.mark.slow
def test_power_law_bootstrap_coverage_nominal():
    cov = _power_coverage(draws=200, n_boot=300, level=0.9, polish=False)
    assert np.all(np.abs(cov - 0.9) <= 0.05), cov  # 2.4 binomial sd


@pytest.mark.slow
def test_approach3_bootstrap_coverage():
    hits, draws = np.zeros(2), 40
    for d in range(draws):
        rng = np.random.default_rng(2000 + d)
        N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 80))
        D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 80))
        L = (1.69 + 406.4 / N ** 0.34 + 410.7 / D ** 0.28) * np.exp(rng.normal(0, 0.01, 80))
        fit = bootstrap_fit(fit_chinchilla(N, D, L, grid={k: v[::2] for k, v in CHINCHILLA_GRID.items()}), 200, seed=d)
        iv = fit.intervals(0.9)
        hits += [iv.loc["alpha", "lo"] <= 0.34 <= iv.loc["alpha", "hi"], iv.loc["beta", "lo"] <= 0.28 <= iv.loc["beta", "hi"]]
    cov = hits / draws
    assert np.all(cov >= 0.75), cov
