"""A study with an Optuna LR search and early stopping whose driver is SIGKILLed mid-search, then rerun with
the same command (issue #29 item 1), compared with an uninterrupted study of the same seed: the same suggested
LRs trial by trial, no finished trial rerun (no row of it written twice), the same early-stop decisions, every
row once with equal numbers. Also a short seeded chaos schedule (``benchmarks/chaos.py``, item 3).

The study is ``benchmarks/chaos.py``'s: 6 Optuna trials in generations of 2, tiny NeuroMamba runs of 9 steps
on CPU, ``--asha`` (about 80 s uninterrupted on the 2-core development box)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    import chaos

    chaos.freeze(tmp_path_factory.mktemp("code"))  # the code as it was when the tests started
    root = tmp_path_factory.mktemp("chaos-ref")
    chaos.run_reference(root)
    return root, chaos.snapshot(root)


def _runs_with_rows(storage: Path) -> set[str]:
    from study.search_state import run_rows

    df = run_rows(storage / "chaos" / "store")
    return set(df["run_id"]) if len(df) else set()


@pytest.mark.timeout(1500)
def test_driver_killed_mid_search_resumes_the_search_and_its_early_stops(reference, tmp_path):
    import chaos

    ref_root, ref = reference
    assert len(ref["trials"]) == 6 and all(t["state"] == "COMPLETE" for t in ref["trials"])
    shutil.copytree(ref_root / "cohorts", tmp_path / "cohorts")  # same manifest, no second generation
    proc = subprocess.Popen(chaos.command(tmp_path), cwd=chaos.ROOT, env=chaos._env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    # kill while generation 1 trains: its first rows are in, generation 0 is finished and told
    while time.time() - t0 < 600 and len(_runs_with_rows(tmp_path)) < 3 and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, "the study ended before the kill"
    chaos._kill_tree(proc)
    before = chaos.snapshot(tmp_path)
    assert 2 < len(before["trials"]) < 6  # a part of the search ran
    assert [t["lr"] for t in before["trials"]] == [t["lr"] for t in ref["trials"]][:len(before["trials"])]
    finished_before = {k for k, v in before["status"].items() if v == "finished"}
    out = subprocess.run(chaos.command(tmp_path), cwd=chaos.ROOT, env=chaos._env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = chaos.snapshot(tmp_path)
    diff = chaos.compare(ref, got)
    assert {k: v for k, v in diff.items() if k != "detail"} == dict.fromkeys(
        ("suggestions_differing", "trial_states_differing", "decisions_differing", "rows_lost", "rows_extra",
         "rows_unequal", "rows_duplicated"), 0), diff["detail"]
    assert [t["value"] for t in got["trials"]] == pytest.approx([t["value"] for t in ref["trials"]], rel=1e-6)
    # the runs finished before the kill were not run again: none of their rows was written twice (compare's
    # rows_duplicated) and the rerun's Tuners only held the unfinished trials
    assert finished_before and not set(got["duplicates"]) & finished_before
    assert "early-stopped" in out.stdout or any(t["early_stopped"] for t in got["trials"])
    # a third run of the command is a no-op: the search is done
    again = subprocess.run(chaos.command(tmp_path), cwd=chaos.ROOT, env=chaos._env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and chaos.snapshot(tmp_path) == got


@pytest.mark.timeout(1800)
def test_chaos_smoke_one_seeded_schedule(reference, tmp_path):
    """Two random kills (driver / inline trial actor) during the study, each recovered as documented."""
    import chaos

    ref_root, ref = reference
    shutil.copytree(ref_root / "cohorts", tmp_path / "cohorts")
    res = chaos.run_schedule(tmp_path, seed=7, n_kills=2)
    assert res["exit"] == 0, res
    diff = chaos.compare(ref, chaos.snapshot(tmp_path))
    assert all(v == 0 for k, v in diff.items() if k != "detail"), (res, diff["detail"])


def _storage_faults_twice(reference, tmp_path, kind: str, seed: int) -> None:
    """Two ``kind`` faults of the study's own file system (a tmpfs) at random points; the study recovers as
    documented (Tune retries a failed trial, a command that exits with an error is rerun) and equals the
    uninterrupted one, and no kill costs more than one checkpoint interval."""
    import chaos

    ref_root, ref = reference
    disk = tmp_path / "disk"
    try:
        chaos.mount_small_disk(disk)
    except RuntimeError as err:
        pytest.skip(str(err))
    try:
        shutil.copytree(ref_root / "cohorts", disk / "cohorts")
        res = chaos.run_schedule(disk, seed=seed, n_kills=2, kinds=(kind,))
        assert res["exit"] == 0, res
        assert sum(k["applied"] for k in res["kills"]) >= 1, res  # the fault came at least once
        diff = chaos.compare(ref, chaos.snapshot(disk))
        assert all(v == 0 for k, v in diff.items() if k != "detail"), (res, diff["detail"])
        assert chaos.compute_lost(disk, res["kills"])["kills_over_interval"] == 0
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.timeout(1800)
def test_chaos_smoke_disk_full_twice(reference, tmp_path):
    """The study's disk fills up for 1-4 s, twice (ENOSPC for a result row, a checkpoint, Optuna's journal or
    Tune's state), then is freed."""
    _storage_faults_twice(reference, tmp_path, "disk", seed=8)


@pytest.mark.timeout(1800)
def test_chaos_smoke_read_only_storage_twice(reference, tmp_path):
    """The study's file system goes read-only for 1-4 s, twice (EROFS for every write, as when a shared file
    system's server goes away), then read-write again."""
    _storage_faults_twice(reference, tmp_path, "readonly", seed=9)
