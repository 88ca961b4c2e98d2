"""Representation analyses (the seed report's Figure 5, issue #27 item 4): linear CKA and temporal autocorrelation.

Pure numpy; ``study/represent.py`` extracts the embeddings from models and calls these.

* :func:`linear_cka` -- linear centred kernel alignment (Kornblith et al., 2019, "Similarity of Neural Network
  Representations Revisited", eq. 4 with a linear kernel): for two representations of the *same* ``n`` examples,
  ``X [n, p]`` and ``Y [n, q]``, ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``,
  ``L = Y Y^T``. ``debiased=False`` (default) uses the biased HSIC estimator ``tr(K H L H) / (n-1)^2``
  (the paper's; computed from centred features as ``||Y_c^T X_c||_F^2``); ``debiased=True`` uses the unbiased
  HSIC estimator of Song et al. (2012), as in Kornblith's reference code (``cka(..., debiased=True)``), which removes
  the upward bias of the biased CKA when ``p`` or ``q`` is large against ``n``. Both are 1 for ``X == Y``, invariant
  to orthogonal transforms and isotropic scaling of either argument, and not invariant to general invertible
  linear maps.
* :func:`autocorrelation` -- the mean temporal autocorrelation function of many series (features x time): how
  smooth a signal is over frames. :func:`decorrelation_lag` summarises a curve by the lag at which it first falls
  below ``1/e``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["linear_cka", "cka_matrix", "autocorrelation", "decorrelation_lag", "hsic_biased", "hsic_unbiased"]


def _as_2d(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D [examples, features], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} has non-finite values")
    return X


def hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    """Biased HSIC estimator ``tr(K H L H) / (n-1)^2`` of two ``n x n`` Gram matrices (``H`` = centring matrix)."""
    n = K.shape[0]
    H = np.eye(n) - 1.0 / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al., 2012, eq. 5) of two ``n x n`` Gram matrices; needs ``n >= 4``."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    KL = K @ L
    s = np.trace(KL) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2.0 * KL.sum() / (n - 2)
    return float(s) / (n * (n - 3))


def linear_cka(X, Y, *, debiased: bool = False) -> float:
    """Linear CKA between ``X [n, p]`` and ``Y [n, q]`` (rows = the same examples in the same order).

    ``debiased=False``: biased HSIC (Kornblith et al. 2019), in [0, 1]. ``debiased=True``: unbiased HSIC (Song et
    al. 2012), close to the population value for small ``n``; it can be slightly negative. A representation
    that is constant over examples has no defined CKA: ``ValueError``.
    """
    X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must describe the same examples: {X.shape[0]} vs {Y.shape[0]} rows")
    if X.shape[0] < 2:
        raise ValueError("CKA needs at least 2 examples")
    if debiased:
        K, L = X @ X.T, Y @ Y.T
        kl, kk, ll = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
    else:
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        kl = float(np.linalg.norm(Yc.T @ Xc) ** 2)
        kk = float(np.linalg.norm(Xc.T @ Xc) ** 2)
        ll = float(np.linalg.norm(Yc.T @ Yc) ** 2)
    if kk <= 0 or ll <= 0:
        raise ValueError("CKA is undefined: a representation is constant over the examples (zero self-similarity)")
    return kl / np.sqrt(kk * ll)


def cka_matrix(reps: Sequence, *, debiased: bool = False) -> np.ndarray:
    """Symmetric matrix of :func:`linear_cka` between every pair of representations (each ``[n, p_i]``)."""
    m = len(reps)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = linear_cka(reps[i], reps[j], debiased=debiased)
    if not debiased:
        np.fill_diagonal(out, 1.0)
    else:
        for i in range(m):
            out[i, i] = linear_cka(reps[i], reps[i], debiased=True)
    return out


def autocorrelation(series_NTF, max_lag: int | None = None, *, min_std: float = 1e-12) -> np.ndarray:
    """Mean temporal autocorrelation ``r(k), k = 0..max_lag`` of series ``[N, T, F]`` (or ``[T, F]``).

    Each of the ``N x F`` series (a token position's embedding channel, a voxel) is de-meaned over its own
    ``T`` frames; ``r_i(k) = sum_t x_t x_{t+k} / sum_t x_t^2`` (the standard biased estimator, so ``r(0) = 1`` and the
    curve is a positive semi-definite sequence); series with std below ``min_std`` (constant: background voxels)
    are left out, and the curve is the mean of ``r_i`` over the rest. ``max_lag`` defaults to ``T - 1``.
    """
    x = np.asarray(series_NTF, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"series must be [N, T, F] or [T, F], got shape {x.shape}")
    N, T, F = x.shape
    if T < 2:
        raise ValueError(f"autocorrelation needs at least 2 frames, got T={T}")
    max_lag = T - 1 if max_lag is None else int(max_lag)
    if not 0 <= max_lag < T:
        raise ValueError(f"max_lag={max_lag} must be in [0, T-1={T - 1}]")
    x = np.moveaxis(x, 1, 2).reshape(N * F, T)  # one row per series
    x = x - x.mean(1, keepdims=True)
    keep = x.std(1) > min_std
    if not keep.any():
        raise ValueError("every series is constant: no autocorrelation")
    x = x[keep]
    denom = (x * x).sum(1)
    r = np.empty(max_lag + 1)
    for k in range(max_lag + 1):
        r[k] = float(np.mean((x[:, : T - k] * x[:, k:]).sum(1) / denom))
    return r


def decorrelation_lag(curve, threshold: float = float(np.exp(-1.0))) -> float:
    """First lag (linearly interpolated, in the curve's lag units: frames) at which ``curve`` falls below
    ``threshold`` (default ``1/e``); ``inf`` if it never does within the curve. Larger = smoother."""
    c = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return float("inf")
    k = int(below[0])
    if k == 0:
        return 0.0
    return float(k - 1 + (c[k - 1] - threshold) / (c[k - 1] - c[k]))
