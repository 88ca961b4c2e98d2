"""study.adaptive: the adaptive ladder's rounds on the demo preset's runs, with a stand-in runner that
writes planted-law losses to the results store (no Ray, no training): rounds are stored, nothing is
chosen twice, the budget holds, and a rerun resumes from the stored rounds."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from analysis.store import ResultsStore
from study.adaptive import read_rounds, run_adaptive, spec_costs
from study.plans import demo, run_summary

LAW = dict(E=0.06, A=2.0, alpha=0.35, B=3.0, beta=0.35)


def fake_runner(store_dir: Path, log: list):
    def run(specs):
        st = ResultsStore(store_dir)
        have = set(log)
        for s in specs:
            if s.run_id in have:
                continue
            r = run_summary(s)
            L = LAW["E"] + LAW["A"] / r["params"] ** LAW["alpha"] + LAW["B"] / r["tokens"] ** LAW["beta"]
            st.append("train", [dict(run_id=s.run_id, step=r["steps"], val_loss=float(L), is_final=True)])
            log.append(s.run_id)
        return SimpleNamespace(store_dir=store_dir)
    return run


def args(**kw):
    base = dict(target="loss@1e14", budget_gpu_hours=0.12, target_width=None, batch_size=1, max_rounds=10, n_boot=50)
    return Namespace(**{**base, **kw})


def test_adaptive_rounds_are_stored_and_resume(tmp_path):
    plan = demo()
    store = tmp_path / "store"
    log: list = []
    run_adaptive(plan, args(max_rounds=1), repo_root=tmp_path, runner=fake_runner(store, log))
    first = read_rounds(store)
    assert list(first["round"]) == [0] and first["stop_reason"].iloc[0] == ""
    picked = json.loads(first["chosen"].iloc[0])
    assert len(picked) == 1 and picked[0] in log  # the choice was run
    n_after_first = len(log)
    # rerun: reads round 0 back, continues at round 1, never re-runs or re-picks a run
    run_adaptive(plan, args(), repo_root=tmp_path, runner=fake_runner(store, log))
    rounds = read_rounds(store)
    assert list(rounds["round"]) == list(range(len(rounds))) and len(rounds) >= 2
    assert rounds["stop_reason"].iloc[-1] != ""
    assert len(log) == len(set(log)) and len(log) > n_after_first
    chosen = [x for c in rounds["chosen"] for x in json.loads(c)]
    assert len(chosen) == len(set(chosen))
    specs = [s for s in plan.specs if not s.cohorts]
    cost, source = spec_costs(plan, specs)
    assert source.startswith("analytic")
    spent = sum(c for s, c in zip(specs, cost) if s.run_id in log)
    assert spent <= 0.12 + 1e-12
    last = rounds.iloc[-1]
    assert last["lo"] <= last["point"] <= last["hi"]
    cands = json.loads(rounds["candidates"].iloc[0])
    assert {"run_id", "N", "D", "cost", "reduction", "score", "pick"} <= set(cands[0])
    # a finished ladder is not extended by a third call
    run_adaptive(plan, args(), repo_root=tmp_path, runner=fake_runner(store, log))
    assert len(read_rounds(store)) == len(rounds)


def test_adaptive_refuses_bad_flags(tmp_path):
    plan = demo()
    run = fake_runner(tmp_path / "store", [])
    with pytest.raises(ValueError, match="--target"):
        run_adaptive(plan, args(target=None), repo_root=tmp_path, runner=run)
    with pytest.raises(ValueError, match="budget-gpu-hours"):
        run_adaptive(plan, args(budget_gpu_hours=-1.0), repo_root=tmp_path, runner=run)
    with pytest.raises(ValueError, match="initial design"):
        run_adaptive(plan, args(budget_gpu_hours=1e-6), repo_root=tmp_path, runner=run)
    with pytest.raises(ValueError, match="target"):
        run_adaptive(plan, args(target="loss1e14"), repo_root=tmp_path, runner=run)


def test_adaptive_preregisters_each_extrapolated_run_before_it_runs(tmp_path):
    from analysis.design import ROUNDS_TABLE, RULES
    from analysis.predictions import join_outcomes, read_predictions
    from study.adaptive import ACQUISITION_RULES, ROUNDS_TABLE as STUDY_ROUNDS_TABLE, write_report

    assert STUDY_ROUNDS_TABLE == ROUNDS_TABLE and ACQUISITION_RULES == RULES
    plan = demo()
    store = tmp_path / "store"
    log: list = []
    run_adaptive(plan, args(), repo_root=tmp_path, runner=fake_runner(store, log))
    rounds = read_rounds(store)
    preds = read_predictions(store).set_index("run_id")
    flops = {s.run_id: run_summary(s)["flops"] for s in plan.specs}
    expected = set()
    for _, r in rounds.iterrows():
        used = json.loads(r["runs"])
        for rid in json.loads(r["chosen"]):
            if flops[rid] > max(flops[u] for u in used):  # auto: beyond every run the round's fit used
                expected.add(rid)
                assert json.loads(preds.loc[rid, "data_runs"]) == sorted(used)
                assert preds.loc[rid, "source"].startswith(f"adaptive round {int(r['round'])}")
        assert set(json.loads(r["predictions"])) <= set(json.loads(r["chosen"]))
    assert expected and set(preds.index) == expected
    j = join_outcomes(store)
    assert j["hash_ok"].all() and j["preregistered"].all() and j["outcome"].notna().all()
    n_parts = len(ResultsStore(store).parts("predictions"))
    run_adaptive(plan, args(), repo_root=tmp_path, runner=fake_runner(store, log))  # finished: nothing new
    assert len(ResultsStore(store).parts("predictions")) == n_parts
    out = write_report(store)
    md = (out / "adaptive.md").read_text()
    assert (out / "adaptive_interval.png").stat().st_size > 0 and (out / "predictions.png").stat().st_size > 0
    assert sum(line.startswith("| ") and line.split("|")[1].strip().isdigit() for line in md.splitlines()) == len(rounds)
    assert f"held for {int(j['held'].sum())} of {len(j)}" in md


def test_grid_ladder_preregisters_the_largest_budget(tmp_path, capsys):
    from analysis.predictions import join_outcomes
    from study.adaptive import run_plan_preregistered

    plan = demo()
    store = tmp_path / "store"
    log: list = []
    a = Namespace(preregister_above="auto", prediction_level=0.9)
    run_plan_preregistered(plan, a, repo_root=tmp_path, runner=fake_runner(store, log), n_boot=50)
    top = max(s.budget for s in plan.specs)
    big = {s.run_id for s in plan.specs if s.budget == top and not s.cohorts}
    small = sorted(s.run_id for s in plan.specs if s.budget < top and not s.cohorts)
    j = join_outcomes(store).set_index("run_id")
    assert set(j.index) == big and j["preregistered"].all() and j["hash_ok"].all()
    assert all(json.loads(d) == small for d in j["data_runs"])
    assert set(log[:len(small)]) == set(small) and set(log) == {s.run_id for s in plan.specs}
    # a threshold above every run: nothing to predict, the plan still runs (and says so)
    store2 = tmp_path / "store2"
    log2: list = []
    run_plan_preregistered(plan, Namespace(preregister_above=1e30), repo_root=tmp_path,
                           runner=fake_runner(store2, log2))
    assert "predictions: none" in capsys.readouterr().out and len(log2) == len(plan.specs)
    assert not (store2 / "predictions").exists()
