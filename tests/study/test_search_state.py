"""Durable LR search and early stopping (study.search_state, issue #29 item 1): pure, no Ray, a second or two.

The end-to-end proof (a real study whose driver is SIGKILLed and rerun) is
``tests/faults/test_search_resume.py``."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.store import append_rows
from study.search_state import (LRSearchState, asha_should_stop, journal_path, rung_value, rungs, run_outcome,
                                run_rows)


def _loss(lr: float) -> float:
    return (math.log10(lr) + 2.5) ** 2


def _search(path, n_trials=9, batch=3, seed=3):
    return LRSearchState(path, "g", seed=seed, low=1e-4, high=3e-2, n_trials=n_trials, batch=batch)


def _drive(path, stop_after: int | None = None, **kw) -> LRSearchState:
    """Ask and tell like the driver; ``stop_after``: the driver dies after telling that many trials."""
    s = _search(path, **kw)
    told = 0
    while gen := s.ask_generation():
        for t in gen:
            s.tell(t.number, "finished", _loss(t.lr))
            told += 1
            if stop_after is not None and told == stop_after:
                return s
    return s


@pytest.mark.parametrize("stop_after", [1, 3, 4, 7])
def test_a_killed_and_rerun_search_asks_the_lrs_an_uninterrupted_one_asks(tmp_path, stop_after):
    ref = _drive(tmp_path / "ref.journal", n_trials=13, batch=4)
    _drive(tmp_path / "k.journal", stop_after=stop_after, n_trials=13, batch=4)
    got = _drive(tmp_path / "k.journal", n_trials=13, batch=4)  # a new driver: a new process's objects
    assert got.suggestions() == ref.suggestions() and len(ref.suggestions()) == 13
    assert [t.value for t in got.trials()] == [t.value for t in ref.trials()]
    assert all(t.state == "COMPLETE" for t in got.trials())
    # the search is done: a third run asks nothing and runs nothing
    assert _search(tmp_path / "k.journal", n_trials=13, batch=4).ask_generation() == []


def test_a_driver_killed_between_asks_completes_the_generation_with_the_same_lrs(tmp_path):
    ref = _drive(tmp_path / "ref.journal")
    s = _search(tmp_path / "k.journal")
    import optuna

    from study.search_state import trial_seed

    # the old driver asked trial 0 of generation 0 and died before trial 1
    optuna.load_study(study_name=s.name, storage=s.storage, sampler=optuna.samplers.TPESampler(
        seed=trial_seed(s.seed, 0))).ask(fixed_distributions={"lr": s.distribution})
    gen = s.ask_generation()
    assert [t.number for t in gen] == [0, 1, 2]
    assert [t.lr for t in gen] == ref.suggestions()[:3]


def test_a_driver_killed_inside_optunas_ask_leaves_a_torn_trial_that_changes_nothing(tmp_path):
    """Found by the chaos campaign (seed 22): a SIGKILL between Optuna creating trial 5 and setting its LR left a
    RUNNING trial without parameters; the rerun numbered the next ask 6, put it in the wrong generation and
    told it FAIL. Generations and seeds now follow each trial's index among the trials that have an LR."""
    ref = _drive(tmp_path / "ref.journal", n_trials=6, batch=2)
    _drive(tmp_path / "k.journal", stop_after=4, n_trials=6, batch=2)
    s = _search(tmp_path / "k.journal", n_trials=6, batch=2)
    s._study().ask()  # generation 2's first ask, torn: a trial with no LR
    got = _drive(tmp_path / "k.journal", n_trials=6, batch=2)
    assert got.suggestions() == ref.suggestions()
    assert [(t.index, t.generation, t.state) for t in got.trials()] == [
        (t.index, t.generation, t.state) for t in ref.trials()]
    assert [t.number for t in got.trials()][-2:] == [5, 6]  # Optuna's numbers skip the torn trial
    assert [t.state.name for t in got._study().get_trials()].count("FAIL") == 1  # the torn one, closed


def test_the_batch_is_stored_with_the_search_and_the_range_is_checked(tmp_path):
    _search(tmp_path / "j", batch=3).ask_generation()
    again = LRSearchState(tmp_path / "j", "g", seed=99, low=1e-4, high=3e-2, n_trials=9, batch=8)
    assert (again.batch, again.seed) == (3, 3)  # a rerun on a bigger allocation keeps the search's design
    with pytest.raises(ValueError, match="use a new --study-name"):
        LRSearchState(tmp_path / "j", "g", seed=3, low=1e-5, high=3e-2, n_trials=9, batch=3)


