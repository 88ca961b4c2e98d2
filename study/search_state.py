"""Durable LR search and early stopping: a rerun of the same command continues where the study was.

Issue #29, item 1. Two pieces of state used to live only in the driver's memory (Ray Tune's ``OptunaSearch``
and ``ASHAScheduler``), so a study whose driver died and was rerun started its searches from scratch (other
LRs, the budget spent twice) and judged runs against empty rungs. Here both are pure functions of what is on
disk under ``--storage``:

* **The search** is an Optuna study per run group (runs that differ only in LR, :func:`study.sweep.lr_groups`)
  in Optuna's journal file storage (``<study>/search/lr-search.journal``, one append-only file with file locks:
  no database server, works on shared file systems), study name ``lr-<group key>``. Trials are asked in
  *generations* of ``batch`` trials (fixed when the search is created and stored with it); generation ``g``
  is asked only after every trial of generations ``< g`` is told, and the sampler of trial ``k`` is a TPE
  sampler seeded with ``(seed, k)``. So the LR of trial ``k`` depends only on the seed and the told results
  of earlier generations: never on timing, on concurrency or on where the driver was killed.
* **Mapping the results store to Optuna trials**: trial ``k``'s run is the group's spec with ``lr`` replaced
  (its ``run_id`` follows). :meth:`LRSearchState.sync` tells every asked trial whose run has a final row
  (``COMPLETE``, its last ``val_loss``) or was early-stopped (``COMPLETE``, the loss it reached, user attribute
  ``early_stopped``) in the store, so a driver killed between a run's last row and Optuna's ``tell`` loses
  nothing, and a trial told is never run again. An asked trial without a final row is rerun with the same LR
  (its run resumes from its checkpoint); so is one whose trial failed in Tune for a cause not its own (its
  actor killed more often than Tune retries): the search stops at that generation and the next command reruns
  it. Only a deterministic failure (``TrainingDiverged``) is told ``FAIL`` and counts against ``n_trials``.
* **Early stopping** (:func:`asha_should_stop`): asynchronous successive halving's rule (rungs at
  ``grace * rf**i`` steps, stop a run worse than the best ``1/rf`` of the references at a rung, as Ray's
  ``ASHAScheduler`` does with ``reduction_factor=3``, ``grace_period=1``), made a pure function of stored rows:
  a run's value at a rung is its ``val_loss`` at its first evaluated step at or past the rung, and the
  references are the runs of earlier generations (all finished before this generation started). A run of a
  resumed generation is judged on the same rows as in an uninterrupted study, so it gets the same decision.

This module imports neither Ray nor :mod:`study.sweep`; :mod:`study.sweep` drives it.
"""
from __future__ import annotations

import errno
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

JOURNAL = "lr-search.journal"
#: ASHA's parameters (those study.sweep always gave Ray's ASHAScheduler)
GRACE, REDUCTION_FACTOR = 1, 3


def journal_path(store_dir: str | os.PathLike) -> Path:
    """Where a study's searches live: ``<study>/search/lr-search.journal`` beside ``<study>/store``."""
    return Path(store_dir).parent / "search" / JOURNAL


