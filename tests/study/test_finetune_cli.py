"""The fine-tuning study: grid of cells, Table-2 summary, and a tiny end-to-end run of the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from study import finetune as FT


def _base(**kw):
    return FT.base_spec("/some/manifest.parquet", quick=True, overrides=kw)


def test_grid_specs_cells_and_seeds():
    cells = FT.grid_specs(_base(seed=5), [("trait_bin", "classification"), ("trait_cont", "regression")],
                          ["scratch", "last_block", "lora"], ["/w/a.safetensors", "/w/b.safetensors"], 3)
    # scratch once per task (no checkpoint); the others once per checkpoint
    assert len(cells) == 2 * 3 + 2 * 2 * 2 * 3
    assert len({c[0].run_id for c in cells}) == len(cells)
    scratch = [c for c in cells if c[0].strategy == "scratch"]
    assert all(c[0].init_from is None and c[1] == "scratch" for c in scratch)
    lora_b = [c for c in cells if c[0].strategy == "lora" and c[1] == "b" and c[0].target == "trait_cont"]
    assert [c[0].seed for c in lora_b] == [5, 6, 7] and [c[2] for c in lora_b] == [0, 1, 2]
    assert all(c[0].task_type == "regression" for c in lora_b)
    with pytest.raises(ValueError, match="strategies \\['adapter'\\]"):
        FT.grid_specs(_base(), [("trait_bin", "classification")], ["adapter"], ["/w/a.safetensors"], 3)
    with pytest.raises(ValueError, match="--weights"):
        FT.grid_specs(_base(), [("trait_bin", "classification")], ["lora"], [], 3)
    with pytest.raises(ValueError, match="task type"):
        FT.parse_tasks(["trait_bin:ranking"])


def _planted_rows():
    rows = []
    vals = {("scratch", "trait_bin"): [0.5, 0.6, 0.7], ("last_block", "trait_bin"): [0.8, 0.7, 0.9],
            ("scratch", "trait_cont"): [2.0, 2.2, 2.4], ("last_block", "trait_cont"): [1.5, 1.6, 1.7]}
    for (strategy, task), vs in vals.items():
        for r, v in enumerate(vs):
            rows.append({"strategy": strategy, "checkpoint": "scratch" if strategy == "scratch" else "w",
                         "task": task, "metric": "auroc" if task == "trait_bin" else "mae", "value": v,
                         "repeat": r, "method": FT.METHOD_NAMES[strategy], "trainable_frac": 0.5})
    return pd.DataFrame(rows)


def test_summary_and_table_layout():
    s = FT.summarize(_planted_rows())
    lb = s[(s.strategy == "last_block") & (s.task == "trait_cont")].iloc[0]
    assert lb["mean"] == pytest.approx(1.6) and lb["std"] == pytest.approx(0.1) and lb["n"] == 3
    assert lb["pct_change"] == pytest.approx(100 * (1.6 - 2.2) / 2.2)
    auc = s[(s.strategy == "last_block") & (s.task == "trait_bin")].iloc[0]
    assert auc["pct_change"] == pytest.approx(100 * (0.8 - 0.6) / 0.6)
    assert auc["cell"] == "0.800 ± 0.100 (33.33%↑)"
    md = FT.table_markdown(s)
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| Method"))
    assert header == "| Method | trait_bin (AUROC ↑) | trait_cont (MAE ↓) |"
    scratch_line = next(l for l in lines if l.startswith("| From scratch"))
    lb_line = next(l for l in lines if l.startswith("| Fine-tuned last block"))
    assert "0.600 ± 0.100" in scratch_line and "**" not in scratch_line
    # best AUROC is the larger, best MAE the smaller: both last block
    assert lb_line.count("**") == 4 and "(27.27%↓)" in lb_line


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("ftcli")
    return str(generate_cohort(root, n_subjects=16, grid=(24, 24, 24), n_frames=8, seed=4, progress=False,
                               fractions=(0.5, 0.25, 0.25)))


@pytest.mark.slow  # ~25 s on a busy 2-core CPU: 12 tiny fine-tuning runs and a 2-step pre-training
def test_cli_end_to_end_three_repeats(small_cohort, tmp_path, capsys):
    from analysis.store import read_table

    argv = ["--storage", str(tmp_path), "--study", "ft", "--manifest", small_cohort,
            "--tasks", "trait_bin:classification", "trait_cont:regression", "--strategies", "scratch", "last_block",
            "--repeats", "3", "--steps", "2", "--pretrain-steps", "2", "--no-progress", "--device", "cpu",
            "--spec-json", json.dumps({"batch_size": 4, "eval_every": 2, "precision": "fp32"})]
    assert FT.main(argv) == 0
    study = tmp_path / "ft"
    df = read_table(study / "store", "finetune")
    assert len(df) == 12
    counts = df.groupby(["task", "strategy"])["repeat"].apply(lambda r: sorted(r)).to_dict()
    assert all(v == [0, 1, 2] for v in counts.values()) and len(counts) == 4
    assert set(df.loc[df.task == "trait_bin", "metric"]) == {"auroc"}
    assert set(df.loc[df.task == "trait_cont", "metric"]) == {"mae"}
    reg = df[df.task == "trait_cont"]
    assert (reg["value"] == reg["mae"]).all() and (reg["mae"] > 0).all() and reg["pearson_r"].notna().all()
    lb = df[df.strategy == "last_block"]
    assert lb["pretrain_run_id"].notna().all() and (lb["trainable_frac"] < 1).all()
    assert (df[df.strategy == "scratch"]["trainable_frac"] == 1).all()
    summary = pd.read_parquet(study / "finetune_table.parquet")
    assert len(summary) == 6 and (summary["n"] == 3).all()  # + the FC baseline row of each task
    assert (summary["strategy"] == "fc").sum() == 2 and (study / "finetune_gains.parquet").exists()
    md = (study / "finetune_table.md").read_text()
    assert "| From scratch |" in md and "| Fine-tuned last block |" in md and md.count("±") >= 4
    assert "| Method | trait_bin auroc | trait_bin bacc | trait_cont mae | trait_cont pearson_r |" in md
    # a rerun finds every run in the store and trains nothing
    parts = len(list((study / "store" / "finetune").glob("part-*.parquet")))
    assert FT.main(argv) == 0
    assert len(list((study / "store" / "finetune").glob("part-*.parquet"))) == parts
    assert np.isfinite(summary.loc[summary.task == "trait_cont", "mean"]).all()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_workers_match_in_process(small_cohort, tmp_path):
    """``--ray 2`` (each run a 2-worker Ray Train job) gives the in-process numbers."""
    import ray

    from analysis.store import read_table

    common = ["--manifest", small_cohort, "--tasks", "trait_cont:regression", "--strategies", "scratch",
              "--repeats", "1", "--steps", "2", "--no-progress", "--device", "cpu",
              "--spec-json", json.dumps({"batch_size": 4, "eval_every": 2, "precision": "fp32"})]
    assert FT.main(["--storage", str(tmp_path / "a"), *common]) == 0
    try:
        assert FT.main(["--storage", str(tmp_path / "b"), "--ray", "2", "--ray-cpus", "2", *common]) == 0
    finally:
        ray.shutdown()
    a = read_table(tmp_path / "a" / "finetune" / "store", "finetune")
    b = read_table(tmp_path / "b" / "finetune" / "store", "finetune")
    assert len(a) == len(b) == 1 and a["run_id"][0] == b["run_id"][0]
    assert b["mae"][0] == pytest.approx(a["mae"][0], rel=1e-5)
    assert b["pearson_r"][0] == pytest.approx(a["pearson_r"][0], rel=1e-4)


def test_cli_rejects_mismatched_weights_before_any_run(tmp_path, capsys):
    import torch

    from neuro_models import registry as R
    from study import checkpoint as ckpt

    cfg = R.get_config("swift_v2", "debug", img_size=(24, 24, 24, 4), embed_dim=24)  # another width
    (tmp_path / "ck").mkdir()
    torch.save(R.build_pretrain_model(cfg).state_dict(), tmp_path / "ck" / "model.pt")
    w = ckpt.export_weights(tmp_path / "ck", tmp_path / "w24.safetensors", model_config=cfg, spec_json="{}")
    manifest = tmp_path / "no_manifest_needed.parquet"
    rc = FT.main(["--storage", str(tmp_path / "s"), "--manifest", str(manifest), "--weights", str(w),
                  "--strategies", "scratch", "lora", "--no-progress", "--device", "cpu"])
    assert rc == 2
    assert "embed_dim: weights have 24, the run asks for 16" in capsys.readouterr().err
    assert not (tmp_path / "s" / "finetune" / "store").exists()
