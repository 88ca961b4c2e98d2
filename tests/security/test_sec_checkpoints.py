"""Shared project storage: a planted checkpoint file must not run code when a run resumes (issue #30 item 2).

Runs resume automatically from ``<storage>/runs/<run_id>/...``; another user with write access to the project
folder can replace a file there. Each planted file below carries a pickle whose loading would create a marker
file (what ``torch.load(weights_only=False)`` did before the fix for ``optim.pt``, ``sched.pt`` and
``rng_rank*.pt``). Loading must refuse, naming the file, and the marker must not appear.
"""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from study import checkpoint as ckpt
from study.devices import local_context
from study.reporters import MemoryReporter
from study.run_env import RunEnv
from study.train import train


class Planted:
    """What an attacker pickles: unpickling it calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _run(spec, **kw):
    rep = MemoryReporter()
    res = train(spec, local_context("cpu"), rep, **kw)
    return [r["train_loss"] for r in rep.logs], res


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_cohort):
    """A 6-step run stopped after step 3 (checkpoint step_0000003) and the uninterrupted reference losses."""
    from study.spec import RunSpec

    spec = RunSpec(family="neuromamba", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4, budget=6,
                   eval_every=3, eval_windows=4, manifest=tiny_cohort, precision="fp32", log_every=1,
                   checkpoint_every=3)
    ref, _ = _run(spec)
    run_dir = tmp_path_factory.mktemp("stopped")
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    first, res = _run(spec, run_dir=run_dir, should_stop=stop_after_three)
    assert res.step == 3
    return spec, ckpt.latest_checkpoint(run_dir / "checkpoints"), first, ref


@pytest.mark.parametrize("victim", ["optim.pt", "sched.pt", "rng_rank0.pt", "model.pt"])
def test_planted_object_in_a_checkpoint_file_does_not_run(stopped_run, tmp_path, victim):
    spec, last, _, _ = stopped_run
    copy = tmp_path / last.name
    shutil.copytree(last, copy)
    marker = tmp_path / "PWNED"
    torch.save({"state": Planted(marker), "param_groups": []}, copy / victim)
    assert not ckpt.is_complete(copy)  # the marker's file list no longer matches ...
    ckpt.mark_complete(copy)  # ... but whoever planted the file can rewrite the list too: loading must still refuse
    with pytest.raises(ckpt.CheckpointError) as e:
        _run(spec, run_dir=tmp_path / "resumed", resume_from=copy)
    assert str(copy / victim) in str(e.value) and "pathlib" in str(e.value)  # names the file and what it wanted
    assert not marker.exists()


def test_checkpoint_rng_files_hold_only_tensors_and_plain_types(stopped_run):
    _, last, _, _ = stopped_run
    for f in sorted(last.glob("*.pt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
    state = torch.load(last / "rng_rank0.pt", weights_only=True)
    assert state["format"] == ckpt.RNG_FORMAT and state["python"]["state"].dtype == torch.int64


def test_resume_is_exact_and_old_format_rng_files_still_load(stopped_run, tmp_path):
    spec, last, first, ref = stopped_run
    second, res = _run(spec, run_dir=tmp_path / "a", resume_from=last)
    assert res.step == 6 and first + second == pytest.approx(ref, rel=1e-7, abs=0)
    # a checkpoint written before the fix: python/numpy states as tuples with a numpy array
    old = tmp_path / last.name
    shutil.copytree(last, old)
    new_state = ckpt.safe_load(old / "rng_rank0.pt")
    ckpt.set_rng_state(new_state)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               old / "rng_rank0.pt")
    (old / ckpt.COMPLETE).write_text("ok\n")  # and its marker of then, without a file list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(old / "rng_rank0.pt")  # needs numpy globals
    second_old, res = _run(spec, run_dir=tmp_path / "b", resume_from=old)
    assert res.step == 6 and second_old == second


def test_rng_state_round_trip_is_exact(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    f = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), f)
    expect = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    ckpt.set_rng_state(ckpt.safe_load(f))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expect


def test_planted_object_in_a_deepspeed_checkpoint_does_not_run(tmp_path):
    pytest.importorskip("deepspeed")
    ds = tmp_path / "step_0000003" / "ds" / "ds"
    ds.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Planted(marker)}, ds / "mp_rank_00_model_states.pt")
    (tmp_path / "step_0000003" / "ds" / "latest").write_text("ds")
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt"):
        ckpt.consolidated_state_dict(tmp_path / "step_0000003")
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_zero2_resumes_exactly_with_weights_only_loading(tiny_cohort, tmp_path):
    """DeepSpeed passes weights_only=False to torch.load; our resume forces weights_only=True around it with
    only DeepSpeed's three plain-data classes allowed. The resumed run must continue exactly."""
    pytest.importorskip("deepspeed")
    from study.launch_ray import run_inline
    from study.spec import RunSpec

    spec = RunSpec(family="swift_v2", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4, budget=6,
                   eval_every=3, eval_windows=4, manifest=tiny_cohort, precision="fp32", checkpoint_every=3,
                   keep_last=5, distributed="deepspeed", zero_stage=2)
    full = MemoryReporter()
    assert run_inline(spec, RunEnv(storage=str(tmp_path)), extra_reporter=full).status == "finished"
    ckpts = tmp_path / spec.run_id / "inline" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(ckpts)] == ["step_0000003", "step_0000006"]
    assert any("optim_states" in p.name for p in (ckpts / "step_0000003" / "ds").rglob("*.pt"))
    shutil.rmtree(ckpts / "step_0000006")
    resumed = MemoryReporter()
    assert run_inline(spec, RunEnv(storage=str(tmp_path)), extra_reporter=resumed).status == "finished"
    assert [r["step"] for r in resumed.logs] == [4, 5, 6]
    assert [r["train_loss"] for r in resumed.logs] == [r["train_loss"] for r in full.logs][3:]
