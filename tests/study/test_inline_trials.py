"""Inline trials (study.launch_ray.run_inline): train() in the Tune trial actor, actors reused across trials.

Held to the same golden losses as the other launchers; stops, resumes (from its own or Ray Train's
checkpoints), leaves no process group behind, and survives ASHA stopping a trial in a reused actor.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from analysis.store import read_table
from study import checkpoint as ckpt
from study.reporters import MemoryReporter
from study.run_env import RunEnv
from test_golden import GOLDEN, REL, golden_spec

REPO = Path(__file__).resolve().parents[2]


def _fake_checkpoint(path: Path, step: int, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    if complete:
        (path / ckpt.COMPLETE).write_text("ok\n")
    return path


def test_resume_point_takes_the_newest_step_of_either_launcher(tmp_path):
    from study.checkpoint import INLINE_DIR, resume_point

    run = tmp_path / "run"
    assert resume_point(run) is None and resume_point(None) is None
    inline = run / INLINE_DIR / "checkpoints"
    _fake_checkpoint(inline / "step_0000010", 10)
    assert resume_point(run) == inline / "step_0000010"
    # Ray Train's persisted copies are named by time, not step: the step in trainer_state.json decides
    newer = _fake_checkpoint(run / "checkpoint_2026-11-26_10-00-00.000000", 15)
    _fake_checkpoint(run / "checkpoint_2026-11-26_11-00-00.000000", 20, complete=False)  # never trusted
    _fake_checkpoint(run / "checkpoint_2026-11-26_09-00-00.000000", 5)
    assert resume_point(run) == newer
    _fake_checkpoint(inline / "step_0000030", 30)
    assert resume_point(run) == inline / "step_0000030"


def test_a_copy_of_a_checkpoint_cut_short_is_not_complete(tmp_path):
    """Ray Train persists a checkpoint with a multi-threaded copy in no particular order: the marker can land
    before a file is whole. The marker lists every file with its size, so such a copy is never resumed from."""
    import shutil

    import torch

    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    src = ckpt.save_checkpoint(tmp_path / "step_0000004", rank=0, barrier=lambda: None, state={"step": 4},
                               model=net, optimizer=opt, scheduler=sched)
    assert ckpt.is_complete(src)
    listed = json.loads((src / ckpt.COMPLETE).read_text())["files"]
    assert set(listed) == {"model.pt", "optim.pt", "sched.pt", "rng_rank0.pt", ckpt.STATE_FILE}
    cut = tmp_path / "checkpoint_cut"
    shutil.copytree(src, cut)
    with open(cut / "optim.pt", "r+b") as fh:  # the copy stopped part-way through one file
        fh.truncate(listed["optim.pt"] // 2)
    assert not ckpt.is_complete(cut)
    (cut / "optim.pt").unlink()
    assert not ckpt.is_complete(cut)
    assert ckpt.resume_point(tmp_path) is None  # only the cut copy is a checkpoint_* of this "run"
    legacy = _fake_checkpoint(tmp_path / "legacy", 3)  # a marker written before the file list: trusted as before
    assert ckpt.is_complete(legacy)


def test_ray_train_resumes_from_the_newest_of_rays_and_the_persisted_checkpoints(tmp_path):
    """Ray's checkpoint is the newest its controller registered; the worker may have persisted newer ones (with
    their rows stored) before the driver died. The newer step wins; Ray's on a tie."""
    from study.launch_ray import newer_checkpoint

    ray5 = str(_fake_checkpoint(tmp_path / "ray", 5))
    ours7 = _fake_checkpoint(tmp_path / "checkpoint_7", 7)
    ours5 = _fake_checkpoint(tmp_path / "checkpoint_5", 5)
    assert newer_checkpoint(ray5, ours7) == str(ours7)
    assert newer_checkpoint(ray5, ours5) == ray5
    assert newer_checkpoint(str(ours7), ours5) == str(ours7)
    assert newer_checkpoint(None, ours5) == str(ours5) and newer_checkpoint(ray5, None) == ray5
    assert newer_checkpoint(None, None) is None


