"""The report's Figure-3 panels (the seed's NeuroMamba figure): final loss vs compute and vs parameters, one colour
per model size, log axes, written for every study report and listed in summary.json / summary.md."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.plots import plot_loss_by_size, size_labels
from analysis.report import SIZE_PLOTS, summarize_study


def _table() -> pd.DataFrame:
    """3 sizes x 3 budgets (the largest size only at the 2 largest), plus a second run of 20k at C = 1e12 (another
    data mixture, worse): 9 runs."""
    rows = []
    for n, w in ((2e4, 16), (5e4, 32), (1.2e5, 64)):
        for c in (1e11, 1e12, 1e13):
            if n == 1.2e5 and c == 1e11:
                continue
            rows.append(dict(n=n, width=w, C=c, L=0.01 + 3.0 * n ** -0.3 + 40.0 * (c / n) ** -0.3))
    rows.append(dict(n=2e4, width=16, C=1e12, L=rows[1]["L"] * 1.1))
    return pd.DataFrame(rows)


def _size_lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_") and "same" not in ln.get_label()]


def test_loss_vs_compute_has_one_line_per_size_through_its_best_runs_on_log_axes():
    t = _table()
    labels = size_labels(t["n"], ["debug"] * len(t), t["width"])
    assert labels[0] == "debug w16 (2e+04 params)"
    ax = plot_loss_by_size(t["C"], t["L"], t["n"], labels=labels).axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    lines = _size_lines(ax)
    assert [ln.get_label() for ln in lines] == ["debug w16 (2e+04 params)", "debug w32 (5e+04 params)",
                                                "debug w64 (1.2e+05 params)"]
    # each size's line runs through its best loss at each compute, in order of compute; the worse run is off it
    small = lines[0]
    assert list(small.get_xdata()) == [1e11, 1e12, 1e13]
    assert small.get_ydata()[1] == pytest.approx(t["L"][1]) and small.get_ydata()[1] < t["L"].iloc[-1]
    assert len(lines[2].get_xdata()) == 2
    colours = {tuple(ln.get_color()) for ln in lines}
    assert len(colours) == 3  # one colour per size


def test_loss_vs_params_joins_each_budget_and_draws_sizes_as_points(tmp_path):
    t = _table()
    fig = plot_loss_by_size(t["n"], t["L"], t["n"], groups=[f"{c:.3g} flops" for c in t["C"]],
                            x_name="parameters N")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "parameters N"
    lines = _size_lines(ax)
    assert len(lines) == 3 and all(ln.get_linestyle() == "None" for ln in lines)
    assert [sorted(set(ln.get_xdata())) for ln in lines] == [[2e4], [5e4], [1.2e5]]
    budget_lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(budget_lines) == 3  # 1e11 has 2 sizes, 1e12 and 1e13 have 3
    assert sum(not ln.get_label().startswith("_") for ln in budget_lines) == 1  # one legend entry for them all
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_plot_refuses_a_table_without_a_usable_point():
    with pytest.raises(ValueError, match="no run"):
        plot_loss_by_size([0.0], [1.0], [np.nan])


def test_every_study_report_writes_and_lists_the_size_plots(synthetic_store, tmp_path):
    out = tmp_path / "report"
    s = summarize_study(synthetic_store, out, n_boot=20)
    for fn in SIZE_PLOTS:
        assert fn in s["plots"] and (out / fn).stat().st_size > 1000
        assert f"![{fn}]({fn})" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["size_plots"]["sizes"] == 5  # make_store's 5 sizes
    assert s["size_plots"]["grouped_by"] == "budget"


def test_report_without_parameter_counts_skips_the_size_plots_and_says_why(tmp_path):
    from analysis.store import ResultsStore

    st = ResultsStore(tmp_path / "store")
    st.append("train", [dict(run_id=f"r{i}", step=1, val_loss=1.0 / (i + 1), flops=10.0 ** (10 + i), is_final=True)
                        for i in range(5)])
    s = summarize_study(tmp_path / "store", tmp_path / "out", n_boot=10)
    assert not set(SIZE_PLOTS) & set(s["plots"]) and "n_params" in s["size_plots"]["skipped"]
