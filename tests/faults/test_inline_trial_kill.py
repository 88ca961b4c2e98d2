"""An inline trial's actor process SIGKILLed mid-run: Tune retries the trial in a new actor, which resumes from
the run's newest checkpoint in storage; every evaluation is stored once, with the uninterrupted run's numbers.

Inline trials (one worker: ``train()`` in the reused Tune trial actor) have no Ray Train worker group to
restart, so this is their whole failure path. The victim is found among *this test's* descendants by its
process title ``ray::ImplicitFunc`` (Tune's function-trainable actor).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from faults_helpers import assert_rows_equal_reference, ray_processes

pytestmark = [pytest.mark.ray, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_inline_trial_actor_sigkill_resumes_from_checkpoint(mamba_spec, tmp_path):
    import ray

    from study import checkpoint as ckpt
    from study.checkpoint import INLINE_DIR
    from study.devices import local_context
    from study.reporters import MemoryReporter
    from study.run_env import RunEnv
    from study.runner import connect_ray
    from study.sweep import plan_placement, run_trials
    from study.train import train

    spec = mamba_spec.replace(budget=24, checkpoint_every=3, eval_every=3, eval_windows=2)
    ref = MemoryReporter()  # the uninterrupted run
    train(spec, local_context("cpu"), ref)

    pl = plan_placement(2, 0, 1, False, max_concurrent=1)
    store, runs = tmp_path / "store", tmp_path / "runs"
    env = RunEnv(storage=str(runs), store_dir=str(store))
    ckpt_root = runs / spec.run_id / INLINE_DIR / "checkpoints"
    connect_ray(None, 2, REPO)
    box: dict = {}
    try:
        sweeper = threading.Thread(target=lambda: box.update(counts=run_trials(
            [spec], env=env, setup=pl.trial_setup(), storage=str(tmp_path / "tune"), study="kill", concurrency=1)))
        sweeper.start()
        t0 = time.time()
        while time.time() - t0 < 300 and sweeper.is_alive() and ckpt.latest_checkpoint(ckpt_root) is None:
            time.sleep(0.05)
        assert sweeper.is_alive(), "the run finished before a fault could be injected"
        ckpt_steps_at_kill = [ckpt.checkpoint_step(c) for c in ckpt.list_checkpoints(ckpt_root)]
        victims = ray_processes("ray::ImplicitFunc")
        assert len(victims) == 1, victims
        kill_ns = time.time_ns()
        os.kill(victims[0].pid, signal.SIGKILL)
        sweeper.join(timeout=400)
        assert not sweeper.is_alive()
    finally:
        ray.shutdown()
    assert box["counts"] == {"done": 1, "failed": 0, "early_stopped": 0, "errors": [], "bad_data_stop": False,
                             "not_run": 0}

    raw = pd.concat([pd.read_parquet(p) for p in sorted((store / "train").glob("part-*.parquet"))],
                    ignore_index=True)
    after = raw[raw["_seq"] > kill_ns]
    assert len(after), "no row after the kill"
    # the retry resumed from the newest checkpoint whose row was stored at the kill (or a newer one): nothing
    # before it redone. A kill between a checkpoint and its row's append resumes earlier and re-emits the row.
    stored_at_kill = set(raw.loc[raw["_seq"] < kill_ns, "step"])
    step_at_kill = max((s for s in ckpt_steps_at_kill if s in stored_at_kill), default=0)
    assert after["step"].min() > step_at_kill
    rows = assert_rows_equal_reference(store, ref.reports, list(range(3, 25, 3)))
    print(f"\nFAULT inline-actor-sigkill: checkpoint step at kill {step_at_kill}, first step after the retry "
          f"{after['step'].min()}, rows re-emitted {len(raw) - len(rows)}, total {time.time() - t0:.1f} s")