def _drop_torn_tail(fd: int) -> None:
    """Cut a journal back to its last complete record (a process killed mid-append leaves a line without its
    newline; Optuna would glue the next record onto it and fail to read the journal from then on)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        chunk = os.pread(fd, min(65536, end), max(0, end - 65536))
        i = chunk.rfind(b"\n")
        if i >= 0:
            os.ftruncate(fd, end - len(chunk) + i + 1)
            return
        end -= len(chunk)
    os.ftruncate(fd, 0)


#: errors of a storage that may come back by itself (a shared file system remounted read-only while its server or
#: lease is lost, a disk or quota filled for a moment): the journal waits them out, up to STORAGE_RETRY_S
TRANSIENT_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
STORAGE_RETRY_S = float(os.environ.get("NEUROX_STORAGE_RETRY_S", "120"))


def on_storage(fn, what: str, retry_s: float | None = None):
    """``fn()``, retried while it fails with a transient storage error (:data:`TRANSIENT_ERRNOS`), with backoff
    (0.5 s doubling to 5 s) for up to ``retry_s`` (default :data:`STORAGE_RETRY_S`); one line on stderr when the
    first retry starts; the error itself once the time is up or for any other error.

    The chaos campaign's read-only faults (1-4 s) failed the driver this way: Optuna's journal lock is a symlink
    made next to the journal, and a driver that opened or told the search in that window exited with a
    traceback (``[Errno 30] Read-only file system: ... lr-search.journal.lock``); rerunning recovered, but a
    user should not have to."""
    limit = STORAGE_RETRY_S if retry_s is None else retry_s
    deadline, delay = None, 0.5
    while True:
        try:
            return fn()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + limit
                print(f"storage: {what}: {exc.strerror}; retrying for up to {limit:.0f} s", file=sys.stderr,
                      flush=True)
            if now >= deadline:
                raise
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 5.0)


def _all_or_nothing_backend(path: str):
    """Optuna's ``JournalFileBackend`` whose appends are all or nothing.

    Optuna appends a record with one buffered write; on a full disk (ENOSPC) part of it can land, and the next
    record is then glued onto the torn one: every later read of the journal raises ``ValueError`` ("Invalid log
    format"), so every rerun of the study fails (found by the chaos campaign's disk-full faults). Here an append
    that fails is cut back to the journal's size before it (under Optuna's own file lock, so no other writer is
    in between; freeing bytes works on a full disk) and the error is raised; a torn tail left by a killed process
    is cut when the journal is opened. Relies on Optuna 4's private ``get_lock_file`` and ``_lock``
    (``tests/study/test_search_state.py`` checks the behaviour on the installed version)."""
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    class AllOrNothingJournalFileBackend(JournalFileBackend):
        def __init__(self, file_path: str) -> None:
            on_storage(lambda: self._open(file_path), f"opening the search journal {file_path}")

        def _open(self, file_path: str) -> None:
            super().__init__(file_path)
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_RDWR)
                try:
                    _drop_torn_tail(fd)
                finally:
                    os.close(fd)

        def append_logs(self, logs: list[dict]) -> None:
            on_storage(lambda: self._append(logs), f"writing the search journal {self._file_path}")

        def _append(self, logs: list[dict]) -> None:
            import json

            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND)
                try:
                    start = os.fstat(fd).st_size
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    except OSError:
                        os.ftruncate(fd, start)
                        raise
                finally:
                    os.close(fd)

    return AllOrNothingJournalFileBackend(path)


def journal_storage(path: str | os.PathLike):
    """Optuna's journal file storage at ``path`` (created with its folder), appending all or nothing
    (:func:`_all_or_nothing_backend`)."""
    from optuna.storages import JournalStorage

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(_all_or_nothing_backend(str(path)))


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` (a pure function: a fresh driver asks what the old one would have)."""
    return (int(seed) * 1_000_003 + int(number) * 7_919 + 17) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------- stored rows
def run_rows(store_dir: str | os.PathLike, run_ids: Iterable[str] | None = None):
    """The deduplicated ``train`` rows of ``run_ids`` (all runs if None); an empty frame when there are none."""
    import pandas as pd

    from analysis.store import read_table

    try:
        df = read_table(store_dir, "train")
    except (FileNotFoundError, ValueError):
        return pd.DataFrame(columns=["run_id", "step"])
    if df is None or df.empty or "run_id" not in df:
        return pd.DataFrame(columns=["run_id", "step"])
    if run_ids is not None:
        df = df[df["run_id"].isin(set(run_ids))]
    return df


def val_curves(df) -> dict[str, dict[int, float]]:
    """``run_id -> {step: val_loss}`` over rows with a finite ``val_loss``."""
    out: dict[str, dict[int, float]] = {}
    if df is None or df.empty or "val_loss" not in df:
        return out
    for run_id, step, v in zip(df["run_id"], df["step"], df["val_loss"]):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out.setdefault(str(run_id), {})[int(step)] = float(v)
    return out


def run_outcome(df, run_id: str) -> tuple[str, float | None]:
    """What the store says of a run: ``("finished" | "early_stopped" | "stopped" | "unfinished", last val_loss)``."""
    if df is None or df.empty:
        return "unfinished", None
    rows = df[df["run_id"] == run_id].sort_values("step")
    if rows.empty:
        return "unfinished", None
    vals = rows["val_loss"].dropna() if "val_loss" in rows else rows.iloc[:0]
    last = float(vals.iloc[-1]) if len(vals) else None
    if "is_final" in rows and rows["is_final"].fillna(False).astype(bool).any():
        return "finished", last
    status = rows["status"].astype(str) if "status" in rows else None
    if status is not None and (status == "early_stopped").any():
        return "early_stopped", last
    if status is not None and status.iloc[-1] == "stopped":
        return "stopped", last
    return "unfinished", last


