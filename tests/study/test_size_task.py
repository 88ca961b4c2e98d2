"""Size versus task (issue #27 item 3): the aggregation on hand-made tables (best size with its interval, the
"bigger is better" verdict and its flip, the FC row, degenerate cells), the config-search report's FC row, and the
CLI on a tiny ladder (explicit weights and a pre-training study's store)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study import size_task_report as R

SIZES = {"s": 1e4, "m": 1e5, "l": 1e6}
T975_2 = float(stats.t.ppf(0.975, 2))


def _rows(values: dict[tuple[str, str], list[float]], *, fc: dict[str, list[float]] | None = None,
          pearson_nan: set[tuple[str, str]] = frozenset(), flat_auroc: set[tuple[str, str]] = frozenset()):
    rows = []
    for (task, ck), vs in values.items():
        clf = task == "trait_bin"
        for r, v in enumerate(vs):
            row = {"task": task, "task_type": "classification" if clf else "regression",
                   "metric": "auroc" if clf else "mae", "value": v, "strategy": "full", "method": "Fine-tuned all",
                   "checkpoint": ck, "repeat": r}
            if clf:
                row.update(auroc=v, bacc=0.5 if (task, ck) in flat_auroc else 0.6)
            else:
                row.update(mae=v, pearson_r=float("nan") if (task, ck) in pearson_nan else 0.5)
            rows.append(row)
    for task, vs in (fc or {}).items():
        clf = task == "trait_bin"
        for r, v in enumerate(vs):
            rows.append({"task": task, "task_type": "classification" if clf else "regression",
                         "metric": "auroc" if clf else "mae", "value": v, "strategy": "fc",
                         "method": "FC baseline (correlation, blocks atlas)", "checkpoint": "fc", "repeat": r,
                         "chance": 0.5 if clf else 1.0, "degenerate": "",
                         **({"auroc": v, "bacc": 0.7} if clf else {"mae": v, "pearson_r": 0.9})})
    return pd.DataFrame(rows)


def _rising():
    """AUROC rises with size in every repeat; MAE falls with size (both: bigger is better)."""
    return _rows({("trait_bin", "s"): [0.60, 0.62, 0.64], ("trait_bin", "m"): [0.70, 0.71, 0.75],
                  ("trait_bin", "l"): [0.80, 0.85, 0.90],
                  ("trait_cont", "s"): [0.95, 0.97, 0.93], ("trait_cont", "m"): [0.85, 0.86, 0.84],
                  ("trait_cont", "l"): [0.70, 0.75, 0.72]},
                 fc={"trait_bin": [0.90, 0.90, 0.90], "trait_cont": [0.40, 0.42, 0.44]})


def test_t_interval_by_hand():
    m, lo, hi, n = R.t_interval([0.8, 0.85, 0.9, float("nan")])
    half = T975_2 * 0.05 / math.sqrt(3)
    assert (m, n) == (pytest.approx(0.85), 3) and lo == pytest.approx(0.85 - half) and hi == pytest.approx(0.85 + half)
    m1, lo1, hi1, n1 = R.t_interval([0.7])
    assert m1 == 0.7 and n1 == 1 and math.isnan(lo1) and math.isnan(hi1)


def test_best_size_interval_and_bigger_is_better():
    df = _rising()
    s = R.size_summary(df, SIZES)
    assert list(s[s.task == "trait_bin"]["checkpoint"]) == ["fc", "s", "m", "l"]  # FC row first, then by size
    fc = s[(s.task == "trait_cont") & (s.strategy == "fc")].iloc[0]
    assert fc["mean"] == pytest.approx(0.42) and fc["hi"] - fc["lo"] == pytest.approx(2 * T975_2 * 0.02 / math.sqrt(3))
    v = R.size_verdicts(df, s, SIZES).set_index("task")
    b = v.loc["trait_bin"]
    half = T975_2 * 0.05 / math.sqrt(3)
    assert b["best"] == "l" and b["best_mean"] == pytest.approx(0.85)
    assert b["best_lo"] == pytest.approx(0.85 - half) and b["best_hi"] == pytest.approx(0.85 + half)
    assert b["runner_up"] == "m" and b["vs_next_diff"] == pytest.approx(0.85 - 0.72)
    assert b["vs_fc_diff"] == pytest.approx(-0.05)
    # per-repeat slopes vs log10(N) = 4, 5, 6: (l - s) / 2 in each repeat (least squares through three points)
    slopes = [(0.80 - 0.60) / 2, (0.85 - 0.62) / 2, (0.90 - 0.64) / 2]
    assert b["slope"] == pytest.approx(np.mean(slopes)) and b["slope_n"] == 3
    assert b["slope_lo"] > 0 and b["verdict"] == "bigger is better"
    c = v.loc["trait_cont"]
    assert c["best"] == "l" and c["slope"] < 0 and c["verdict"] == "bigger is better"  # MAE: lower is better
    assert c["large_vs_small_diff"] == pytest.approx(np.mean([0.70, 0.75, 0.72]) - np.mean([0.95, 0.97, 0.93]))


def test_verdict_flips_when_the_metric_falls_with_size():
    df = _rising()
    sizes = {"s": 1e6, "m": 1e5, "l": 1e4}  # same numbers, sizes reversed: the metric now falls as size grows
    v = R.size_verdicts(df, R.size_summary(df, sizes), sizes).set_index("task")
    assert v.loc["trait_bin", "verdict"] == "bigger is worse" and v.loc["trait_bin", "slope_hi"] < 0
    assert v.loc["trait_cont", "verdict"] == "bigger is worse" and v.loc["trait_cont", "slope_lo"] > 0
    assert v.loc["trait_bin", "best"] == "l"  # the best cell does not depend on the sizes, its size does
    assert v.loc["trait_bin", "best_n_params"] == 1e4


def test_no_trend_when_repeats_disagree_and_one_repeat_fallback():
    df = _rows({("trait_bin", "s"): [0.6, 0.8, 0.7], ("trait_bin", "m"): [0.7, 0.6, 0.7],
                ("trait_bin", "l"): [0.8, 0.6, 0.7]})
    v = R.size_verdicts(df, R.size_summary(df, SIZES), SIZES).iloc[0]
    assert v["verdict"] == "no trend shown" and v["slope_lo"] < 0 < v["slope_hi"]
    one = _rows({("trait_bin", "s"): [0.6], ("trait_bin", "m"): [0.7], ("trait_bin", "l"): [0.81]})
    v1 = R.size_verdicts(one, R.size_summary(one, SIZES), SIZES).iloc[0]
    res = stats.linregress([4, 5, 6], [0.6, 0.7, 0.81])
    q = stats.t.ppf(0.975, 1)
    assert v1["slope"] == pytest.approx(res.slope) and v1["slope_p"] == pytest.approx(res.pvalue)
    assert v1["slope_hi"] - v1["slope_lo"] == pytest.approx(2 * q * res.stderr)
    assert "one repeat" in v1["slope_how"]


def test_degenerate_size_is_flagged_and_not_best(tmp_path):
    df = _rows({("trait_cont", "s"): [0.9, 0.92, 0.91], ("trait_cont", "m"): [0.80, 0.82, 0.81],
                ("trait_cont", "l"): [0.70, 0.71, 0.72], ("trait_bin", "s"): [0.6, 0.65, 0.7],
                ("trait_bin", "m"): [0.5, 0.5, 0.5], ("trait_bin", "l"): [0.55, 0.6, 0.65]},
               fc={"trait_bin": [0.9, 0.9, 0.9], "trait_cont": [0.3, 0.3, 0.3]},
               pearson_nan={("trait_cont", "l")}, flat_auroc={("trait_bin", "m")})
    s = R.size_summary(df, SIZES)
    assert s.set_index(["task", "checkpoint"]).loc[("trait_cont", "l"), "degenerate"] == "constant prediction"
    v = R.size_verdicts(df, s, SIZES).set_index("task")
    assert v.loc["trait_cont", "best"] == "m" and v.loc["trait_cont", "degenerate_sizes"] == ["l"]
    assert v.loc["trait_bin", "degenerate_sizes"] == ["m"]
    out = R.write_report(df, SIZES, tmp_path)
    md = out["md"].read_text()
    assert "| FC baseline (correlation, blocks atlas) | - | 0.300 [0.300, 0.300] | 3 |" in md
    assert "| l | 1e+03k" not in md and "| l | 1M | 0.710 [" in md and "† |" in md
    assert "† degenerate: l (excluded from the best size; kept in the trend)" in md
    assert "Best size: **m** (100k)" in md
    assert "| m | 100k | 0.500 [0.500, 0.500] † | 3 | 0.500 § |" in md and "§ bacc exactly 0.5" in md
    assert "| s | 10k | **0.650 [" in md and "| 3 | 0.600 |" in md  # the second metric beside the headline one
    js = json.loads(out["json"].read_text())
    assert {r["checkpoint"] for r in js["summary"] if r["strategy"] == "fc"} == {"fc"}
    assert [r["degenerate_sizes"] for r in js["verdicts"]] == [["m"], ["l"]] or \
        sorted(map(tuple, (r["degenerate_sizes"] for r in js["verdicts"]))) == [("l",), ("m",)]
    assert out["png"].stat().st_size > 10_000


def test_config_search_report_carries_the_fc_row_with_intervals(tmp_path):
    from study.config_search import write_report

    df = _rows({("trait_bin", "default"): [0.6, 0.7, 0.65], ("trait_bin", "MR_0p2"): [0.7, 0.75, 0.8],
                ("trait_cont", "default"): [0.9, 0.8, 0.85], ("trait_cont", "MR_0p2"): [0.7, 0.8, 0.75]})
    df["strategy"], df["method"] = "last_block", "Fine-tuned last block"
    fc = _rows({}, fc={"trait_bin": [0.9, 0.92, 0.91], "trait_cont": [0.3, 0.32, 0.31]})
    md = write_report(df, fc, ["default", "MR_0p2"], tmp_path)
    assert "FC_baseline" in md and "not ranked" in md
    half = T975_2 * 0.01 / math.sqrt(3)
    assert f"| FC baseline (correlation, blocks atlas) | 0.910 [{0.91 - half:.3f}, {0.91 + half:.3f}] (n=3) |" in md
    assert "| MR_0p2 | 0.750 [" in md and "| FC baseline |" in md  # the gains table names the baseline
    table = pd.read_csv(tmp_path / "config_ranking.csv", index_col=0)
    assert table.loc["FC_baseline", "trait_bin/auroc"] == pytest.approx(0.91)
    assert math.isnan(table.loc["FC_baseline"][[c for c in table.columns if c.startswith("rank__")][0]])
    assert table.index[0] == "MR_0p2"  # the ranking itself is unchanged: the better config first
    md_no = write_report(df, None, ["default", "MR_0p2"], tmp_path / "nofc")
    assert "no FC baseline row" in md_no


# --------------------------------------------------------------------------------------------------
# the CLI on a tiny ladder
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("sizecohort")
    return str(generate_cohort(root, n_subjects=16, grid=(24, 24, 24), n_frames=8, seed=4, progress=False,
                               fractions=(0.5, 0.25, 0.25), trait_scale=2.0))


def _export(tmp_path, width: int):
    import torch

    from neuro_models import registry as R_
    from study import checkpoint as ckpt
    from study.run_math import model_config
    from study.spec import RunSpec

    spec = RunSpec(family="swift_v2", size="debug", width=width, grid=(24, 24, 24), sequence_length=4,
                   model_overrides={"decoder_dim": width})
    cfg = model_config(spec)
    d = tmp_path / f"ck{width}"
    d.mkdir()
    torch.manual_seed(width)
    torch.save(R_.build_pretrain_model(cfg).state_dict(), d / "model.pt")
    return ckpt.export_weights(d, tmp_path / f"w{width}.safetensors", model_config=cfg, spec_json=spec.to_json())


def test_cli_refuses_without_a_ladder(tmp_path, capsys):
    from study.size_task import main

    assert main(["--storage", str(tmp_path)]) == 2
    assert "--from-study" in capsys.readouterr().err
    w = _export(tmp_path, 16)
    assert main(["--storage", str(tmp_path), "--weights", str(w), "--manifest", str(tmp_path / "none.parquet")]) == 2


@pytest.mark.slow  # ~40 s on a busy 2-core CPU: 8 tiny fine-tuning runs
def test_cli_on_explicit_weights(tiny_cohort, tmp_path, capsys):
    from study.size_task import load_study, main

    w16, w32 = _export(tmp_path, 16), _export(tmp_path, 32)
    argv = ["--storage", str(tmp_path), "--study-name", "st", "--weights", str(w32), str(w16),
            "--manifest", tiny_cohort, "--tasks", "trait_bin:classification", "trait_cont:regression",
            "--repeats", "2", "--steps", "2", "--no-progress", "--device", "cpu",
            "--spec-json", json.dumps({"batch_size": 4, "eval_every": 2, "precision": "fp32"})]
    assert main(argv) == 0
    out = capsys.readouterr().out
    study = tmp_path / "st"
    js = json.loads((study / "size_task.json").read_text())
    sizes = js["sizes"]
    assert sizes["w16"] < sizes["w32"] and len(js["verdicts"]) == 2
    assert {(r["task"], r["checkpoint"]) for r in js["summary"]} == {
        (t, c) for t in ("trait_bin", "trait_cont") for c in ("w16", "w32", "fc")}
    assert all(r["n"] == 2 for r in js["summary"] if r["strategy"] == "full")
    fc_bin = next(r for r in js["summary"] if r["strategy"] == "fc" and r["task"] == "trait_bin")
    assert fc_bin["n"] == 0 and fc_bin["degenerate"].startswith("not fitted")  # 16 subjects: 1 of a class
    assert "FC baseline" in out and "Bigger is better?" in out and (study / "size_task.png").exists()
    df, sz = load_study(study)
    assert sz == sizes and len(df[df.strategy == "full"]) == 8 and (df.strategy == "fc").sum() == 4
    parts = len(list((study / "store" / "finetune").glob("part-*.parquet")))
    assert main(argv) == 0  # a rerun trains nothing
    assert len(list((study / "store" / "finetune").glob("part-*.parquet"))) == parts


@pytest.mark.slow  # ~40 s: three 2-step pre-training runs, then 4 fine-tuning runs
def test_cli_from_a_pretraining_study_picks_one_run_per_size(tiny_cohort, tmp_path):
    """A study folder as the scaling study writes it (train table + runs/<run_id>/inline/checkpoints): one rung per
    width, the run with the lowest final val_loss of that width."""
    from analysis.store import ResultsStore
    from study.devices import local_context
    from study.size_task import ladder_from_study, main
    from study.spec import RunSpec
    from study.train import train

    study = tmp_path / "demo"
    store = ResultsStore(study / "store")
    for width, steps in ((16, 2), (16, 3), (32, 2)):
        spec = RunSpec(study="demo", family="swift_v2", size="debug", width=width, grid=(24, 24, 24),
                       sequence_length=4, batch_size=4, budget=steps, eval_every=steps, eval_windows=4,
                       model_overrides={"decoder_dim": width}, manifest=tiny_cohort, precision="fp32")
        res = train(spec, local_context(), None, run_dir=study / "runs" / spec.run_id / "inline")
        row = {**res.final_metrics, "run_id": spec.run_id, **spec.flat_columns()}
        row["val_loss"] = {2: 0.5, 3: 0.4}[steps] if width == 16 else 0.3  # the 3-step width-16 run is best
        row["is_final"] = True
        store.append("train", [{k: v for k, v in row.items() if not isinstance(v, (dict, list))}])
    rungs = ladder_from_study(study, tmp_path / "exported")
    assert [r.label for r in rungs] == ["swift_v2-debug-w16", "swift_v2-debug-w32"]
    assert rungs[0].val_loss == 0.4 and rungs[0].n_params < rungs[1].n_params
    largest = ladder_from_study(study / "store", tmp_path / "exported2", pick="largest")
    assert largest[0].run_id == rungs[0].run_id  # 3 steps is also the larger budget
    assert main(["--storage", str(tmp_path), "--from-study", str(study), "--manifest", tiny_cohort,
                 "--tasks", "trait_cont:regression", "--repeats", "2", "--steps", "2", "--no-progress",
                 "--device", "cpu", "--spec-json", json.dumps({"batch_size": 4, "precision": "fp32"})]) == 0
    js = json.loads((tmp_path / "size-task" / "size_task.json").read_text())
    assert [v["task"] for v in js["verdicts"]] == ["trait_cont"] and js["verdicts"][0]["slope_n"] == 2
