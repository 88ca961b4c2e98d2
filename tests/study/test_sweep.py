"""Trial placement, staging and ASHA early stops (study.sweep)."""
from __future__ import annotations

import math
import time

import pytest

from analysis.store import append_rows, read_table
from study.runner import finished_runs
from study.spec import RunSpec
from study.sweep import TRIAL_DRIVER_CPU, plan_placement, record_early_stop


def _total_cpu(p) -> float:
    return p.concurrency * p.num_workers * p.cpus_per_worker + p.max_concurrent_trials * TRIAL_DRIVER_CPU


@pytest.mark.parametrize("cpus,gpus,nw,gpu,stage", [
    (2, 0, 1, False, 1), (2, 0, 1, False, 0), (2, 0, 2, False, 1), (16, 0, 2, False, 1), (3, 0, 1, False, 1),
    (16, 1, 1, True, 1), (64, 4, 1, True, 1), (4, 4, 1, True, 1), (8, 4, 2, True, 1), (208, 12, 1, True, 1),
])
def test_placement_fits_running_and_staged_trials(cpus, gpus, nw, gpu, stage):
    p = plan_placement(cpus, gpus, nw, gpu, stage_ahead=stage, launcher="ray-train")
    assert p.max_concurrent_trials == p.concurrency + stage
    assert p.cpus_per_worker > 0
    # every running worker and every trial driver (staged ones too) fits at once
    assert _total_cpu(p) <= cpus + 1e-9
    if gpu:
        assert p.concurrency == gpus // nw and p.cpus_per_worker <= 8
    else:
        assert p.concurrency == max(1, cpus // nw)


def test_placement_numbers_on_the_ci_machine_and_an_aurora_node():
    p = plan_placement(2, 0, 1, False, stage_ahead=1, launcher="ray-train")  # two 1-worker trials, one staged
    assert (p.concurrency, p.cpus_per_worker, p.max_concurrent_trials) == (2, 0.98, 3)
    p = plan_placement(2, 0, 1, False, max_concurrent=1, stage_ahead=1, launcher="ray-train")
    assert (p.concurrency, p.cpus_per_worker, p.max_concurrent_trials) == (1, 1.98, 2)
    # Aurora: 12 tiles, 208 cores -> 12 one-tile trials at 8 CPUs each, plus one staged
    a = plan_placement(208, 12, 1, True, stage_ahead=1, launcher="ray-train")
    assert (a.concurrency, a.cpus_per_worker, a.max_concurrent_trials) == (12, 8.0, 13)
    # fewer CPUs than GPUs: fractional CPUs per worker rather than an unschedulable 1
    t = plan_placement(4, 4, 1, True, stage_ahead=1, launcher="ray-train")
    assert t.concurrency == 4 and math.isclose(t.cpus_per_worker, 0.98)


def test_placement_never_asks_one_worker_for_more_than_a_node_has():
    """3 nodes x 2 CPUs capped at 2 trials: each worker must still fit on one node beside the drivers."""
    p = plan_placement(6, 0, 1, False, max_concurrent=2, stage_ahead=1, launcher="ray-train", node_cpus=2)
    assert p.concurrency == 2 and p.cpus_per_worker == 1.97
    assert plan_placement(6, 0, 1, False, max_concurrent=2, stage_ahead=1, launcher="ray-train").cpus_per_worker == 2.98  # one node
    g = plan_placement(64, 8, 1, True, max_concurrent=2, stage_ahead=1, launcher="ray-train", node_cpus=4)
    assert g.cpus_per_worker == 3.0


def test_placement_rejects_impossible_plans():
    with pytest.raises(RuntimeError, match="needs 4 GPUs"):
        plan_placement(64, 2, 4, True)
    with pytest.raises(ValueError, match="num_workers"):
        plan_placement(2, 0, 0, False)
    assert plan_placement(16, 0, 1, False, max_concurrent=3).concurrency == 3


@pytest.mark.parametrize("cpus,gpus,gpu,cap", [(2, 0, False, None), (2, 0, False, 1), (16, 0, False, 3),
                                              (208, 12, True, None), (64, 4, True, 2), (4, 4, True, None)])
def test_inline_trials_are_their_own_worker(cpus, gpus, gpu, cap):
    """auto picks inline for one-worker runs: no driver sliver, no staging, the trial actor holds it all."""
    p = plan_placement(cpus, gpus, 1, gpu, max_concurrent=cap, stage_ahead=1)
    assert p.inline and p.launcher == "inline" and p.stage_ahead == 0
    assert p.max_concurrent_trials == p.concurrency
    res = p.trial_resources
    assert res["CPU"] == p.cpus_per_worker and res.get("GPU", 0) == (1.0 if gpu else 0)
    assert p.concurrency * res["CPU"] <= cpus + 1e-9
    if gpu:
        assert p.concurrency == min(gpus, cap or gpus) and p.cpus_per_worker <= 8


def test_inline_placement_numbers():
    assert plan_placement(2, 0, 1, False, max_concurrent=1).cpus_per_worker == 2.0  # the whole CI box
    assert plan_placement(2, 0, 1, False).cpus_per_worker == 1.0  # two trials at once
    a = plan_placement(208, 12, 1, True)  # Aurora: 12 one-tile trials, 8 CPUs each, actors reused
    assert (a.concurrency, a.cpus_per_worker, a.trial_resources) == (12, 8.0, {"CPU": 8.0, "GPU": 1.0})
    r = plan_placement(2, 0, 1, False, stage_ahead=1, launcher="ray-train")
    assert not r.inline and r.trial_resources == {"CPU": TRIAL_DRIVER_CPU}
    assert plan_placement(16, 0, 2, False).launcher == "ray-train"  # auto: several workers need Ray Train


def test_inline_launcher_refuses_multi_worker_runs():
    with pytest.raises(ValueError, match="one worker per trial"):
        plan_placement(16, 0, 2, False, launcher="inline")
    with pytest.raises(ValueError, match="launcher="):
        plan_placement(16, 0, 1, False, launcher="torchrun")


def _rows(run_id: str, steps, status="running"):
    return [{"run_id": run_id, "step": s, "val_loss": 1.0 / s, "is_final": False, "status": status}
            for s in steps]


def test_early_stop_is_recorded_on_the_last_row_and_counts_as_done(tmp_path):
    store = tmp_path / "store"
    append_rows(store, "train", _rows("a", [1, 3]) + _rows("b", [1, 3, 9]))
    append_rows(store, "train", [{"run_id": "c", "step": 9, "val_loss": 0.1, "is_final": True,
                                  "status": "finished"}])
    assert finished_runs(store) == {"c"}
    assert record_early_stop(str(store), "a") == 3
    df = read_table(store, "train")
    assert len(df) == 6  # replaced, not added
    a = df[df.run_id == "a"].set_index("step")
    assert a.loc[3, "status"] == "early_stopped" and a.loc[1, "status"] == "running"
    assert a.loc[3, "val_loss"] == pytest.approx(1 / 3)
    assert finished_runs(store) == {"a", "c"}
    assert record_early_stop(str(store), "nope") is None
    assert record_early_stop(str(tmp_path / "empty"), "a") is None


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_stops_a_poor_trial_and_the_next_trials_still_run(tiny_cohort, tmp_path):
    """Regression: a trial stopped by ASHA used to leak its workers' placement group (Ray Train's
    cleaner needs the dashboard's state API), and the next trial waited forever."""
    import ray

    from study.run_env import RunEnv
    from study.runner import connect_ray
    from study.sweep import TrialSetup, run_trials

    base = RunSpec(study="asha", family="swift_v2", size="debug", width=16, grid=(24, 24, 24), sequence_length=8,
                   batch_size=2, budget=12, eval_every=1, eval_windows=2, manifest=tiny_cohort, precision="fp32",
                   checkpoint_every=0, schedule="constant", warmup_frac=0.0)
    # ASHA runs an LR group coarse-to-fine: 1e-8 and 1e-2 (one of them staged: either may run first), 3e-3,
    # then 1e-7 (judged against three finished trials: too small to learn, stopped at its first rung), 5e-3
    specs = [base.replace(lr=lr) for lr in (1e-2, 5e-3, 3e-3, 1e-7, 1e-8)]
    connect_ray(None, 2, __import__("pathlib").Path(__file__).resolve().parents[2])
    try:
        env = RunEnv(storage=str(tmp_path / "runs"), store_dir=str(tmp_path / "store"))
        setup = TrialSetup(launcher="ray-train", num_workers=1, use_gpu=False, cpus_per_worker=1.98)
        t0 = time.time()
        counts = run_trials(specs, env=env, setup=setup, storage=str(tmp_path / "tune"), study="asha",
                            concurrency=1, asha=True, max_steps=12, stage_ahead=1)
        wall = time.time() - t0
    finally:
        ray.shutdown()
    assert counts["failed"] == 0 and counts["done"] == 5
    df = read_table(tmp_path / "store", "train")
    assert set(df.run_id) == {s.run_id for s in specs}  # every trial ran, including those after a stop
    bad = df[df.run_id == specs[3].run_id]
    assert (bad["status"] == "early_stopped").any() and bad["step"].max() < 12
    # a stopped trial's worker may still store a row or two before it is killed: the mark is on some row
    marked = df.groupby("run_id")["status"].apply(lambda s: (s == "early_stopped").any())
    assert counts["early_stopped"] == int(marked.sum()) >= 1
    done = finished_runs(tmp_path / "store")
    assert done == {s.run_id for s in specs}  # finished or judged: a rerun starts nothing
    assert df[df.run_id == specs[0].run_id]["is_final"].any()  # the best LR ran to the end
    assert wall < 400


def test_coarse_to_fine_order_covers_the_range_first():
    from study.sweep import coarse_to_fine

    assert coarse_to_fine(9) == [0, 8, 4, 2, 6, 1, 3, 5, 7]
    assert coarse_to_fine(1) == [0] and coarse_to_fine(2) == [0, 1]
    for n in (3, 5, 10, 27):
        assert sorted(coarse_to_fine(n)) == list(range(n))


def test_asha_order_is_coarse_to_fine_within_each_lr_group():
    from study.sweep import asha_order

    base = RunSpec(family="swift_v2", size="debug", budget=4)
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    specs = [base.replace(lr=lr) for lr in lrs] + [base.replace(width=32, lr=lr) for lr in lrs[:3]]
    got = [(s.width, s.lr) for s in asha_order(specs)]
    w = base.width
    assert got == [(w, 1e-4), (w, 1e-2), (w, 1e-3), (w, 3e-4), (w, 3e-3), (32, 1e-4), (32, 1e-3), (32, 3e-4)]


def test_asha_generations_are_fixed_by_the_whole_grid():
    """Grid ASHA judges a run against earlier generations' stored curves only; the generations come from the whole
    LR group (finished runs included), so a rerun after a kill keeps every run in its generation."""
    from study.sweep import asha_generations, asha_order

    base = RunSpec(study="g", family="swift_v2", size="debug", budget=10)
    group = [base.replace(lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)]
    gens = asha_generations(group, 2)
    assert [len(g) for g in gens] == [2, 2, 1]
    assert [s for g in gens for s in g] == asha_order(group)  # coarse-to-fine: the range first
    assert asha_generations(group, 2) == gens and asha_generations(list(reversed(group)), 2) == gens
    assert asha_generations(group, 0) == [[s] for s in asha_order(group)]


def test_asha_batches_compare_only_runs_that_differ_in_lr():
    from study.sweep import asha_batches

    base = RunSpec(family="swift_v2", size="debug", budget=4)
    lr_group = [base.replace(lr=lr) for lr in (1e-3, 1e-2, 1e-4)]
    other_budget = [base.replace(budget=8, lr=lr) for lr in (1e-3, 1e-2)]
    lone = [base.replace(width=32), base.replace(width=48)]
    batches = asha_batches(lr_group + lone + other_budget)
    assert batches[0] == (lone, False)  # nothing to compare with: no ASHA
    assert [(sorted(s.lr for s in b), a) for b, a in batches[1:]] == [([1e-4, 1e-3, 1e-2], True), ([1e-3, 1e-2], True)]
    assert [s.lr for s in batches[1][0]] == [1e-4, 1e-2, 1e-3]  # coarse-to-fine
    assert asha_batches(lr_group) == [([lr_group[2], lr_group[1], lr_group[0]], True)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_janitor_releases_groups_of_dead_actors_only(tmp_path):
    """A placement group created inside an actor outlives the actor while the job lives (Ray's rule); the
    janitor removes it, and leaves groups created by the driver or by live actors alone."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from study.runner import connect_ray
    from study.sweep import release_orphaned_placement_groups

    connect_ray(None, 2, __import__("pathlib").Path(__file__).resolve().parents[2])
    try:
        @ray.remote(num_cpus=0)
        class Maker:
            def make(self, cpu):
                pg = placement_group([{"CPU": cpu}])
                ray.get(pg.ready())
                return pg.id.hex()

        dead, alive = Maker.remote(), Maker.remote()
        orphan = ray.get(dead.make.remote(0.5))
        kept = ray.get(alive.make.remote(0.25))
        own = placement_group([{"CPU": 0.25}])
        ray.get(own.ready())
        ray.kill(dead)
        time.sleep(2.0)
        table = placement_group_table()
        assert table[orphan]["state"] == "CREATED"  # leaked: the job still lives
        deadline = time.time() + 30
        released = 0
        while released == 0 and time.time() < deadline:
            released = release_orphaned_placement_groups()
            time.sleep(0.5)
        table = placement_group_table()
        assert released == 1 and table[orphan]["state"] == "REMOVED"
        assert table[kept]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
        assert release_orphaned_placement_groups() == 0
    finally:
        ray.shutdown()


def test_janitor_overrides_a_real_tune_hook():
    """The janitor only runs if Tune calls its hook: it must override a method Tune's Callback defines."""
    from ray import tune

    from study.sweep import PlacementGroupJanitor

    hooks = [n for n in vars(PlacementGroupJanitor) if n.startswith("on_")]
    assert hooks and all(callable(getattr(tune.Callback, n, None)) for n in hooks)