# ------------------------------------------------------------------------------------------------- early stopping
def rungs(max_step: int | None, grace: int = GRACE, rf: int = REDUCTION_FACTOR, limit: int = 2**31) -> list[int]:
    """Rung milestones ``grace, grace*rf, ...`` (below ``max_step`` when given: a run is never stopped at its end)."""
    out, m = [], grace
    while m < (max_step if max_step else limit):
        out.append(m)
        m *= rf
    return out


def rung_value(curve: Mapping[int, float], milestone: int) -> float | None:
    """A run's value at a rung: its ``val_loss`` at the first evaluated step at or past ``milestone``."""
    steps = [s for s in curve if s >= milestone]
    return curve[min(steps)] if steps else None


def asha_should_stop(curve: Mapping[int, float], references: Iterable[Mapping[int, float]], *,
                     max_step: int | None = None, rf: int = REDUCTION_FACTOR, grace: int = GRACE
                     ) -> int | None:
    """The rung at which a run with validation curve ``curve`` is stopped, or None (go on).

    At each rung the run has reached, it is stopped when worse (higher ``val_loss``) than the ``100/rf``-th
    percentile of the ``references``' values at that rung (Ray's ASHA cutoff for ``mode="min"``). A pure
    function of stored rows: the same rows give the same decision in any process, before or after a kill.
    """
    refs = list(references)
    for m in rungs(max_step, grace, rf):
        v = rung_value(curve, m)
        if v is None:
            break
        at = [x for x in (rung_value(r, m) for r in refs) if x is not None]
        if at and v > float(np.percentile(at, 100.0 / rf)):
            return m
    return None


# ----------------------------------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class SearchTrial:
    number: int
    """Optuna's trial number (what ``tell`` takes)."""
    index: int
    """The trial's place in the search: its rank among the trials that have an LR. A driver killed inside
    Optuna's ``ask`` leaves a trial without parameters (a torn ask): it takes an Optuna number but no index, so
    generations and sampler seeds follow the indices and stay those of an uninterrupted search."""
    lr: float
    generation: int
    state: str  # optuna TrialState name: RUNNING, COMPLETE, FAIL, ...
    value: float | None
    early_stopped: bool = False


