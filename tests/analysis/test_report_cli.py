"""summarize_study, plots, the CLI and the notebook on a small synthetic store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.fits import bootstrap_fit, fit_isoflop, fit_power_law
from analysis.plots import (plot_isoflop, plot_loss_vs_flops, plot_lr_transfer, plot_optimal_allocation,
                            plot_radar, plot_scaling)
from analysis.report import final_rows, summarize_study
from analysis.store import ResultsStore, read_table

from _analysis_synth import LAW, law

REPO = Path(__file__).resolve().parents[2]


def test_final_rows_prefers_is_final_then_last_step(tmp_path):
    st = ResultsStore(tmp_path)
    st.append("train", [dict(run_id="a", step=s, val_loss=3.0 - s, is_final=False) for s in range(3)]
              + [dict(run_id="b", step=5, val_loss=1.0, is_final=True), dict(run_id="b", step=6, val_loss=9.0, is_final=False)])
    f = final_rows(st.read("train")).set_index("run_id")
    assert f.loc["a", "step"] == 2 and f.loc["b", "step"] == 5


def test_summarize_study(synthetic_store, tmp_path):
    out = tmp_path / "report"
    st = ResultsStore(synthetic_store)
    # a trailing train-only log row (no validation loss) and a run that never evaluated: both skipped
    st.append("train", [dict(run_id="r-1e+06-1e+15", step=10_000, train_loss=9.0, flops=1e20, val_loss=None),
                        dict(run_id="never-evaluated", step=0, train_loss=9.0, flops=1e15, val_loss=None)])
    st.append("finetune", [dict(run_id=f"ft-{s}-{t}-{r}", pretrain_run_id=s, size=s, task=t, task_type="classification",
                                strategy="full", repeat=r, metric="auroc", value=0.6 + 0.01 * r + 0.05 * (s == "51M"))
                           for s in ("51M", "202M") for t in ("sex", "ADHD", "MDD") for r in range(3)])
    st.append("benchmark", [dict(name="train_throughput", metric="throughput", value=v, unit="samples/s", device="H100",
                                 device_count=n, config="51M") for n, v in ((1, 100.0), (2, 190.0), (4, 360.0))])
    s = summarize_study(synthetic_store, out, n_boot=100)
    assert s["n_runs"] == 31 and s["n_final_points"] == 30 and s["n_dropped"] == 1
    pw = s["power_law"]
    assert pw["exponent_excludes_zero"] is True and pw["intervals"]["alpha"]["lo"] > 0
    assert abs(s["extrapolation"]["rel_error"]) < 0.03
    ch = s["chinchilla"]
    assert ch["params"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.05)
    assert ch["params"]["beta"] == pytest.approx(LAW["beta"], abs=0.05)
    assert ch["intervals"]["beta"]["lo"] <= ch["params"]["beta"] <= ch["intervals"]["beta"]["hi"]
    assert len(ch["compute_optimal"]) == 7
    assert s["finetune"]["table"]["51M"]["sex"] == pytest.approx(0.66)
    assert [round(r["efficiency_N1"], 3) for r in s["scaling"]["train_throughput"]] == [1.0, 0.95, 0.9]
    for name in ("summary.json", "summary.md", "loss_vs_flops.png", "optimal_allocation.png", "finetune_radar.png",
                 "scaling_train_throughput.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["n_runs"] == 31
    assert "Exponent interval excludes zero: **True**" in (out / "summary.md").read_text()


def test_summarize_study_errors(tmp_path):
    with pytest.raises(ValueError, match="empty or missing"):
        summarize_study(tmp_path / "nothing", tmp_path / "out")
    st = ResultsStore(tmp_path / "s")
    st.append("train", [dict(run_id=f"r{i}", step=0, val_loss=2.0 - 0.1 * i, flops=1e15 * (i + 1)) for i in range(3)])
    s = summarize_study(tmp_path / "s", tmp_path / "out", n_boot=20)
    assert "at least 4 points" in s["power_law"]["error"] and "error" in s["extrapolation"]
    assert "lacks" in s["chinchilla"]["skipped"]


def test_plots_render(tmp_path):
    rng = np.random.default_rng(0)
    C = np.geomspace(1e15, 1e18, 12); L = 1.5 + 50 * C ** -0.1 * np.exp(rng.normal(0, 0.002, 12))
    fit = bootstrap_fit(fit_power_law(C, L), 50)
    figs = [plot_loss_vs_flops(C, L, fit=fit, frontier=np.arange(12))]
    rows = [(c, n, law(n, c / (6 * n))) for c in (1e15, 1e16, 1e17) for n in np.geomspace(3e5, 3e7, 7)]
    Cs, Ns, Ls = map(np.array, zip(*rows))
    figs.append(plot_isoflop(Cs, Ns, Ls, fit_isoflop(Cs, Ns, Ls)))
    figs.append(plot_optimal_allocation(pd.DataFrame(dict(C=[1e18, 1e20], N_opt=[1e7, 1e8], D_opt=[1e10, 1e11]))))
    lr = pd.DataFrame([dict(width=w, lr=2.0 ** x, val_loss=(x + 8) ** 2 + w / 100, parametrization=p)
                       for p in ("sp", "mup") for w in (32, 64) for x in range(-11, -5)])
    figs.append(plot_lr_transfer(lr))
    figs.append(plot_radar(pd.DataFrame({"ADHD": [0.6, 0.7], "sex": [0.9, 0.8], "MDD": [0.55, 0.6]}, index=["51M", "202M"])))
    from analysis.efficiency import scaling_table
    figs.append(plot_scaling(scaling_table([1, 4, 16], [27.4, 83.9, 276.3], baselines=[1, 4])))
    for i, f in enumerate(figs):
        f.savefig(tmp_path / f"f{i}.png")
        assert (tmp_path / f"f{i}.png").stat().st_size > 5000


def test_cli_fit_chinchilla_from_csv(tmp_path, capsys):
    rng = np.random.default_rng(2)
    N = np.exp(rng.uniform(np.log(1e6), np.log(1e8), 30)); D = np.exp(rng.uniform(np.log(1e8), np.log(1e10), 30))
    pd.DataFrame(dict(N=N, C=6 * N * D, L=law(N, D) * np.exp(rng.normal(0, 0.002, 30)))).to_csv(tmp_path / "runs.csv", index=False)
    assert main(["fit", "chinchilla", str(tmp_path / "runs.csv"), "--params", "N", "--flops", "C", "--loss", "L",
                 "--json", "--grid-step", "2", "--bootstrap", "50", "--budgets", "1e18"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.03)
    assert set(out["intervals"]["beta"]) == {"se", "lo", "hi"} and len(out["compute_optimal"]) == 1
    # bad input: a clear message and exit status 2
    pd.DataFrame(dict(N=N, C=6 * N * D, L=-law(N, D))).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["fit", "chinchilla", str(tmp_path / "bad.csv"), "--params", "N", "--flops", "C", "--loss", "L"]) == 2
    assert "non-positive" in capsys.readouterr().err
    assert main(["fit", "power", str(tmp_path / "runs.csv"), "--x", "nope", "--loss", "L"]) == 2
    assert "column 'nope' not found" in capsys.readouterr().err


def test_cli_other_subcommands(tmp_path, capsys):
    pd.DataFrame(dict(nodes=[1, 4, 16, 64, 256, 512], thr=[27.44, 83.85, 276.29, 877.98, 2934.31, 4251.88])).to_parquet(
        tmp_path / "s.parquet")
    assert main(["efficiency", str(tmp_path / "s.parquet"), "--throughput", "thr", "--baseline", "1", "--baseline", "64",
                 "--json"]) == 0
    t = pd.DataFrame(json.loads(capsys.readouterr().out)["table"]).set_index("units")
    assert round(100 * t.loc[512, "efficiency_N64"], 1) == 60.5
    long = pd.DataFrame([dict(config=c, task=t, value=v) for c, vals in
                         {"a": (0.6, 2.0, 0.8), "b": (0.7, 1.0, 0.9), "c": (0.65, 1.5, 0.7)}.items()
                         for t, v in zip(("adhd/auroc", "age/mae", "sex/auroc"), vals)])
    long.to_csv(tmp_path / "r.csv", index=False)
    assert main(["rank", str(tmp_path / "r.csv"), "--subset", "two=age/mae,sex/auroc", "--json"]) == 0
    rk = {r["config"]: r for r in json.loads(capsys.readouterr().out)["ranking"]}
    assert rk["b"]["rank__all"] == 1 and rk["b"]["rank__two"] == 1
    sweep = pd.DataFrame([dict(width=w, lr=2.0 ** x, val_loss=(x + 8) ** 2 + 1, parametrization="mup")
                          for w in (32, 64, 128) for x in range(-11, -4)])
    sweep.to_csv(tmp_path / "m.csv", index=False)
    assert main(["mutransfer", str(tmp_path / "m.csv"), "--json", "--plot", str(tmp_path / "m.png")]) == 0
    sl = json.loads(capsys.readouterr().out)["slopes"][0]
    assert abs(sl["slope"]) < 1e-6 and (tmp_path / "m.png").exists()
    rows = [dict(C=c, N=n, L=law(n, c / (6 * n))) for c in (1e15, 1e16, 1e17) for n in np.geomspace(3e5, 3e7, 7)]
    pd.DataFrame(rows).to_csv(tmp_path / "iso.csv", index=False)
    assert main(["fit", "isoflop", str(tmp_path / "iso.csv"), "--flops", "C", "--params", "N", "--loss", "L", "--json"]) == 0
    assert 0.3 < json.loads(capsys.readouterr().out)["exponent"] < 0.7


def test_python_dash_m_entry_point(tmp_path):
    pd.DataFrame(dict(x=[1.0, 2, 4, 8, 16], L=[3.0, 2.5, 2.2, 2.05, 1.98])).to_csv(tmp_path / "p.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "analysis", "fit", "power", str(tmp_path / "p.csv"), "--x", "x", "--loss", "L"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "alpha" in r.stdout


def test_notebook_executes_on_small_store(synthetic_store, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "analysis" / "notebooks" / "loss_vs_flops.ipynb", as_version=4)
    env = dict(NEUROX_STORE=str(synthetic_store), NEUROX_N_BOOT="50", NEUROX_FIG=str(tmp_path / "nb.png"))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_pp = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + old_pp if old_pp else "")
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in list(old.items()) + [("PYTHONPATH", old_pp)]:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "30 runs, 120 rows, 30 final points" in text
    assert (tmp_path / "nb.png").stat().st_size > 5000
    assert len(read_table(synthetic_store, "train")) == 120


def test_loss_vs_flops_plot_reads_without_the_code():
    """Issue #28: colours by size with one legend entry each, markers by data, one entry for the training curves,
    axes named with units and which loss, and the fitted law's equation with its intervals in the legend."""
    from analysis.fits import bootstrap_fit, fit_power_law

    C = np.geomspace(1e15, 1e18, 12)
    L = 1.7 + 300.0 * C ** -0.15
    fit = bootstrap_fit(fit_power_law(C, L), n_boot=50, seed=0)
    sizes = np.repeat([1e6, 4e6, 1.6e7], 4)
    data = ["all cohorts"] * 11 + ["cohort_a"]
    curves = pd.DataFrame({"run": np.repeat(np.arange(3), 5), "C": np.tile(np.geomspace(1e14, 1e15, 5), 3),
                           "L": np.tile(np.linspace(3.0, 2.5, 5), 3)})
    fig = plot_loss_vs_flops(C, L, fit=fit, curves=curves, sizes=sizes, size_name="n_params", markers=data,
                             marker_name="data:")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [x for x in labels if x.startswith("n_params")] == ["n_params 1e+06", "n_params 4e+06", "n_params 1.6e+07"]
    assert labels.count("training curves (each run's evaluations)") == 1
    assert "data: all cohorts" in labels and "data: cohort_a" in labels
    law = next(x for x in labels if x.startswith("L = "))
    assert "alpha = 0.15" in law and "[" in law  # the exponent with its bootstrap interval
    assert ax.get_xlabel() == "training compute C (FLOPs)" and ax.get_ylabel() == "validation loss (val_loss)"
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections if c.get_offsets().size
               and c.get_label().startswith("n_params")}
    assert len(colours) == 3  # one colour per size


def test_lr_transfer_plot_has_one_legend_that_explains_the_dotted_lines():
    from analysis.mutransfer import lr_transfer

    rows = [dict(parametrization=p, width=w, lr=2.0 ** e, val_loss=1 + 0.05 * (e + 7 + (0 if p == "mup" else
             np.log2(w / 16))) ** 2) for p in ("sp", "mup") for w in (16, 32, 64, 128) for e in range(-12, -2)]
    df = pd.DataFrame(rows)
    per, slopes = lr_transfer(df)
    fig = plot_lr_transfer(df, per, slopes=slopes)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["width 16", "width 32", "width 64", "width 128", "fitted optimal LR (quadratic in log2 LR)"]
