"""Linear CKA and temporal autocorrelation (analysis/representation.py) against reference formulas on random data."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import ortho_group

from analysis.representation import (autocorrelation, cka_matrix, decorrelation_lag, hsic_biased, hsic_unbiased,
                                     linear_cka)


def _gram_cka(X, Y):
    """Reference: Kornblith et al. 2019 eq. 4 with explicit Gram matrices and the centring matrix H."""
    K, L = X @ X.T, Y @ Y.T
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda A, B: np.trace(A @ H @ B @ H) / (n - 1) ** 2  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _hsic_u_statistic(K, L):
    """Reference unbiased HSIC: the U-statistic E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq] over distinct
    indices, by brute force."""
    n = len(K)
    idx = range(n)
    t1 = np.mean([K[i, j] * L[i, j] for i, j in itertools.permutations(idx, 2)])
    t2 = np.mean([K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(idx, 4)])
    t3 = np.mean([K[i, j] * L[i, q] for i, j, q in itertools.permutations(idx, 3)])
    return t1 + t2 - 2 * t3


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_biased_cka_matches_the_gram_formula(rng):
    X = rng.normal(size=(30, 7))
    Y = X @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(30, 5))
    assert linear_cka(X, Y) == pytest.approx(_gram_cka(X, Y), rel=1e-10)
    K, L = X @ X.T, Y @ Y.T
    assert linear_cka(X, Y) == pytest.approx(hsic_biased(K, L) / np.sqrt(hsic_biased(K, K) * hsic_biased(L, L)))


def test_unbiased_hsic_is_the_u_statistic(rng):
    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(7, 4))
    K, L = X @ X.T, Y @ Y.T
    assert hsic_unbiased(K, L) == pytest.approx(_hsic_u_statistic(K, L), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_identity_orthogonal_and_scale_invariance(rng, debiased):
    X = rng.normal(size=(40, 6))
    Y = np.tanh(X @ rng.normal(size=(6, 9)))
    c = linear_cka(X, Y, debiased=debiased)
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    Q = ortho_group.rvs(9, random_state=1)
    assert linear_cka(X, Y @ Q, debiased=debiased) == pytest.approx(c, rel=1e-10)
    assert linear_cka(3.7 * X, Y, debiased=debiased) == pytest.approx(c, rel=1e-10)
    assert linear_cka(X + 5.0, Y, debiased=debiased) == pytest.approx(c, rel=1e-10)  # centring
    # not invariant to a general invertible linear map (what separates CKA from CCA)
    A = np.diag([10.0, 1, 1, 1, 1, 0.1])
    assert abs(linear_cka(X @ A, Y, debiased=debiased) - c) > 1e-3


def test_independent_noise_biased_vs_debiased(rng):
    """Independent wide representations: biased CKA is inflated well above 0, debiased stays near 0."""
    X, Y = rng.normal(size=(40, 400)), rng.normal(size=(40, 400))
    assert linear_cka(X, Y) > 0.8
    assert abs(linear_cka(X, Y, debiased=True)) < 0.1


def test_cka_matrix_and_errors(rng):
    X = rng.normal(size=(12, 4))
    M = cka_matrix([X, 2 * X, rng.normal(size=(12, 3))])
    assert M.shape == (3, 3) and np.allclose(M, M.T) and np.allclose(np.diag(M), 1)
    assert M[0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(X, X[:5])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(X, np.ones((12, 2)))


def test_autocorrelation_of_ar1_and_white_noise(rng):
    phi, T, N = 0.8, 400, 50
    e = rng.normal(size=(N, T, 3))
    x = np.zeros_like(e)
    for t in range(1, T):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    r = autocorrelation(x, 5)
    assert r[0] == pytest.approx(1.0)
    assert np.allclose(r, phi ** np.arange(6), atol=0.03)
    assert decorrelation_lag(r) == pytest.approx(-1 / np.log(phi), abs=0.3)  # phi^k = 1/e
    w = autocorrelation(rng.normal(size=(N, T, 3)), 3)
    assert np.all(np.abs(w[1:]) < 0.02)


def test_autocorrelation_matches_np_correlate_and_skips_constants(rng):
    s = rng.normal(size=16)
    c = s - s.mean()
    ref = np.correlate(c, c, "full")[15:] / (c @ c)
    x = np.stack([s, np.full(16, 3.0)], axis=1)  # second feature constant: left out
    assert np.allclose(autocorrelation(x), ref, atol=1e-12)
    with pytest.raises(ValueError, match="constant"):
        autocorrelation(np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="max_lag"):
        autocorrelation(x, 16)


def test_decorrelation_lag_edges():
    assert decorrelation_lag([1.0, 0.5, 0.2]) == pytest.approx(1 + (0.5 - np.exp(-1)) / 0.3)
    assert decorrelation_lag([1.0, 0.9]) == float("inf")
