"""One validity checker for every fit: does the result describe a law, and if not, why not.

A fit can converge and still not be a scaling law: an exponent of the wrong sign (loss rising with
size), an irreducible loss pushed to zero, parameters the data cannot pin down, too few sizes or
budgets to test the form, a bootstrap whose refits often failed, a law that misses held-out runs,
an optimum at the edge of what was sampled. :func:`check_validity` turns the facts of any result
(exponents, intervals, standard errors, counts, ...) into ``valid`` and a list of short sentences,
each naming the parameter and the numbers. The result types in :mod:`analysis.fits` and
:mod:`analysis.mutransfer` collect their facts and call it; nothing else decides validity.

Rules (thresholds in :class:`Thresholds`, defaults in :data:`THRESHOLDS`):

* ``exponent``: an exponent <= 0 (the loss does not fall with the variable), or an exponent outside
  a required open range (e.g. an IsoFLOP allocation exponent outside (0, 1)).
* ``interval``: an exponent's interval (bootstrap percentile or t-based) contains 0.
* ``asymptote``: the irreducible loss ``E`` below ``asymptote_min_fraction`` of the lowest observed
  loss (at its bound 0: the form degenerated into a pure power law) or at/above the lowest observed
  loss (the law says no run can improve).
* ``se``: a parameter whose standard error exceeds its own magnitude.
* ``distinct``: fewer distinct sizes, token counts or budgets than the form needs to be tested.
* ``bootstrap``: more than ``max_bootstrap_failed`` of the replicates failed (dropped or not converged).
* ``extrapolation``: a held-out prediction off by more than ``max_extrapolation_error`` (relative).
* ``optimum``: an optimum (parabola vertex, best LR) outside or at the edge of the sampled range.
* ``wide``: an interval wider (half-width) than a stated limit, so its verdict cannot be trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Thresholds", "THRESHOLDS", "Validity", "check_validity"]


@dataclass(frozen=True)
class Thresholds:
    """Limits of the validity rules.

    Attributes
    ----------
    asymptote_min_fraction : float
        ``E`` below this fraction of the lowest observed loss counts as at its bound (0).
    max_bootstrap_failed : float
        Largest accepted fraction of failed bootstrap replicates.
    max_extrapolation_error : float
        Largest accepted relative error of a held-out prediction (0.10 = 10%).
    min_distinct_power : int
        Distinct values of x a one-variable law (3 parameters) needs to be tested: 4.
    min_distinct_chinchilla : int
        Distinct N and distinct D approach 3 needs per variable: 3.
    min_budgets_isoflop : int
        IsoFLOP budgets approach 2 needs (with 3 the exponent rests on one degree of freedom): 4.
    min_widths_mutransfer : int
        Widths a µTransfer slope needs for an interval that means something: 3.
    max_slope_halfwidth : float
        Largest half-width of a µTransfer slope interval (log2 LR per log2 width) whose verdict is
        trusted: 0.5, half the SP drift of about -1 that a transfer study must tell from 0.
    """

    asymptote_min_fraction: float = 0.01
    max_bootstrap_failed: float = 0.05
    max_extrapolation_error: float = 0.10
    min_distinct_power: int = 4
    min_distinct_chinchilla: int = 3
    min_budgets_isoflop: int = 4
    min_widths_mutransfer: int = 3
    max_slope_halfwidth: float = 0.5


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Validity:
    """Verdict of :func:`check_validity`: ``valid`` is True exactly when ``warnings`` is empty."""

    warnings: list = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict:
        return dict(valid=self.valid, warnings=list(self.warnings))


class Checked:
    """Mixin for results with a ``check()`` returning a :class:`Validity`: ``valid`` and ``warnings`` from it."""

    def check(self, *args, **kwargs) -> Validity:  # pragma: no cover - implemented by each result
        raise NotImplementedError

    @property
    def valid(self) -> bool:
        return self.check().valid

    @property
    def warnings(self) -> list[str]:
        return self.check().warnings


def _g(x) -> str:
    return f"{float(x):.3g}"


def _finite(x) -> bool:
    return x is not None and bool(np.isfinite(float(x)))


def check_validity(*, exponents: Mapping[str, float] | None = None, exponent_of: Mapping[str, str] | None = None,
                   exponent_range: Mapping[str, tuple[float, float]] | None = None,
                   intervals: Mapping[str, tuple[float, float]] | None = None, level: float = 0.95,
                   se: Mapping[str, tuple[float, float]] | None = None,
                   asymptote: tuple[str, float, float] | None = None,
                   distinct: Mapping[str, tuple[int, int]] | None = None,
                   bootstrap: tuple[int, int] | None = None,
                   extrapolation: Sequence[float] | float | None = None,
                   optima: Iterable[tuple[str, float, float, float]] = (),
                   wide: Mapping[str, tuple[float, float, float]] | None = None,
                   thresholds: Thresholds = THRESHOLDS) -> Validity:
    """Apply the validity rules to the facts of one result.

    Parameters
    ----------
    exponents : dict, optional
        ``name -> value`` of exponents that must be > 0 (``alpha``, ``beta``).
    exponent_of : dict, optional
        ``name -> variable`` the exponent belongs to (``{"alpha": "N"}``), for the messages; for an
        exponent with a range, the reason for the range.
    exponent_range : dict, optional
        ``name -> (lo, hi)``: exponents that must lie strictly inside ``(lo, hi)`` (instead of > 0).
    intervals : dict, optional
        ``name -> (lo, hi)`` of exponent intervals at ``level``; one containing 0 is flagged.
    se : dict, optional
        ``name -> (estimate, standard error)``; an SE larger than ``|estimate|`` is flagged.
    asymptote : tuple, optional
        ``(name, E, lowest observed loss)``.
    distinct : dict, optional
        ``what -> (count, minimum)``, e.g. ``{"sizes N": (2, 3)}``.
    bootstrap : tuple, optional
        ``(failed replicates, replicates attempted)``.
    extrapolation : float or sequence, optional
        Relative errors of held-out predictions; the largest in magnitude is checked.
    optima : iterable of tuples
        ``(where, value, lo, hi)``: an optimum ``value`` must lie strictly inside ``[lo, hi]``
        (the sampled range); ``where`` names it (``"budget C=1e+18: N_opt"``).
    wide : dict, optional
        ``name -> (lo, hi, max half-width)``.
    thresholds : Thresholds

    Returns
    -------
    Validity
        ``valid`` (no warning) and ``warnings`` (one sentence per broken rule).
    """
    t = thresholds
    w: list[str] = []
    ranges = dict(exponent_range or {})
    unknown = sorted(set(ranges) - set(exponents or {}))
    if unknown:
        raise ValueError(f"exponent_range names {unknown} without a value in exponents")
    for name, v in (exponents or {}).items():
        if not _finite(v):
            w.append(f"{name} = {v} is not a finite number; the fit did not determine it")
        elif name in ranges:
            lo, hi = ranges[name]
            if not lo < v < hi:
                why = (exponent_of or {}).get(name)
                w.append(f"{name} = {_g(v)} lies outside ({_g(lo)}, {_g(hi)}), the range this exponent must have"
                         + (f" ({why})" if why else ""))
        elif v <= 0:
            var = (exponent_of or {}).get(name, "its variable")
            w.append(f"{name} = {_g(v)} <= 0: the loss does not fall as {var} grows; not a scaling law")
    for name, (lo, hi) in (intervals or {}).items():
        if _finite(lo) and _finite(hi) and lo <= 0 <= hi:
            w.append(f"{name}: the {int(round(100 * level))}% interval [{_g(lo)}, {_g(hi)}] contains 0; "
                     "the data do not establish the exponent's sign")
    if asymptote is not None:
        name, E, lowest = asymptote
        if _finite(E) and _finite(lowest):
            if E < t.asymptote_min_fraction * lowest:
                w.append(f"{name} = {_g(E)} is at its bound 0 (below {t.asymptote_min_fraction:g} x the lowest loss "
                         f"{_g(lowest)}): the irreducible loss is not determined and the law extrapolates to zero loss")
            elif E >= lowest:
                w.append(f"{name} = {_g(E)} is at or above the lowest observed loss {_g(lowest)}: "
                         "the law says no run can do better than runs already did")
    for name, (est, s) in (se or {}).items():
        if _finite(est) and _finite(s) and s > abs(est):
            w.append(f"{name} = {_g(est)} has a standard error {_g(s)} larger than itself; the data do not pin it down")
    for what, (n, need) in (distinct or {}).items():
        if n < need:
            w.append(f"only {n} distinct {what} (at least {need} needed to test this form)")
    if bootstrap is not None:
        failed, total = bootstrap
        if total > 0 and failed / total > t.max_bootstrap_failed:
            w.append(f"bootstrap: {failed} of {total} replicates failed ({100 * failed / total:.1f}% > "
                     f"{100 * t.max_bootstrap_failed:g}%); the intervals describe the replicates that succeeded only")
    if extrapolation is not None:
        errs = np.atleast_1d(np.asarray(extrapolation, dtype=np.float64))
        errs = errs[np.isfinite(errs)]
        if errs.size:
            worst = float(errs[np.argmax(np.abs(errs))])
            if abs(worst) > t.max_extrapolation_error:
                w.append(f"extrapolation to the held-out largest budget is off by {100 * worst:+.1f}% "
                         f"(limit {100 * t.max_extrapolation_error:g}%)")
    for where, v, lo, hi in optima:
        if not (lo < v < hi):
            side = "outside" if (v < lo or v > hi) else "at the edge of"
            w.append(f"{where} = {_g(v)} lies {side} the sampled range [{_g(lo)}, {_g(hi)}]; the optimum is "
                     "not bracketed")
    for name, (lo, hi, limit) in (wide or {}).items():
        if not (_finite(lo) and _finite(hi)):
            w.append(f"{name}: no interval (too few points); its verdict is not tested")
        elif (hi - lo) / 2 > limit:
            w.append(f"{name}: the interval [{_g(lo)}, {_g(hi)}] is wider than +-{_g(limit)}; too uncertain for a verdict")
    return Validity(w)