def _rows(run_id, losses, final_step=None, status="running"):
    return [{"run_id": run_id, "step": s, "val_loss": v, "is_final": s == final_step,
             "status": "finished" if s == final_step else status, "total_steps": 9}
            for s, v in losses.items()]


def test_sync_tells_runs_finished_in_the_store_and_never_reruns_them(tmp_path):
    store = tmp_path / "study" / "store"
    s = LRSearchState(journal_path(store), "g", seed=1, low=1e-4, high=3e-2, n_trials=4, batch=2)
    gen = s.ask_generation()
    run_of = {t.lr: f"run-{t.number}" for t in gen}
    # the driver died after trial 0's final row (before Optuna's tell), while trial 1 was mid-run
    append_rows(store, "train", _rows("run-0", {1: 2.0, 3: 1.5, 9: 1.2}, final_step=9))
    append_rows(store, "train", _rows("run-1", {1: 2.5}))
    assert s.sync(store, lambda lr: run_of[lr]) == [0]
    t0, t1 = s.trials()
    assert (t0.state, t0.value) == ("COMPLETE", 1.2) and t1.state == "RUNNING"
    rerun = s.ask_generation()  # the rerun runs trial 1 (same LR) only, and asks nothing new
    assert [(t.number, t.lr) for t in rerun] == [(1, gen[1].lr)] and len(s.trials()) == 2
    # trial 1 failed in Tune for a cause that is not its own (actor killed, retries spent): still asked,
    # the next command reruns it
    assert s.sync(store, lambda lr: run_of[lr]) == [] and s.trials()[1].state == "RUNNING"
    # trial 1 diverged (a deterministic failure): FAIL, counted against n_trials, not rerun
    assert s.sync(store, lambda lr: run_of[lr], fail={"run-1"}) == [1]
    assert s.trials()[1].state == "FAIL"
    nxt = s.ask_generation()
    assert [t.number for t in nxt] == [2, 3]


def test_an_early_stopped_run_is_told_its_value_at_the_rung_not_its_last_row(tmp_path):
    store = tmp_path / "study" / "store"
    s = LRSearchState(journal_path(store), "g", seed=1, low=1e-4, high=3e-2, n_trials=3, batch=2)
    g0 = s.ask_generation()
    runs = {g0[0].lr: "a", g0[1].lr: "b"}
    append_rows(store, "train", _rows("a", {1: 1.0, 2: 0.9, 9: 0.5}, final_step=9))
    append_rows(store, "train", _rows("b", {1: 1.1, 2: 1.0, 9: 0.6}, final_step=9))
    s.sync(store, lambda lr: runs[lr])
    (c,) = s.ask_generation()
    runs[c.lr] = "c"
    # c is worse than both at rung 1 (stopped there); its trial stored one more row before it was killed
    append_rows(store, "train", _rows("c", {1: 3.0, 2: 2.9}))
    append_rows(store, "train", [{**_rows("c", {2: 2.9})[0], "status": "early_stopped"}])
    assert run_outcome(run_rows(store), "c") == ("early_stopped", 2.9)
    s.sync(store, lambda lr: runs[lr])
    t = s.trials()[2]
    assert (t.state, t.value, t.early_stopped) == ("COMPLETE", 3.0, True)


def test_rungs_and_the_asha_rule():
    assert rungs(9) == [1, 3] and rungs(10) == [1, 3, 9] and rungs(None)[:4] == [1, 3, 9, 27]
    assert rung_value({2: 0.5, 4: 0.4}, 3) == 0.4 and rung_value({2: 0.5}, 3) is None
    refs = [{1: 1.0, 3: 0.8}, {1: 2.0, 3: 1.5}, {1: 3.0}]
    # Ray's ASHA cutoff (mode min, rf 3): worse than the 33rd percentile of the references at the rung
    cut1 = float(np.percentile([1.0, 2.0, 3.0], 100 / 3))
    assert asha_should_stop({1: cut1 + 1e-6}, refs) == 1
    assert asha_should_stop({1: cut1 - 1e-6}, refs) is None
    assert asha_should_stop({1: 1.0, 3: 1.2}, refs) == 3  # survives rung 1, stopped at rung 3 (cut 1.03)
    assert asha_should_stop({1: 1.0, 3: 0.9}, refs) is None
    assert asha_should_stop({1: 9.0}, []) is None  # nothing to compare with: go on
    assert asha_should_stop({1: 9.0, 2: 9.0}, refs, max_step=1) is None  # never stopped at its last step
    # a re-emitted or reordered curve gives the same decision (a pure function of the rows)
    assert asha_should_stop(dict(reversed(list({1: 1.0, 3: 1.2}.items()))), list(reversed(refs))) == 3


