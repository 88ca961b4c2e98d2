"""Pin BLAS/OpenMP threads while many small fits run (bootstraps): on a loaded machine a BLAS pool
per call oversubscribes the cores (1000 refits took 15-59 s instead of 0.9 s under load 4-7).

Uses :mod:`threadpoolctl` when installed (it reaches pools already started in this process); otherwise
sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` for the duration (pools started
later, and child processes, honour them). No torch.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

__all__ = ["limit_threads", "THREAD_ENV"]

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@contextmanager
def limit_threads(n: int | None = 1):
    """Context manager: at most ``n`` BLAS/OpenMP threads inside (``None``: no change).

    Yields
    ------
    str
        How the limit was applied: ``"threadpoolctl"``, ``"env"`` or ``"none"``.
    """
    if n is None:
        yield "none"
        return
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"threads={n!r}: must be a positive integer or None")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n):
            yield "threadpoolctl"
        return
    old = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(n) for k in THREAD_ENV})
    try:
        yield "env"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