def test_a_worker_copies_rays_checkpoint_only_when_it_may_be_newer(tmp_path, monkeypatch):
    """A Ray Train worker resuming after a driver kill usually finds our checkpoint as new as Ray's: Ray's is then
    read in place, not copied (gigabytes at the large sizes) to the worker's temp dir."""
    from ray.train import Checkpoint

    from study.launch_ray import resume_checkpoint

    copies = []
    real = Checkpoint.to_directory

    def counting(self, path=None):
        copies.append(path)
        return real(self, path)

    monkeypatch.setattr(Checkpoint, "to_directory", counting)
    ray5 = Checkpoint.from_directory(str(_fake_checkpoint(tmp_path / "checkpoint_5", 5)))
    ray7 = Checkpoint.from_directory(str(_fake_checkpoint(tmp_path / "checkpoint_7", 7)))
    ours7 = _fake_checkpoint(tmp_path / "inline7", 7)
    assert resume_checkpoint(ray5, ours7, str(tmp_path / "l1")) == str(ours7) and copies == []
    assert resume_checkpoint(ray7, ours7, str(tmp_path / "l2")) == str(ours7) and copies == []  # a tie: ours
    ours5 = _fake_checkpoint(tmp_path / "inline5", 5)
    got = resume_checkpoint(ray7, ours5, str(tmp_path / "l3"))
    assert got == str(tmp_path / "l3") and copies == [str(tmp_path / "l3")]  # Ray's is newer: copied, used
    assert resume_checkpoint(ray5, None, str(tmp_path / "l4")) == str(tmp_path / "l4")
    assert resume_checkpoint(None, ours5, str(tmp_path / "l5")) == str(ours5)
    assert resume_checkpoint(None, None, str(tmp_path / "l6")) is None


def test_config_search_exports_from_either_launchers_checkpoints(tmp_path):
    """Regression: config search's fine-tuning exports looked only for Ray Train's ``checkpoint_*`` copies, so
    a pre-training run trained inline (the default for one-worker runs) had "no complete checkpoint"."""
    from study.checkpoint import INLINE_DIR
    from study.config_search import latest_run_checkpoint

    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of r1"):
        latest_run_checkpoint(runs, "r1")
    inline = _fake_checkpoint(runs / "r1" / INLINE_DIR / "checkpoints" / "step_0000020", 20)
    assert latest_run_checkpoint(runs, "r1") == inline
    ray_copy = _fake_checkpoint(runs / "r2" / "checkpoint_2026-11-26_10-00-00.000000", 20)
    assert latest_run_checkpoint(runs, "r2") == ray_copy


