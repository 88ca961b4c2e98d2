"""The data-diversity study mode (issue #27 item 5): one ladder, one run group per mixture, in one study store.

Default tests check the plan (no training); the ``slow`` ones train: a 4-run smoke ladder through the study runner
(resumes as a no-op) and the ``--quick`` demonstration itself (non-degenerate per-mixture results)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from study.diversity import QUICK_MAX_BUDGET, ladder_plan, main, parse_mixture, plan_diversity
from study.plans import DEMO_BUDGETS, load_plan


def test_parse_mixture():
    assert parse_mixture("all") == {}
    assert parse_mixture("cohort_a") == {"cohort_a": 1.0}
    assert parse_mixture("cohort_a:0.7, cohort_b:0.3") == {"cohort_a": 0.7, "cohort_b": 0.3}
    for bad in ("cohort_a:x", "cohort_a:0", ":1"):
        with pytest.raises(ValueError):
            parse_mixture(bad)


def test_quick_plan_is_the_demo_ladder_once_per_mixture():
    demo = load_plan("demo", SimpleNamespace())
    ladder = ladder_plan("demo", SimpleNamespace(), max_budget=QUICK_MAX_BUDGET)
    # the demo's runs on the natural mixture at its five smallest budgets; its own one-cohort run is left out
    assert QUICK_MAX_BUDGET == sorted(DEMO_BUDGETS)[4]
    expect = [s for s in demo.specs if not s.cohorts and s.budget <= QUICK_MAX_BUDGET]
    assert [s.run_id for s in ladder.specs] == [s.run_id for s in expect] and len(expect) == 8
    plan = plan_diversity(ladder, {"cohort_a": {"cohort_a": 1.0}, "all": {}}, name="div")
    assert len(plan.specs) == 16 and plan.name == "div" and plan.cohort == demo.cohort
    one = [s for s in plan.specs if s.cohorts]
    nat = [s for s in plan.specs if not s.cohorts]
    assert len(one) == len(nat) == 8 and all(dict(s.cohorts) == {"cohort_a": 1.0} for s in one)
    # the same ladder: the runs differ from the ladder's in their mixture only (and the study name)
    assert [s.replace(cohorts={}).run_id for s in one] == [s.run_id for s in nat] == [s.run_id for s in expect]
    assert all(s.study == "div" for s in plan.specs)
    # the mixtures of one ladder run side by side: a study cut short holds both mixtures' runs
    assert [bool(s.cohorts) for s in plan.specs[:4]] == [True, False, True, False]
    assert {s.width for s in nat} == {16, 32, 48, 64} and len({s.budget for s in nat}) == 5


def test_n_subjects_and_bad_mixture_sets():
    ladder = ladder_plan("smoke", SimpleNamespace())
    plan = plan_diversity(ladder, {"a": {"cohort_a": 1.0}, "all": {}}, n_subjects=6)
    assert {s.n_subjects for s in plan.specs} == {6}
    with pytest.raises(ValueError, match="two or more"):
        plan_diversity(ladder, {"all": {}})
    with pytest.raises(ValueError, match="repeat"):
        plan_diversity(ladder, {"x": {"cohort_a": 1.0}, "y": {"cohort_a": 1.0}})


def test_dry_run_and_bad_input(capsys, tmp_path):
    assert main(["--quick", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "16 runs" in out and out.count("cohort_a:1") == 8 and "mixtures ['cohort_a', 'all']" in out
    assert main(["--quick", "--preset", "smoke", "--dry-run"]) == 2
    assert "leave --preset out" in capsys.readouterr().err
    assert main(["--mixtures", "all", "--dry-run"]) == 2
    assert main(["--mixtures", "cohort_a:zero", "all", "--dry-run"]) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_ladder_trains_per_mixture_in_one_store_and_resumes(tmp_path, capsys):
    from analysis.store import read_table

    argv = ["--preset", "smoke", "--storage", str(tmp_path), "--num-cpus", "2", "--bootstrap", "20"]
    assert main(argv) == 0
    rows = read_table(tmp_path / "diversity" / "store", "train")
    fin = rows[rows["is_final"].fillna(False).astype(bool)]
    assert len(fin) == 4 and set(fin["mixture"]) == {"[]", '[["cohort_a", 1.0]]'}
    out = capsys.readouterr().out
    assert "# Data diversity" in out and (tmp_path / "diversity" / "report" / "diversity" / "diversity.png").is_file()
    assert main(argv) == 0
    assert "0 to run" in capsys.readouterr().out


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.ray
def test_quick_mode_gives_both_mixtures_a_law_and_a_held_out_error(tmp_path):
    """The 2-CPU demonstration: per mixture an L(C) fit with an interval, approach 3 and a held-out error (whatever
    their validity: the test asks for non-degenerate numbers, not a verdict)."""
    assert main(["--quick", "--storage", str(tmp_path), "--num-cpus", "2"]) == 0
    res = json.loads((tmp_path / "diversity" / "report" / "diversity" / "diversity.json").read_text())
    assert [m["mixture"] for m in res["mixtures"]] == ["cohort_a", "all"]
    for m in res["mixtures"]:
        assert m["n_final_points"] == 8
        a = m["exponents"]["alpha_C"]
        assert a["lo"] is not None and a["lo"] < a["hi"]
        assert {"alpha_N", "beta_D"} <= set(m["exponents"])
        assert abs(m["extrapolation"]["rel_error"]) < 1.0
