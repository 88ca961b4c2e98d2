"""Scaling-efficiency tables (the seed's strong-scaling table) for strong and weak scaling."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["scaling_table"]


def scaling_table(units: Sequence[float], throughput: Sequence[float], *, baselines: Sequence[float] | None = None,
                  mode: str = "strong") -> pd.DataFrame:
    """Speedup, ideal throughput and efficiency against one or more baselines.

    Parameters
    ----------
    units : sequence
        Nodes or GPUs per measurement.
    throughput : sequence
        Samples (or tokens) per second per measurement, > 0.
    baselines : sequence, optional
        Unit counts to use as baselines (each must be in ``units``); default the smallest count.
    mode : {"strong", "weak"}
        ``strong``: fixed global problem; ideal throughput grows with the units:
        ``ideal = T_b * n / n_b``, ``efficiency = T / ideal``. ``weak``: fixed work per unit; the ideal is
        the same linear growth of throughput (per-unit throughput constant), so the efficiency is
        ``(T / n) / (T_b / n_b)``; the two formulas coincide for throughput, the labels differ.

    Returns
    -------
    pandas.DataFrame
        Columns ``units, throughput, per_unit`` and per baseline ``b``: ``ideal_N{b}``,
        ``speedup_N{b}``, ``efficiency_N{b}`` (fraction; NaN for counts below the baseline).
    """
    if mode not in ("strong", "weak"):
        raise ValueError(f"mode={mode!r}: allowed values are 'strong' and 'weak'")
    n = np.asarray(units, dtype=np.float64)
    T = np.asarray(throughput, dtype=np.float64)
    if n.shape != T.shape or n.ndim != 1 or n.size == 0:
        raise ValueError(f"units and throughput must be 1-D of equal length, got {n.shape} and {T.shape}")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(T)) and np.all(T > 0)):
        raise ValueError("units and throughput must be positive and finite (no missing values)")
    order = np.argsort(n, kind="stable")
    n, T = n[order], T[order]
    out = pd.DataFrame(dict(units=n, throughput=T, per_unit=T / n))
    for b in (baselines if baselines is not None else [n[0]]):
        hit = np.nonzero(n == b)[0]
        if hit.size == 0:
            raise ValueError(f"baseline {b!r} is not among the unit counts {n.tolist()}")
        nb, Tb = n[hit[0]], T[hit[0]]
        tag = f"N{b:g}"
        below = n < nb
        ideal = Tb * n / nb
        out[f"ideal_{tag}"] = np.where(below, np.nan, ideal)
        out[f"speedup_{tag}"] = np.where(below, np.nan, T / Tb)
        out[f"efficiency_{tag}"] = np.where(below, np.nan, T / ideal)
    out.attrs["mode"] = mode
    return out
