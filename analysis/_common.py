"""Errors and input checks shared by every fit module (no other analysis import: no cycles)."""
from __future__ import annotations

import numpy as np

__all__ = ["FitError", "check_positive"]


class FitError(ValueError):
    """A fit could not be done or did not converge; the message says which input or step failed."""


def check_positive(name: str, values) -> np.ndarray:
    """Return ``values`` as float64, raising :class:`FitError` if any is missing, infinite or <= 0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise FitError(f"{name}: expected a 1-D array of values, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise FitError(f"{name}: {int(bad.sum())} missing or non-finite value(s) at positions "
                       f"{np.nonzero(bad)[0][:5].tolist()}; drop or fill them before fitting")
    bad = arr <= 0
    if bad.any():
        raise FitError(f"{name}: {int(bad.sum())} non-positive value(s) (e.g. {arr[bad][0]!r} at position "
                       f"{int(np.nonzero(bad)[0][0])}); power-law fits need values > 0")
    return arr
