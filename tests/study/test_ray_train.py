"""Ray Train V2 launcher: two CPU workers reproduce the single-process losses; checkpoints land in storage."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    yield
    ray.shutdown()


def test_ray_train_two_workers_match_plain_python(ray_local, mamba_spec, tmp_path):
    from analysis.store import read_table
    from study.devices import local_context
    from study.launch_ray import fit_run
    from study.reporters import MemoryReporter
    from study.train import train

    spec = mamba_spec.replace(checkpoint_every=3)
    ref = MemoryReporter()
    train(spec.replace(micro_batch_size=2), local_context("cpu"), ref)

    store = tmp_path / "store"
    result = fit_run(spec, storage=str(tmp_path / "runs"), num_workers=2, cpus_per_worker=0.9,
                     store_dir=str(store))
    assert result.error is None
    rows = read_table(store, "train").sort_values("step")
    assert list(rows["step"]) == [3, 6]
    want = {r["step"]: r for r in ref.reports}
    for _, row in rows.iterrows():
        assert row["train_loss"] == pytest.approx(want[row["step"]]["train_loss"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(want[row["step"]]["val_loss"], rel=1e-5)
    assert bool(rows["is_final"].iloc[-1]) and rows["device_count"].iloc[-1] == 2
    assert rows["run_id"].iloc[0] == spec.run_id and rows["code_commit"].iloc[0]
    # Ray merged both ranks' files into one checkpoint directory in storage
    ckpt = result.checkpoint
    assert ckpt is not None
    import os

    files = set(os.listdir(ckpt.path))
    assert {"COMPLETE", "trainer_state.json", "model.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
