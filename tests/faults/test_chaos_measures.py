"""The chaos campaign's measures (``benchmarks/chaos.py``) on hand-made stores, without running a study."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _rows(run_id, steps, **extra):
    return [{"run_id": run_id, "step": s, "val_loss": 1.0 / s, "is_final": False, **extra} for s in steps]


def test_compute_lost_counts_steps_trained_twice_per_run(tmp_path):
    import chaos
    from analysis.store import ResultsStore

    store = ResultsStore(tmp_path / "chaos" / "store")
    store.append("train", _rows("a", [1, 2, 3]))
    store.append("train", _rows("a", [3, 4, 5]))  # resumed from step 2's checkpoint: step 3 trained twice
    store.append("train", _rows("b", [1, 2]))
    store.append("train", _rows("b", [2], status="early_stopped"))  # the stop mark re-emits a row by design
    kills = [{"kind": "driver", "applied": True, "steps_at_kill": {"a": 3, "b": 1}},
             {"kind": "trial", "applied": False}]
    got = chaos.compute_lost(tmp_path, kills)
    assert got["per_run"]["a"] == {"raw_steps": 6, "distinct_steps": 5, "redone": 1}
    assert got["per_run"]["b"]["redone"] == 0
    assert got["steps_redone_total"] == 1 and got["steps_redone_per_kill_max"] == 1
    assert got["kills_over_interval"] == 0  # 1 step redone, checkpoint interval 1
    store.append("train", _rows("a", [4, 5]))  # a second resume from step 3: two more steps redone
    assert chaos.compute_lost(tmp_path, kills)["kills_over_interval"] == 1


def test_the_campaign_command_passes_its_trial_launcher():
    import chaos

    assert "--trial-launcher" not in chaos.command(Path("/s"))  # auto: the study's own choice (inline here)
    cmd = chaos.command(Path("/s"), launcher="ray-train")
    assert cmd[cmd.index("--trial-launcher") + 1] == "ray-train"
    assert set(chaos.VICTIM_TITLE) == {"trial", "worker"} and set(chaos.KINDS) >= {"driver", "trial", "worker", "disk"}


def test_worker_kills_need_ray_train_workers(tmp_path, capsys):
    import chaos
    import pytest

    with pytest.raises(ValueError, match="ray-train"):
        chaos.campaign(tmp_path, [1], 1, kinds=("worker",))
    assert not (tmp_path / "code").exists()  # refused before anything ran
    with pytest.raises(SystemExit) as e:
        chaos.main(["--kinds", "worker", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "needs --launcher ray-train" in capsys.readouterr().err


def test_snapshot_duplicates_are_training_rows_written_twice_not_early_stop_marks(tmp_path):
    import chaos
    from analysis.store import ResultsStore

    store = ResultsStore(tmp_path / "chaos" / "store")
    store.append("train", _rows("a", [1, 2], status="running"))
    # a Ray Train trial that trains on while it stops: its mark copies step 2's row, then steps 3-4 come
    store.append("train", _rows("a", [2], status="early_stopped"))
    store.append("train", _rows("a", [3, 4], status="running"))
    store.append("train", _rows("b", [1, 2, 3], status="running"))
    store.append("train", _rows("b", [3], status="running"))  # resumed before step 3's checkpoint: written twice
    got = chaos.snapshot(tmp_path)
    assert got["duplicates"] == {"b@3": 2}


def test_the_grid_study_is_the_search_study_on_fixed_lrs():
    import chaos

    search, grid = chaos.search_plan(), chaos.grid_plan()
    assert grid.lr_search is None and [s.lr for s in grid.specs] == list(chaos.GRID_LRS)
    assert {s.replace(lr=1.0).spec_hash for s in grid.specs} == {search.specs[0].replace(lr=1.0).spec_hash}
    try:
        chaos.PLAN = "grid"
        assert "chaos:grid_plan" in chaos.command(Path("/s"))
    finally:
        chaos.PLAN = "search"
    assert "chaos:search_plan" in chaos.command(Path("/s"))
