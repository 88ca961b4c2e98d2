"""The loss-vs-FLOPs notebook runs as shipped (issue #28): executed with nbclient against a small results store
built here (planted Chinchilla losses), from the notebook's own folder as Jupyter starts it; without a store it
stops with one message that says which store it looked for and how to make or name one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from _analysis_synth import make_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "analysis" / "notebooks" / "loss_vs_flops.ipynb"


def _execute(monkeypatch, env: dict[str, str]):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebook_runs_on_a_store_named_by_the_environment(tmp_path, monkeypatch):
    store = make_store(tmp_path / "demo" / "store")
    nb = _execute(monkeypatch, {"NEUROX_STORE": str(store), "NEUROX_N_BOOT": "20"})
    out = _text(nb)
    assert "30 runs, 120 rows, 30 final points" in out
    assert (tmp_path / "demo" / "loss_vs_flops.png").stat().st_size > 10_000  # beside the study, not in the repo


def test_default_store_is_the_readme_main_jobs(tmp_path, monkeypatch):
    """No NEUROX_STORE: the notebook looks for studies/demo/store from its folder up to the repository root."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert 'os.environ.get("NEUROX_STORE", "studies/demo/store")' in nb.cells[1].source
    monkeypatch.delenv("NEUROX_STORE", raising=False)
    if (REPO / "studies" / "demo" / "store" / "train").is_dir():
        pytest.skip("this checkout has a demo store; the missing-store message cannot be shown")
    with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
        _execute(monkeypatch, {"NEUROX_FIG": str(tmp_path / "f.png")})
    msg = str(err.value)
    assert "FileNotFoundError" in msg and f"no results store with a 'train' table at {REPO}/studies/demo/store" in msg
    assert "python study/scaling_law.py" in msg and "NEUROX_STORE" in msg


def test_notebook_compares_data_mixtures_side_by_side(tmp_path, monkeypatch):
    """A store with two mixtures (issue #27 item 5): the diversity cell prints the per-mixture table and saves the
    side-by-side plot beside the study; the one-mixture store above gets one line saying how to make one."""
    from analysis.store import ResultsStore
    from test_diversity import table

    ResultsStore(tmp_path / "diversity" / "store").append("train", table())
    nb = _execute(monkeypatch, {"NEUROX_STORE": str(tmp_path / "diversity" / "store"), "NEUROX_N_BOOT": "20"})
    cell = next(c for c in nb.cells if c.get("id") == "diversity")
    md = "".join(o.get("data", {}).get("text/markdown", "") for o in cell.outputs)
    assert "# Data diversity" in md and "| cohort_a" in md and "| all" in md, md[:500]
    assert (tmp_path / "diversity" / "diversity.png").stat().st_size > 10_000
    one = make_store(tmp_path / "one" / "store")
    nb = _execute(monkeypatch, {"NEUROX_STORE": str(one), "NEUROX_N_BOOT": "20"})
    assert "one data mixture in this store (all): nothing to compare" in _text(nb)
