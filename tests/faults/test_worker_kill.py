"""A Ray Train worker process SIGKILLed mid-trial: the run restarts from its last checkpoint
(``FailureConfig``) and ends with the same losses as an uninterrupted run.

The victim is found with psutil among *this test's* descendants (the raylet of the Ray runtime the
test started), by its process title ``ray::RayTrainWorker...``: other users' Ray processes on the same
machine are never touched.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pandas as pd
import psutil
import pytest
from faults_helpers import assert_rows_equal_reference, ray_processes

pytestmark = [pytest.mark.ray, pytest.mark.faults]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    for attempt in range(3):  # on a loaded machine the raylet may miss Ray's fixed 30 s start window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes started by this process's Ray runtime."""
    return ray_processes("RayTrainWorker")


def registered_step(run_storage) -> int | None:
    """Step of the newest checkpoint Ray's controller has *registered* (its snapshot in storage names
    it): the one a restart resumes from. A checkpoint directory already uploaded by the workers but
    not yet registered does not count (a kill then restarts from the previous one)."""
    snap = run_storage / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snap.read_text())
        if isinstance(data, str):
            data = json.loads(data)
        name = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return json.loads((run_storage / name / "trainer_state.json").read_text())["step"] if name else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def raw_rows(store_dir) -> pd.DataFrame:
    parts = sorted((store_dir / "train").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_worker_sigkill_resumes_from_last_checkpoint(ray_local, mamba_spec, tmp_path):
    from study.devices import local_context
    from study.launch_ray import fit_run
    from study.reporters import MemoryReporter
    from study.run_env import RunEnv
    from study.train import train

    spec = mamba_spec.replace(budget=24, checkpoint_every=3, eval_every=3, eval_windows=2)
    ref = MemoryReporter()  # the uninterrupted run: one process, the 2-rank batch split as accumulation
    train(spec.replace(micro_batch_size=2), local_context("cpu"), ref)

    storage, store = tmp_path / "runs", tmp_path / "store"
    box: dict = {}
    fitter = threading.Thread(target=lambda: box.update(result=fit_run(
        spec, RunEnv(storage=str(storage), store_dir=str(store)), num_workers=2, cpus_per_worker=0.9,
        max_failures=2)))
    fitter.start()
    t0 = time.time()
    while time.time() - t0 < 300 and fitter.is_alive() and registered_step(storage / spec.run_id) is None:
        time.sleep(0.05)
    assert fitter.is_alive(), "the run finished before a fault could be injected"
    ckpt_at_kill = registered_step(storage / spec.run_id)
    victims = train_workers()
    assert len(victims) == 2, victims
    victim = victims[-1]
    kill_ns = time.time_ns()
    os.kill(victim.pid, signal.SIGKILL)
    # time to recover: until the restarted workers write a new evaluation row (steps redone included)
    recovered_s = None
    while fitter.is_alive() or recovered_s is None:
        parts = [p for p in (store / "train").glob("part-*.parquet")]
        fresh = [p for p in parts if int(p.name.split("-")[1]) > kill_ns]
        if fresh and recovered_s is None:
            recovered_s = time.time() - kill_ns / 1e9
        if not fitter.is_alive():
            break
        time.sleep(0.05)
    fitter.join()
    result = box["result"]
    assert result.error is None
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE

    raw = raw_rows(store)
    after_kill = raw[raw["_seq"] > kill_ns]
    assert len(after_kill), "no row after the kill"
    # the restart resumed from a checkpoint at least as new as the one persisted before the kill:
    # rows up to that step were never recomputed
    assert after_kill["step"].min() > ckpt_at_kill
    assert (raw[raw["step"] <= ckpt_at_kill].groupby("step").size() == 1).all()
    rows = assert_rows_equal_reference(store, ref.reports, list(range(3, 25, 3)))
    # a re-emitted row (evaluated before the kill, redone after it) carries the same numbers
    for step, g in raw.groupby("step"):
        assert g["train_loss"].max() == pytest.approx(g["train_loss"].min(), rel=1e-6), step
    print(f"\nFAULT worker-sigkill: checkpoint step at kill {ckpt_at_kill}, first step after restart "
          f"{after_kill['step'].min()}, rows re-emitted {len(raw) - len(rows)}, "
          f"time to recover {recovered_s:.1f} s, total {time.time() - t0:.1f} s")
