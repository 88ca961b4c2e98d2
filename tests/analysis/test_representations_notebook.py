"""The representations notebook (issue #27) runs as shipped: executed with nbclient from its own folder, the four
analyses of study/represent.py on a tiny cohort and models, and the size-vs-task section skipped with one line when
no study is named, or showing the table of a size-vs-task study folder (hand-made here) when one is."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "analysis" / "notebooks" / "representations.ipynb"


def _size_task_study(root: Path) -> Path:
    """A size-vs-task study folder as ``study.size_task`` leaves it: ladder.json, the finetune store table and the
    FC cache; the metric rises with size in every repeat."""
    from analysis.store import ResultsStore

    rows = []
    for ck, base in (("w16", 0.6), ("w32", 0.7), ("w48", 0.8)):
        for r in range(3):
            rows.append({"run_id": f"{ck}-{r}", "task": "trait_bin", "task_type": "classification", "metric": "auroc",
                         "value": base + 0.01 * r, "auroc": base + 0.01 * r, "bacc": 0.6, "strategy": "full",
                         "method": "Fine-tuned all", "checkpoint": ck, "repeat": r})
    ResultsStore(root / "store").append("finetune", rows)
    pd.DataFrame([{"task": "trait_bin", "task_type": "classification", "metric": "auroc", "value": 0.9, "auroc": 0.9,
                   "bacc": 0.8, "strategy": "fc", "method": "FC baseline (correlation, blocks atlas)",
                   "checkpoint": "fc", "repeat": r, "chance": 0.5, "degenerate": "", "cache_key": "k"}
                  for r in range(3)]).to_parquet(root / "fc_baseline.parquet", index=False)
    (root / "ladder.json").write_text(json.dumps({
        "rungs": [{"label": ck, "weights": "", "n_params": n} for ck, n in (("w16", 49432), ("w32", 176472),
                                                                           ("w48", 381336))],
        "tasks": ["trait_bin"], "strategies": ["full"], "repeats": 3}))
    return root


def _run(monkeypatch, env: dict[str, str]) -> str:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            out.append(o.get("text", "") + o.get("data", {}).get("text/markdown", ""))
    return "".join(out)


@pytest.mark.slow  # ~40-70 s on a busy 2-core CPU: a 30-step pre-training and four analyses
def test_notebook_runs_the_four_analyses_and_the_size_task_table(tmp_path, monkeypatch):
    study = _size_task_study(tmp_path / "size-task")
    out = _run(monkeypatch, {"NEUROX_REPR_OUT": str(tmp_path / "out"), "NEUROX_SIZE_TASK": str(study),
                             "NEUROX_REPR_PRETRAIN_STEPS": "5"})
    for fig in ("autocorr", "recon", "memory", "cka", "size_task"):
        assert (tmp_path / "out" / f"{fig}.png").stat().st_size > 5_000, fig
    assert "input" in out and "masked-voxel MSE" in out and "unbiased HSIC" in out
    assert "| FC baseline (correlation, blocks atlas) | - | 0.900 [0.900, 0.900] | 3 |" in out
    assert "trait_bin/full: best w48, bigger is better" in out
    # without a study the section says so in one line and the notebook still finishes
    out2 = _run(monkeypatch, {"NEUROX_REPR_OUT": str(tmp_path / "out"), "NEUROX_SIZE_TASK": ""})
    assert "no size-vs-task study: NEUROX_SIZE_TASK is not set" in out2 and "notebook ran in" in out2