def _journal_with_trials(path, n):
    import optuna

    from study.search_state import journal_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(study_name="s", storage=journal_storage(path), load_if_exists=True)
    for _ in range(n):
        t = st.ask()
        t.suggest_float("lr", 1e-4, 1e-1, log=True)
        st.tell(t, 1.0)
    return st


def test_a_journal_append_that_hits_a_full_disk_leaves_no_torn_record(tmp_path, monkeypatch):
    """ENOSPC part-way through an append (the chaos campaign's disk-full fault): the append fails, the journal is
    cut back to its last record, and later appends and reads work. With Optuna's own backend the torn bytes stay,
    the next record is glued onto them and every later read fails: every rerun of the study exited 2."""
    import errno
    import os

    import optuna

    path = tmp_path / "j.journal"
    _journal_with_trials(path, 2)
    before = path.read_bytes()
    real_write, calls = os.write, []

    def half_then_enospc(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    st = optuna.load_study(study_name="s", storage=__import__("study.search_state", fromlist=["x"]).journal_storage(path))
    monkeypatch.setattr("study.search_state.STORAGE_RETRY_S", 0.0)  # the disk stays full: no waiting it out
    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError):
        st.ask()
    monkeypatch.setattr(os, "write", real_write)
    assert len(calls) == 2 and path.read_bytes() == before  # the half-written record was cut off
    again = _journal_with_trials(path, 1)  # the disk has room again: the search goes on
    assert [t.state.name for t in again.trials] == ["COMPLETE"] * 3


def test_a_torn_tail_left_by_a_killed_writer_is_cut_when_the_journal_opens(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "j.journal"
    _journal_with_trials(path, 2)
    torn = path.read_bytes() + b'{"op_code":4,"worker_id":"x","study_id":0,"datetime_st'
    # Optuna's own backend: the next append is glued onto the torn bytes and the journal no longer reads
    bad = tmp_path / "bad.journal"
    bad.write_bytes(torn)
    with pytest.raises((ValueError, AttributeError)):  # the glued record is lost; reading after it fails
        st = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(bad))))
        st.tell(st.ask(), 1.0)
        optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(bad)))).trials
    # ours: the torn tail is cut on open, the journal reads, and appends go on
    path.write_bytes(torn)
    st = _journal_with_trials(path, 1)
    assert [t.state.name for t in st.trials] == ["COMPLETE"] * 3
    assert path.read_bytes().endswith(b"\n")


def test_a_journal_waits_out_a_read_only_storage_and_gives_up_after_its_limit(tmp_path, monkeypatch, capsys):
    """The chaos campaign's read-only faults (1-4 s) failed the driver: Optuna's journal lock is a symlink made
    beside the journal, and opening or telling the search in that window raised EROFS. Now both wait the fault
    out (one line on stderr), and give up with the error after ``STORAGE_RETRY_S``."""
    import errno
    import os

    import optuna

    from study import search_state as S

    path = tmp_path / "j.journal"
    _journal_with_trials(path, 1)
    real_symlink, failures = os.symlink, []

    def read_only_for(n):
        def symlink(*a, **k):
            if len(failures) < n:
                failures.append(1)
                raise OSError(errno.EROFS, "Read-only file system")
            return real_symlink(*a, **k)
        return symlink

    monkeypatch.setattr(os, "symlink", read_only_for(2))  # opening the journal (its torn-tail check takes the lock)
    st = optuna.load_study(study_name="s", storage=S.journal_storage(path))
    assert len(failures) == 2 and "opening the search journal" in capsys.readouterr().err
    failures.clear()
    monkeypatch.setattr(os, "symlink", read_only_for(3))  # telling a trial
    st.tell(st.ask(), 2.0)
    assert len(failures) == 3 and "writing the search journal" in capsys.readouterr().err
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=S.journal_storage(path)).trials] == \
        ["COMPLETE"] * 2
    # a storage that stays read-only: the error, after the limit
    monkeypatch.setattr(S, "STORAGE_RETRY_S", 0.6)
    failures.clear()
    monkeypatch.setattr(os, "symlink", read_only_for(10**6))
    with pytest.raises(OSError, match="Read-only"):
        st.tell(st.ask(), 3.0)
    assert 2 <= len(failures) <= 3  # tried at 0, 0.5 and (at most) 0.6 s
    # any other error is not waited out
    failures.clear()

    def denied(*a, **k):
        failures.append(1)
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "symlink", denied)
    with pytest.raises(PermissionError):
        S.journal_storage(path)
    assert len(failures) == 1
