"""Synthetic results store with planted Chinchilla-law losses (shared by the analysis tests)."""
from __future__ import annotations

import numpy as np

from analysis.store import ResultsStore

LAW = dict(E=1.2, A=60.0, B=90.0, alpha=0.3, beta=0.32)


def law(N, D):
    return LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]


def rising_law(N, D):
    """Loss that *rises* with model size (alpha = -0.1): no scaling law in N exists."""
    return LAW["E"] + 0.02 * N ** 0.1 + LAW["B"] / D ** LAW["beta"]


def make_store(root, seed=0, sizes=(1e6, 3e6, 1e7, 3e7, 1e8), budgets=(1e15, 3e15, 1e16, 3e16, 1e17, 3e17), noise=0.003,
               loss=law, spec_names=False):
    """Runs: every size at every budget (D = C / 6N, the spec's ``budget_kind="flops"``, ``budget=C``);
    4 evaluation steps per run, the last flagged final; ``loss(N, D)`` is the planted law. ``spec_names``: the
    budget columns named as a study's store names them (``spec.budget``, ``spec.budget_kind``)."""
    bk, b = ("spec.budget_kind", "spec.budget") if spec_names else ("budget_kind", "budget")
    rng = np.random.default_rng(seed)
    st = ResultsStore(root)
    for N in sizes:
        for C in budgets:
            D_final = C / (6 * N)
            rows = []
            for k, frac in enumerate((0.25, 0.5, 0.75, 1.0)):
                D = D_final * frac
                rows.append(dict(run_id=f"r-{N:.0e}-{C:.0e}", study="synthetic", size=f"{N / 1e6:.0f}M",
                                 n_params=N, step=k * 100, tokens_seen=D, flops=6 * N * D, **{bk: "flops", b: C},
                                 val_loss=loss(N, D) * np.exp(rng.normal(0, noise)), is_final=frac == 1.0,
                                 package_versions={"numpy": np.__version__}))
            st.append("train", rows)
    return root
