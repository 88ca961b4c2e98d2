"""Published numbers the forms reproduce (sources in analysis/README.md, "Recipes and what each reproduces").

Only numbers printed by the authors are compared; nothing here is a result of our own code written down.
"""
from __future__ import annotations

import numpy as np
import pytest

from analysis.fits import fit_muennighoff
from analysis.forms import DataConstrainedForm

# Muennighoff et al. 2023, github.com/huggingface/datablations README, "Parametric Fit": the C4 fit as
# [a, b, e, alpha, beta, R_D*, R_N*] (A = exp(a), B = exp(b), E = exp(e)) and the losses the README prints
# for the two models of the paper's Figure 1 (right).
DATABLATIONS = [6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, 15.387756, 5.309743]
DATABLATIONS_FIG1 = [((6.34e9, 242e9, 25e9), 2.2256440889984477), ((8.67e9, 178e9, 25e9), 2.2269634075087867)]


def _base():
    a, b, e, al, be = DATABLATIONS[:5]
    return dict(A=np.exp(a), B=np.exp(b), E=np.exp(e), alpha=al, beta=be)


def test_muennighoff_form_reproduces_the_papers_figure1_losses():
    form = DataConstrainedForm(_base())
    p = dict(r_d_star=DATABLATIONS[5], r_n_star=DATABLATIONS[6])
    for (N, D, U), published in DATABLATIONS_FIG1:
        assert form.predict(p, [N], [D], [U])[0] == pytest.approx(published, rel=1e-12)
    # and the paper's conclusion: 6.34B params on 242B tokens (9.7 epochs) beats 8.67B on 178B tokens
    (a, _), (b, _) = DATABLATIONS_FIG1
    assert form.predict(p, [a[0]], [a[1]], [a[2]])[0] < form.predict(p, [b[0]], [b[1]], [b[2]])[0]


def test_muennighoff_fit_returns_the_published_r_stars_from_their_law():
    """The fitter (frozen base, Huber on log L from the grid) recovers R_D* = 15.387756 and R_N* = 5.309743
    from losses of the published law on a grid like the paper's (unique tokens 100M-25B, up to 60 epochs,
    sizes up to 9B): the optimum of the published coefficients is found, to 1e-4 relative."""
    form = DataConstrainedForm(_base())
    rows = [(N, U * ep, U) for U in (1e8, 1e9, 4e9, 2.5e10) for N in np.geomspace(1e8, 9e9, 6)
            for ep in (1, 2, 4, 8, 16, 30, 60)]
    N, D, U = map(np.array, zip(*rows))
    L = form.predict(dict(r_d_star=DATABLATIONS[5], r_n_star=DATABLATIONS[6]), N, D, U)
    f = fit_muennighoff(N, D, U, L, base=_base())
    assert f.params["r_d_star"] == pytest.approx(DATABLATIONS[5], rel=1e-4)
    assert f.params["r_n_star"] == pytest.approx(DATABLATIONS[6], rel=1e-4)
