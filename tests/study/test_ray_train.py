"""Ray Train V2 launcher: two CPU workers reproduce the single-process losses; checkpoints land in storage."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    yield
    ray.shutdown()


def test_ray_train_two_workers_reproduce_golden_losses(ray_local, tiny_cohort, tmp_path):
    """Two Ray Train CPU workers (DDP over gloo) give the checked-in golden losses of one process."""
    import json

    from analysis.store import read_table
    from study.launch_ray import fit_run
    from study.run_env import RunEnv
    from test_golden import GOLDEN, REL, golden_spec

    golden = json.loads(GOLDEN.read_text())["losses"]
    # evaluations every 5 steps do not change training (fixed eval masks, no RNG drawn)
    spec = golden_spec(tiny_cohort).replace(micro_batch_size=None, eval_every=5, checkpoint_every=10)
    store = tmp_path / "store"
    result = fit_run(spec, RunEnv(storage=str(tmp_path / "runs"), store_dir=str(store)), num_workers=2,
                     cpus_per_worker=0.9)
    assert result.error is None
    rows = read_table(store, "train").sort_values("step")
    assert list(rows["step"]) == [5, 10, 15, 20]
    for _, row in rows.iterrows():
        assert row["train_loss"] == pytest.approx(golden[int(row["step"]) - 1], rel=REL)
    assert bool(rows["is_final"].iloc[-1]) and rows["device_count"].iloc[-1] == 2
    assert rows["run_id"].iloc[0] == spec.run_id and rows["code_commit"].iloc[0]
    # Ray merged both ranks' files into one checkpoint directory in storage
    ckpt = result.checkpoint
    assert ckpt is not None
    import os
    from pathlib import Path

    files = set(os.listdir(ckpt.path))
    assert {"COMPLETE", "trainer_state.json", "model.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
    assert json.loads((Path(ckpt.path) / "trainer_state.json").read_text())["step"] == 20
