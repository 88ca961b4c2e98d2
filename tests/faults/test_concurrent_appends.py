"""16 trial processes appending result rows through ``StoreReporter`` while another process compacts.

Extends ``tests/analysis/test_store.py::test_sixteen_concurrent_writers_with_compaction`` (which races
re-emitted keys) to the shape of a study: distinct ``(run_id, step)`` keys, wide rows built the way
``StoreReporter`` builds them, and a *dedicated* compactor process merging parts the whole time.
Checks: no lost row, no duplicate, no torn row (every cell is a function of its key).
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pandas as pd

from analysis.store import ResultsStore
from study.reporters import StoreReporter

N_WRITERS, N_STEPS = 16, 6


def _cells(w: int, step: int) -> dict:
    """Every value of row (w, step) derives from its key: a row stitched from two writes shows."""
    return {"train_loss": 1.0 / (1 + w + 100 * step), "val_loss": w + step / 1000.0,
            "samples_seen": 1000 * w + step, "status": f"s{w}-{step}", "blob": f"{w}:{step}:" + "x" * (32 + w)}


def _trial(root: str, w: int, start) -> None:
    start.wait()
    static = {"run_id": f"run{w:02d}", "study": "faults", "family": "neuromamba", "size": "debug",
              "width": 16 + w, "lr": 1e-3 * (w + 1), "seed": w,
              **{f"spec.field{i}": f"{w}-{i}" for i in range(24)}}  # wide rows like a real spec
    rep = StoreReporter(ResultsStore(root), static)
    for step in range(1, N_STEPS + 1):
        rep.report({"step": step, **_cells(w, step), "is_final": step == N_STEPS})


def _compactor(root: str, start, stop, counter) -> None:
    start.wait()
    st = ResultsStore(root)
    while not stop.is_set():
        counter.value += st.compact("train")
        time.sleep(0.002)


def test_sixteen_trials_append_while_compacting(tmp_path):
    ctx = mp.get_context("fork")
    start, stop, merged = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    comp = ctx.Process(target=_compactor, args=(str(tmp_path), start, stop, merged))
    trials = [ctx.Process(target=_trial, args=(str(tmp_path), w, start)) for w in range(N_WRITERS)]
    for p in [comp, *trials]:
        p.start()
    start.set()
    for p in trials:
        p.join(timeout=120)
        assert p.exitcode == 0
    stop.set()
    comp.join(timeout=60)
    assert comp.exitcode == 0
    assert merged.value > 0, "the compactor never raced the writers"

    st = ResultsStore(tmp_path)
    df = st.read("train", internal=True)
    raw = pd.concat([pd.read_parquet(p) for p in st.parts("train")], ignore_index=True)
    assert len(df) == N_WRITERS * N_STEPS  # nothing lost
    assert not raw.duplicated(["run_id", "step"]).any()  # nothing duplicated on disk either
    assert not raw.duplicated(["_writer", "_seq"]).any()
    want = {(f"run{w:02d}", s) for w in range(N_WRITERS) for s in range(1, N_STEPS + 1)}
    assert set(zip(df["run_id"], df["step"])) == want
    for _, r in df.iterrows():  # nothing torn
        w = int(r["run_id"][3:])
        for k, v in _cells(w, int(r["step"])).items():
            assert r[k] == v, (r["run_id"], r["step"], k)
        assert r["width"] == 16 + w and r["spec.field23"] == f"{w}-23"
        assert bool(r["is_final"]) == (r["step"] == N_STEPS)
    # one writer's stamps increase with its steps (write order is preserved per trial)
    for _, g in df.groupby("run_id"):
        assert np.all(np.diff(g.sort_values("step")["_seq"].to_numpy()) > 0)
    st.compact("train")
    assert len(st.parts("train")) == 1 and len(st.read("train")) == N_WRITERS * N_STEPS