def test_launchers_take_the_run_environment_only_as_a_run_env(tmp_path):
    """The loose keywords of before RunEnv (``storage=``, ``store_dir=``, the ``ctx=`` dict) are refused, not folded
    in; a run environment without storage is refused before anything starts."""
    from study.launch_ray import fit_run, run_inline
    from study.spec import RunSpec
    from study.sweep import TrialSetup, run_trials

    spec = RunSpec(size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4)
    with pytest.raises(TypeError, match="storage"):
        run_inline(spec, storage=str(tmp_path), store_dir=str(tmp_path))
    with pytest.raises(TypeError, match="storage"):
        fit_run(spec, storage=str(tmp_path), num_workers=2)
    with pytest.raises(TypeError, match="must be a study.run_env.RunEnv"):
        run_inline(spec, {"train_storage": str(tmp_path)})
    with pytest.raises(ValueError, match="has no storage"):
        fit_run(spec, RunEnv(store_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="ctx"):
        run_trials([spec], ctx={"train_storage": str(tmp_path)}, storage=str(tmp_path), study="s", concurrency=1)
    with pytest.raises(TypeError, match="needs env="):
        run_trials([spec], env={"storage": str(tmp_path)}, setup=TrialSetup(), storage=str(tmp_path), study="s",
                   concurrency=1)


def test_inline_run_stops_resumes_and_reproduces_the_golden_losses(tiny_cohort, tmp_path):
    """A stop checkpoints (here after step 7; the PBS walltime guard's STOP file before the first step); the
    rerun resumes from it; together the calls log the golden losses of one uninterrupted plain-python run.
    No process group is left behind other than a world of one."""
    import torch.distributed as dist

    from study.checkpoint import INLINE_DIR
    from study.launch_ray import run_inline

    golden = json.loads(GOLDEN.read_text())["losses"]
    spec = golden_spec(tiny_cohort).replace(eval_every=5, checkpoint_every=5)
    stop = tmp_path / "STOP"
    stop.write_text("")
    store = tmp_path / "store"
    r0 = run_inline(spec, RunEnv(storage=str(tmp_path / "runs"), store_dir=str(store), stop_file=str(stop)),
                    extra_reporter=MemoryReporter())
    assert r0.status == "stopped" and r0.step == 0
    stop.unlink()
    first = MemoryReporter()
    r1 = run_inline(spec, RunEnv(storage=str(tmp_path / "runs"), store_dir=str(store)), extra_reporter=first,
                    should_stop=lambda: len(first.logs) >= 7)
    assert r1.status == "stopped" and r1.step == 7
    assert not dist.is_initialized() or dist.get_world_size() == 1
    assert ckpt.latest_checkpoint(tmp_path / "runs" / spec.run_id / INLINE_DIR / "checkpoints").name == "step_0000007"
    second = MemoryReporter()
    r2 = run_inline(spec, RunEnv(storage=str(tmp_path / "runs"), store_dir=str(store)), extra_reporter=second)
    assert r2.status == "finished" and r2.step == 20
    assert not dist.is_initialized() or dist.get_world_size() == 1
    losses = {r["step"]: r["train_loss"] for r in first.logs + second.logs if "train_loss" in r}
    assert sorted(losses) == list(range(1, 21))
    for step, loss in losses.items():
        assert loss == pytest.approx(golden[step - 1], rel=REL)
    rows = read_table(store, "train").sort_values("step")
    final = rows[rows["is_final"].astype(bool)]
    assert len(final) == 1 and int(final["step"].iloc[0]) == 20 and int(final["device_count"].iloc[0]) == 1


def test_a_checkpoint_whose_row_was_never_stored_is_not_resumed_from(tiny_cohort, tmp_path):
    """A checkpoint is complete before its evaluation row is appended; a kill in between (seen in the SIGKILL
    fault test) must not make the retry resume past that row. The row of step 10 is removed from the store as
    if the process had died there: the rerun resumes from step 5, re-emits 10, and every row is back once."""
    import pandas as pd

    from study.checkpoint import resume_point
    from study.launch_ray import run_inline, stored_steps

    golden = json.loads(GOLDEN.read_text())["losses"]
    spec = golden_spec(tiny_cohort).replace(eval_every=5, checkpoint_every=5, keep_last=5)  # step 5 is kept
    store, runs = tmp_path / "store", tmp_path / "runs"
    rep = MemoryReporter()
    r1 = run_inline(spec, RunEnv(storage=str(runs), store_dir=str(store)), extra_reporter=rep,
                    should_stop=lambda: len(rep.logs) >= 12)
    assert r1.status == "stopped" and r1.step == 12
    for part in (store / "train").glob("part-*.parquet"):  # "the process died before this append"
        if set(pd.read_parquet(part)["step"]) & {10, 12}:
            part.unlink()
    assert stored_steps(store, spec) == {5}
    assert resume_point(runs / spec.run_id).name == "step_0000012"  # unfiltered: would skip rows 10 and 12
    assert resume_point(runs / spec.run_id, stored_steps(store, spec)).name == "step_0000005"
    r2 = run_inline(spec, RunEnv(storage=str(runs), store_dir=str(store)), extra_reporter=MemoryReporter())
    assert r2.status == "finished"
    rows = read_table(store, "train").sort_values("step")
    assert list(rows["step"]) == [5, 10, 15, 20]
    for _, row in rows.iterrows():
        assert row["train_loss"] == pytest.approx(golden[int(row["step"]) - 1], rel=REL)


def test_deepspeed_trials_follow_each_other_in_one_process(tiny_cohort, tmp_path):
    """Regression (H100, smoke-gpu preset): the second DeepSpeed trial in a reused actor failed with "Group ...
    is not registered" because the first trial destroyed the process group DeepSpeed had cached. Each run
    also trains exactly as it does alone."""
    from study.launch_ray import run_inline

    spec = golden_spec(tiny_cohort).replace(distributed="deepspeed", zero_stage=0, budget=6, eval_every=3)
    runs = []
    for seed in (0, 1, 0):
        rep = MemoryReporter()
        res = run_inline(spec.replace(seed=seed), RunEnv(storage=str(tmp_path / f"runs{len(runs)}")),
                         extra_reporter=rep)
        assert res.status == "finished" and res.step == 6
        runs.append([r["train_loss"] for r in rep.logs])
    assert runs[2] == runs[0] and runs[1] != runs[0]  # the third (seed 0 again) repeats the first exactly


@pytest.fixture
def trace_file(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("NEUROX_TRACE_FILE", str(path))
    return path


def _trial_args(tmp_path, cpus: float = 2.0) -> dict:
    """``run_trials``' run environment and inline trial setup on ``cpus`` CPUs, one trial at a time."""
    from study.sweep import plan_placement

    pl = plan_placement(cpus, 0, 1, False, max_concurrent=1)
    assert pl.launcher == "inline"
    return {"env": RunEnv(storage=str(tmp_path / "runs"), store_dir=str(tmp_path / "store")),
            "setup": pl.trial_setup()}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_inline_sweep_reuses_one_actor_and_reproduces_golden_losses(tiny_cohort, tmp_path, trace_file):
    from study.runner import connect_ray, finished_runs
    from study.sweep import run_trials
    from study.trace import read

    golden = json.loads(GOLDEN.read_text())["losses"]
    base = golden_spec(tiny_cohort).replace(eval_every=5, checkpoint_every=10)
    # two DeepSpeed runs after a DDP one, all in the same actor (a failed trial would be retried in a new
    # actor, so the single pid below also proves none failed)
    specs = [base, base.replace(seed=1, distributed="deepspeed", zero_stage=0),
             base.replace(seed=2, distributed="deepspeed", zero_stage=0)]
    connect_ray(None, 2, REPO)
    import ray

    try:
        counts = run_trials(specs, **_trial_args(tmp_path), storage=str(tmp_path / "tune"), study="inline",
                            concurrency=1)
    finally:
        ray.shutdown()
    assert counts == {"done": 3, "failed": 0, "early_stopped": 0, "errors": [], "bad_data_stop": False, "not_run": 0}
    rows = read_table(tmp_path / "store", "train")
    first = rows[rows.run_id == base.run_id].sort_values("step")
    assert list(first["step"]) == [5, 10, 15, 20]
    for _, row in first.iterrows():
        assert row["train_loss"] == pytest.approx(golden[int(row["step"]) - 1], rel=REL)
    assert finished_runs(tmp_path / "store") == {s.run_id for s in specs}
    # every trial trained in the same (reused) actor process: no per-trial process start
    starts = [m for m in read(trace_file) if m["what"] == "train_start"]
    assert len(starts) == 3 and len({m["pid"] for m in starts}) == 1


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_stops_an_inline_trial_and_the_reused_actor_runs_the_next(tiny_cohort, tmp_path, trace_file):
    """ASHA's stop ends the training thread inside ``tune.report`` (after the row is stored); the actor is
    reset or replaced and the remaining trials still run."""
    from study.runner import connect_ray, finished_runs
    from study.spec import RunSpec
    from study.sweep import run_trials

    base = RunSpec(study="asha", family="swift_v2", size="debug", width=16, grid=(24, 24, 24), sequence_length=8,
                   batch_size=2, budget=12, eval_every=1, eval_windows=2, manifest=tiny_cohort, precision="fp32",
                   checkpoint_every=0, schedule="constant", warmup_frac=0.0)
    specs = [base.replace(lr=lr) for lr in (1e-2, 5e-3, 3e-3, 1e-7, 1e-8)]
    connect_ray(None, 2, REPO)
    import ray

    try:
        t0 = time.time()
        counts = run_trials(specs, **_trial_args(tmp_path), storage=str(tmp_path / "tune"), study="asha",
                            concurrency=1, asha=True, max_steps=12)
        wall = time.time() - t0
    finally:
        ray.shutdown()
    assert counts["failed"] == 0 and counts["done"] == 5
    df = read_table(tmp_path / "store", "train")
    assert set(df.run_id) == {s.run_id for s in specs}
    stopped = df[df.run_id == specs[3].run_id]
    assert (stopped["status"] == "early_stopped").any() and stopped["step"].max() < 12
    assert counts["early_stopped"] >= 1
    assert finished_runs(tmp_path / "store") == {s.run_id for s in specs}
    assert df[df.run_id == specs[0].run_id]["is_final"].any()
    assert wall < 300
