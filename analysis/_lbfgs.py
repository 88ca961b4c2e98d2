"""Batched L-BFGS in NumPy: many independent starts (or bootstrap replicates) optimized at once.

The objective is evaluated for a whole batch of parameter vectors in one vectorized call, so the
per-iteration Python overhead is paid once for all starts instead of once per start. Each start
keeps its own curvature history, step length and convergence flag; converged starts leave the
active set. The result is meant to be polished by :func:`scipy.optimize.minimize` (L-BFGS-B),
which then confirms the optimum with the reference algorithm.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# fun(theta_SP, rows) -> (f_S, grad_SP); rows indexes the batch (for per-start data weights)
BatchFun = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def batched_lbfgs(fun: BatchFun, x0_SP: np.ndarray, *, m: int = 10, maxiter: int = 500,
                  ftol: float = 1e-10, gtol: float = 1e-9, c1: float = 1e-4, max_backtrack: int = 40
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Minimize ``S`` independent problems with L-BFGS and a backtracking Armijo line search.

    Parameters
    ----------
    fun : callable
        ``fun(theta_SP, rows_S) -> (f_S, grad_SP)``; ``rows`` are the batch indices being evaluated.
    x0_SP : ndarray
        Starting points, one row per problem.
    m : int
        History length.
    maxiter : int
        Maximum iterations per problem.
    ftol, gtol : float
        Stop a problem when its relative decrease ``(f_old - f) / max(|f_old|, |f|, 1e-300)`` is at
        most ``ftol`` or its largest absolute gradient component is at most ``gtol``.

    Returns
    -------
    x_SP, f_S, n_iter_S, converged_S : ndarray
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        return _run(fun, x0_SP, m, maxiter, ftol, gtol, c1, max_backtrack)


def _run(fun, x0_SP, m, maxiter, ftol, gtol, c1, max_backtrack):
    x = np.array(x0_SP, dtype=np.float64, copy=True)
    S, P = x.shape
    all_rows = np.arange(S)
    f, g = fun(x, all_rows)
    f = f.copy(); g = g.copy()
    # curvature pairs, newest first (index 0); entries at j >= n_hist are unused
    s_hist = np.zeros((S, m, P)); y_hist = np.zeros((S, m, P)); rho = np.zeros((S, m))
    n_hist = np.zeros(S, dtype=np.int64)
    n_iter = np.zeros(S, dtype=np.int64)
    converged = np.max(np.abs(g), axis=1) <= gtol
    active = ~converged & np.isfinite(f)
    for _ in range(maxiter):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        gi = g[idx]
        # two-loop recursion, vectorized over the active problems (pairs beyond n_hist are masked)
        nh = n_hist[idx]
        sh, yh = s_hist[idx], y_hist[idx]
        rh = np.where(np.arange(m)[None, :] < nh[:, None], rho[idx], 0.0)
        q = gi.copy()
        alpha = np.zeros((idx.size, m))
        for j in range(int(nh.max()) if nh.size else 0):
            a = rh[:, j] * np.einsum("sp,sp->s", sh[:, j], q)
            alpha[:, j] = a
            q -= a[:, None] * yh[:, j]
        sy = np.einsum("sp,sp->s", sh[:, 0], yh[:, 0])
        yy = np.einsum("sp,sp->s", yh[:, 0], yh[:, 0])
        gamma = np.where((nh > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
        r = gamma[:, None] * q
        for j in reversed(range(int(nh.max()) if nh.size else 0)):
            b = rh[:, j] * np.einsum("sp,sp->s", yh[:, j], r)
            r += sh[:, j] * (alpha[:, j] - b)[:, None]
        d = -r
        gd = np.einsum("sp,sp->s", gi, d)
        bad = ~(gd < 0) | ~np.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent
            d[bad] = -gi[bad]
            gd[bad] = -np.einsum("sp,sp->s", gi[bad], gi[bad])
            n_hist[idx[bad]] = 0
        # first step of a fresh history: a unit-length move in parameter space at most
        t = np.where(n_hist[idx] == 0, np.minimum(1.0, 1.0 / np.maximum(np.abs(d).sum(1), 1e-300)), 1.0)
        fi = f[idx]
        accepted = np.zeros(idx.size, dtype=bool)
        x_new = x[idx].copy(); f_new = fi.copy(); g_new = gi.copy()
        todo = np.arange(idx.size)
        for _bt in range(max_backtrack):
            xt = x[idx[todo]] + t[todo, None] * d[todo]
            ft, gt = fun(xt, idx[todo])
            ok = np.isfinite(ft) & (ft <= fi[todo] + c1 * t[todo] * gd[todo])
            acc = todo[ok]
            x_new[acc] = xt[ok]; f_new[acc] = ft[ok]; g_new[acc] = gt[ok]; accepted[acc] = True
            todo = todo[~ok]
            if todo.size == 0:
                break
            t[todo] *= 0.5
        n_iter[idx] += 1
        # problems whose line search failed cannot make progress: stop them (keep the last point)
        failed = idx[~accepted]
        active[failed] = False
        acc = np.nonzero(accepted)[0]
        ia = idx[acc]
        s_new = x_new[acc] - x[ia]; y_new = g_new[acc] - g[ia]
        sy_new = np.einsum("sp,sp->s", s_new, y_new)
        upd = np.isfinite(sy_new) & (sy_new > 1e-280) & (sy_new > 1e-12 * np.sqrt(np.einsum("sp,sp->s", s_new, s_new) * np.einsum("sp,sp->s", y_new, y_new)))
        iu = ia[upd]
        if iu.size:
            s_hist[iu, 1:] = s_hist[iu, :-1]; y_hist[iu, 1:] = y_hist[iu, :-1]; rho[iu, 1:] = rho[iu, :-1]
            s_hist[iu, 0] = s_new[upd]; y_hist[iu, 0] = y_new[upd]; rho[iu, 0] = 1.0 / sy_new[upd]
            n_hist[iu] = np.minimum(n_hist[iu] + 1, m)
        f_old = f[ia].copy()
        x[ia] = x_new[acc]; f[ia] = f_new[acc]; g[ia] = g_new[acc]
        rel = (f_old - f[ia]) / np.maximum(np.maximum(np.abs(f_old), np.abs(f[ia])), 1e-300)
        done = (rel <= ftol) | (np.max(np.abs(g[ia]), axis=1) <= gtol)
        converged[ia[done]] = True
        active[ia[done]] = False
    return x, f, n_iter, converged