class LRSearchState:
    """One run group's LR search in Optuna's journal storage (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, key: str, *, seed: int, low: float, high: float, n_trials: int,
                 batch: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.path, self.key, self.name = Path(path), key, f"lr-{key}"
        self.storage = journal_storage(path)
        self.distribution = optuna.distributions.FloatDistribution(low, high, log=True)
        study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                    load_if_exists=True)
        attrs = study.user_attrs
        if "batch" not in attrs:  # first creation: the search's design is stored with it and never changes
            for k, v in (("seed", int(seed)), ("low", float(low)), ("high", float(high)),
                         ("n_trials", int(n_trials)), ("batch", int(max(1, batch)))):
                study.set_user_attr(k, v)
            attrs = study.user_attrs
        elif (attrs["low"], attrs["high"]) != (float(low), float(high)):
            raise ValueError(f"LR search {self.name} in {path} was started over [{attrs['low']:g}, "
                             f"{attrs['high']:g}], not [{low:g}, {high:g}]; use a new --study-name")
        self.seed, self.batch = int(attrs["seed"]), int(attrs["batch"])
        self.n_trials = max(int(n_trials), 0)

    def _study(self, sampler=None):
        import optuna

        return optuna.load_study(study_name=self.name, storage=self.storage, sampler=sampler)

    def trials(self) -> list[SearchTrial]:
        out = []
        for t in sorted(self._study().get_trials(deepcopy=False), key=lambda t: t.number):
            if "lr" not in t.params:  # a torn ask (see SearchTrial.index)
                continue
            k = len(out)
            out.append(SearchTrial(number=t.number, index=k, lr=float(t.params["lr"]), generation=k // self.batch,
                                   state=t.state.name, value=t.value if t.values else None,
                                   early_stopped=bool(t.user_attrs.get("early_stopped"))))
        return out

    def _close_torn_asks(self) -> None:
        """Tell ``FAIL`` to trials a killed driver left without an LR (nothing ran them; TPE ignores them)."""
        from optuna.trial import TrialState

        study = self._study()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "lr" not in t.params:
                study.tell(t.number, state=TrialState.FAIL)

    def done(self) -> bool:
        tr = self.trials()
        return len(tr) >= self.n_trials and all(t.state != "RUNNING" for t in tr[:self.n_trials])

    def ask_generation(self) -> list[SearchTrial]:
        """The trials of the current generation that are still to run: those asked before (a resumed study)
        plus, when the generation is not complete yet, new asks. Empty when the search is done."""
        import optuna

        self._close_torn_asks()
        tr = self.trials()
        running = [t for t in tr if t.state == "RUNNING"]
        gen = running[0].generation if running else (len(tr) // self.batch if len(tr) < self.n_trials else None)
        if gen is None:
            return []
        end = min((gen + 1) * self.batch, self.n_trials)
        n = len(tr)
        while n < end:  # trial n's sampler sees only the told trials of earlier generations
            sampler = optuna.samplers.TPESampler(seed=trial_seed(self.seed, n))
            self._study(sampler).ask(fixed_distributions={"lr": self.distribution})
            n += 1
        return [t for t in self.trials() if t.generation == gen and t.state == "RUNNING"]

    def tell(self, number: int, outcome: str, value: float | None) -> None:
        from optuna.trial import TrialState

        study = self._study()
        if outcome in ("finished", "early_stopped") and value is not None and math.isfinite(value):
            if outcome == "early_stopped":
                study._storage.set_trial_user_attr(study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, number), "early_stopped", True)
            study.tell(number, value, state=TrialState.COMPLETE)
        else:
            study.tell(number, state=TrialState.FAIL)

    def sync(self, store_dir: str | os.PathLike, run_id_of, *, fail: Iterable[str] = ()) -> list[int]:
        """Tell every asked trial whose run is finished or early-stopped in the store (``run_id_of(lr)``: the run
        of an LR), and ``FAIL`` those whose run is in ``fail`` (a deterministic failure: a diverged LR is a
        result of the search). Any other unfinished trial stays asked: a trial that failed for another cause
        (its actor killed more often than Tune retries, a node lost) is rerun with the same LR by the next
        command, as an uninterrupted study would have run it. Returns the numbers told."""
        fail = set(fail)
        running = [t for t in self.trials() if t.state == "RUNNING"]
        if not running:
            return []
        everyone = self.trials()
        df = run_rows(store_dir, [run_id_of(t.lr) for t in everyone])
        curves = val_curves(df)
        told = []
        for t in running:
            outcome, value = run_outcome(df, run_id_of(t.lr))
            if outcome == "early_stopped":  # the value at the rung it was stopped at, not its last row: a
                # stopped trial may store a row or two more before it is killed, more or fewer after a resume
                curve = curves.get(run_id_of(t.lr), {})
                refs = [curves.get(run_id_of(r.lr), {}) for r in everyone if r.generation < t.generation]
                total = df.loc[df["run_id"] == run_id_of(t.lr), "total_steps"].max() if "total_steps" in df else None
                rung = asha_should_stop(curve, refs, max_step=None if total is None or total != total else int(total))
                value = rung_value(curve, rung) if rung is not None else value
            if outcome in ("finished", "early_stopped") and value is not None:
                self.tell(t.number, outcome, value)
                told.append(t.number)
            elif run_id_of(t.lr) in fail and outcome != "stopped":
                self.tell(t.number, "failed", None)
                told.append(t.number)
        return told

    def references(self, generation: int) -> list[SearchTrial]:
        """The trials ASHA judges generation ``generation``'s runs against: all of earlier generations."""
        return [t for t in self.trials() if t.generation < generation]

    def suggestions(self) -> list[float]:
        return [t.lr for t in self.trials()]


def group_key(spec) -> str:
    """A run group's key (``study.sweep.lr_groups``: the spec hash at lr=1)."""
    return spec.replace(lr=1.0).spec_hash


def search_done(store_dir: str | os.PathLike, spec, n_trials: int) -> bool:
    """Whether the LR search of ``spec``'s run group has all its ``n_trials`` trials told (done or failed)."""
    path = journal_path(store_dir)
    if not path.exists():
        return False
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=f"lr-{group_key(spec)}", storage=journal_storage(path))
    except KeyError:
        return False
    trials = sorted((t for t in study.get_trials(deepcopy=False) if "lr" in t.params), key=lambda t: t.number)
    return len(trials) >= n_trials and all(t.state.name != "RUNNING" for t in trials[:n_trials])


def unfinished_searches(store_dir: str | os.PathLike, specs, lr_search) -> list:
    """The specs whose run group's LR search is not done (one per group is enough to run it)."""
    return [s for s in specs if not search_done(store_dir, s, lr_search.n_trials)]
