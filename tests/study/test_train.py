"""The train function: equivalences, exact resume, schedules, bad input, divergence."""
from __future__ import annotations

import math

import pytest
import torch

from study import checkpoint as ckpt
from study.devices import local_context
from study.reporters import MemoryReporter
from study.spec import RunSpec
from study.loop import TrainingDiverged
from study.run_math import BatchPlan, lr_factor, micro_batch_positions
from study.train import train

def losses(rep: MemoryReporter) -> list[float]:
    return [r["train_loss"] for r in rep.logs]


def run(spec, **kw):
    rep = MemoryReporter()
    res = train(spec, local_context("cpu"), rep, **kw)
    return rep, res


def test_batch_plan_splits_global_batch_identically():
    """W ranks x A micro-batches cover exactly the positions one process sees with W*A micro-batches."""
    spec = RunSpec(batch_size=8, micro_batch_size=2)
    one = BatchPlan.make(spec.replace(micro_batch_size=2), 1)
    two = BatchPlan.make(spec, 2)
    assert (one.accumulation, two.accumulation) == (4, 2)
    for step in (0, 3):
        single = micro_batch_positions(step, one, 0)
        multi = micro_batch_positions(step, two, 0) + micro_batch_positions(step, two, 1)
        assert single == multi
        assert sorted(p for mb in single for p in mb) == list(range(step * 8, step * 8 + 8))


def test_gradient_accumulation_equals_full_batch(mamba_spec):
    full, _ = run(mamba_spec)
    acc, _ = run(mamba_spec.replace(micro_batch_size=1))
    a, b = losses(full), losses(acc)
    assert len(a) == 6
    assert a[-1] < a[0]  # it learns
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)


def test_interrupted_run_resumes_exactly(mamba_spec, tmp_path):
    spec = mamba_spec.replace(checkpoint_every=3)
    ref, _ = run(spec)
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    first, res = run(spec, run_dir=tmp_path, should_stop=stop_after_three)
    assert res.status == "stopped" and res.step == 3
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "step_0000003"
    second, res2 = run(spec, run_dir=tmp_path, resume_from=last)
    assert res2.status == "finished" and res2.step == 6
    resumed = losses(first) + losses(second)
    assert resumed == pytest.approx(losses(ref), rel=1e-7, abs=0)
    assert second.reports[-1]["val_loss"] == pytest.approx(ref.reports[-1]["val_loss"], rel=1e-7)


def test_checkpoint_of_another_run_is_refused(mamba_spec, tmp_path):
    run(mamba_spec.replace(budget=2, eval_every=2), run_dir=tmp_path)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(ckpt.CheckpointError, match="belongs to run"):
        run(mamba_spec.replace(lr=5e-4), resume_from=last)


def test_incomplete_checkpoint_is_never_trusted(mamba_spec, tmp_path):
    run(mamba_spec.replace(budget=3, eval_every=3), run_dir=tmp_path)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    (last / ckpt.COMPLETE).unlink()  # as if the writer died before the marker
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_trainer_state(last)


def test_retention_keeps_last_k_and_best(mamba_spec, tmp_path):
    spec = mamba_spec.replace(budget=6, eval_every=1, checkpoint_every=1, keep_last=2)
    rep, _ = run(spec, run_dir=tmp_path)
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    vals = [r["val_loss"] for r in rep.reports]
    best_step = 1 + vals.index(min(vals))
    assert kept[-2:] == ["step_0000005", "step_0000006"]
    assert f"step_{best_step:07d}" in kept and len(kept) <= 3


def test_nan_loss_stops_with_step_and_last_checkpoint(mamba_spec, tmp_path, monkeypatch):
    """Fault injection: the model's loss turns NaN at the 4th forward; the run names step and checkpoint."""
    from neuro_models import registry as R

    real_build = R.build_pretrain_model

    def poisoned(cfg):
        model = real_build(cfg)
        forward, count = model.forward, {"n": 0}

        def fwd(*a, **k):
            out = forward(*a, **k)
            if model.training:
                count["n"] += 1
                if count["n"] >= 4:
                    out = {**out, "loss": out["loss"] * float("nan")}
            return out

        model.forward = fwd
        return model

    monkeypatch.setattr(R, "build_pretrain_model", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        run(mamba_spec.replace(eval_every=2, checkpoint_every=2), run_dir=tmp_path)
    assert err.value.step == 4
    assert err.value.last_good.endswith("step_0000002")
    assert "step 4" in str(err.value) and "step_0000002" in str(err.value)


@pytest.mark.parametrize("change,needle", [
    (dict(batch_size=6, micro_batch_size=4), "micro_batch_size"),
    (dict(manifest=""), "manifest"),
])
def test_bad_input_fails_before_compute(mamba_spec, change, needle):
    with pytest.raises(ValueError, match=needle):
        run(mamba_spec.replace(**change))


def test_batch_that_does_not_divide_across_ranks():
    with pytest.raises(ValueError, match="does not divide across world_size=3"):
        BatchPlan.make(RunSpec(batch_size=8), 3)


def test_lr_schedules():
    spec = RunSpec(schedule="cosine", warmup_frac=0.1, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, spec) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[10:], f[11:]))
    wsd = RunSpec(schedule="wsd", warmup_frac=0.1, decay_frac=0.2, min_lr_ratio=0.0)
    g = [lr_factor(s, 100, wsd) for s in range(100)]
    assert g[10:80] == [1.0] * 70  # stable phase
    assert g[99] == pytest.approx(0.0) and g[89] == pytest.approx(0.5)


def test_torchrun_two_ranks_matches_one_process_with_accumulation(mamba_spec, tmp_path, torchrun_losses):
    ref, _ = run(mamba_spec.replace(micro_batch_size=2))
    got = torchrun_losses(mamba_spec, tmp_path / "tr")
    assert got == pytest.approx(losses(ref), rel=1e-5)


def test_deepspeed_zero0_clips_in_the_loop_like_plain_pytorch(tiny_cohort):
    """ZeRO-0 leaves clipping to the step loop (no host syncs in DeepSpeed's clip): same losses and the same
    reported gradient norm as a plain single-process run, where DeepSpeed used to report none (NaN)."""
    import torch.distributed as dist

    from study.loop import deepspeed_config
    from test_golden import golden_spec

    spec = golden_spec(tiny_cohort).replace(budget=8, grad_clip=0.05)
    plain, _ = run(spec)
    # the world-of-one group DeepSpeed makes stays (DeepSpeed caches it; study.launch_ray.run_inline relies on it)
    zero0, _ = run(spec.replace(distributed="deepspeed", zero_stage=0))
    assert dist.get_world_size() == 1
    assert losses(zero0) == pytest.approx(losses(plain), rel=1e-5)
    norms = [r["grad_norm"] for r in zero0.logs]
    assert all(math.isfinite(n) for n in norms) and max(norms) > 0.05  # clipping was active
    assert norms == pytest.approx([r["grad_norm"] for r in plain.logs], rel=1e-5)
    plan = BatchPlan.make(spec, 1)
    assert deepspeed_config(spec.replace(zero_stage=0), plan, "cuda")["gradient_clipping"] == 0.0
    assert deepspeed_config(spec.replace(zero_stage=1), plan, "cuda")["gradient_clipping"] == 0.05


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_matches_ddp(mamba_spec, tmp_path, stage, torchrun_losses):
    ddp = torchrun_losses(mamba_spec, tmp_path / "ddp")
    ds = torchrun_losses(mamba_spec.replace(distributed="deepspeed", zero_stage=stage), tmp_path / f"ds{stage}")
    assert ds == pytest.approx(ddp, rel=1e-5)


def test_sparse_logging_reports_window_means_and_same_weights(tiny_cohort):
    """``log_every=3``: no host read per step, the logged loss is the mean over the 3 steps, and training is
    bit-identical to logging every step (the final evaluation agrees exactly)."""
    spec = RunSpec(family="swift_v2", size="debug", width=16, grid=(24, 24, 24), sequence_length=8, batch_size=2,
                   budget=6, eval_every=6, eval_windows=2, manifest=tiny_cohort, precision="fp32", lr=3e-3)
    every, r1 = run(spec)
    sparse, r3 = run(spec.replace(log_every=3))
    per_step = losses(every)
    assert [r["step"] for r in sparse.logs] == [3, 6]
    assert losses(sparse) == pytest.approx([sum(per_step[:3]) / 3, sum(per_step[3:]) / 3], rel=1e-12)
    assert r3.final_metrics["val_loss"] == r1.final_metrics["val_loss"]
    assert sparse.reports[-1]["tokens_seen"] == every.reports[-1]["tokens_seen"] > 0


def test_loader_masks_equal_position_seeded_masks(tiny_cohort):
    """Masks made in loader workers are the ones ``sample_masks`` makes for the same global positions."""
    from neuro_models import registry as R
    from study.loop import PositionDataset, SampleOrder
    from study.run_math import model_config
    from study.train import PositionMasks, build_datasets, sample_masks

    spec = RunSpec(family="swift_v2", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=2,
                   manifest=tiny_cohort)

    cfg = model_config(spec)
    _, train_ds, _ = build_datasets(spec)
    ds = PositionDataset(train_ds, SampleOrder(len(train_ds), 3), masks=PositionMasks(R.mask_function(cfg), 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=[5, 11, 17], num_workers=2)
    got = torch.stack([item["mask"] for item in loader])
    want = sample_masks(cfg, [5, 11, 17], 3, torch.device("cpu"))
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert not torch.equal(got[0], got[1])  # positions differ, masks differ
    assert R.mask_function(R.get_config("neuromamba", "debug")) is None


def test_deepspeed_config_overrides_merge_but_the_batch_plan_and_stage_stay():
    from study.loop import merge_config

    base = {"train_batch_size": 8, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
    out = merge_config(base, {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    assert out == {"train_batch_size": 8, "zero_optimization": {"stage": 1, "overlap_comm": True},
                   "gradient_clipping": 0.5}
    assert base["zero_optimization"] == {"stage": 1}  # the input is not modified


def test_deepspeed_config_keeps_the_specs_batch_plan_and_stage():
    from study.loop import deepspeed_config

    spec = RunSpec(batch_size=8, micro_batch_size=2, zero_stage=2, distributed="deepspeed",
                   deepspeed_config='{"train_batch_size": 999, "gradient_accumulation_steps": 7, '
                                    '"zero_optimization": {"stage": 3, "overlap_comm": true}, "gradient_clipping": 0.5}')
    plan = BatchPlan.make(spec, 2)
    cfg = deepspeed_config(spec, plan, "cuda")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (8, 2, 2)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["gradient_clipping"] == 0.5 and cfg["torch_autocast"]["enabled"]
    assert not deepspeed_config(spec.replace(deepspeed_config=""), plan, "cpu")["torch_autocast"]["enabled"]


@pytest.mark.slow
def test_compiled_regions_train_like_eager(tiny_cohort):
    """RunSpec.compile=True (regional torch.compile, Inductor on CPU) gives the eager losses."""
    spec = RunSpec(size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=2, budget=3, eval_every=3,
                   eval_windows=2, manifest=tiny_cohort, precision="fp32", log_every=1)
    eager, _ = run(spec)
    torch._dynamo.reset()
    compiled, _ = run(spec.replace(compile=True))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)


def test_manual_gc_restores_the_collector_even_on_error():
    import gc

    from study.loop import manual_gc

    assert gc.isenabled() and gc.get_freeze_count() == 0
    with manual_gc(0):
        assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with manual_gc(5):
            assert not gc.isenabled() and gc.get_freeze_count() > 0
            raise RuntimeError("boom")
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("every", [0, 4])
def test_gc_every_collects_by_hand_at_the_same_steps_only(tiny_cohort, every):
    """``gc_every=N``: no automatic collection inside the step loop, one full collection at entry and one
    every N steps (the same steps on every rank); ``0`` leaves Python's collector alone. Same losses."""
    import gc

    from test_golden import golden_spec

    spec = golden_spec(tiny_cohort).replace(budget=10, eval_every=10)
    ref, _ = run(spec.replace(gc_every=0))
    seen: list[tuple[int, bool]] = []
    in_loop = {"on": False}

    def cb(phase, info):
        if phase == "start" and in_loop["on"]:
            seen.append((info["generation"], gc.isenabled()))

    rep = MemoryReporter()
    log = rep.log

    def log_step(row):  # log_every=1: called once per step, inside the loop
        in_loop["on"] = True
        log(row)

    rep.log = log_step
    gc.callbacks.append(cb)
    try:
        train(spec.replace(gc_every=every), local_context("cpu"), rep)
    finally:
        gc.callbacks.remove(cb)
    assert [r["train_loss"] for r in rep.logs] == losses(ref)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    if every:
        # after the first step's log: manual full collections at steps 4 and 8, nothing automatic
        assert seen == [(2, False), (2, False)]
    else:
        assert seen and all(enabled for _, enabled in seen)  # the automatic collector ran inside the loop


def test_a_window_is_checked_for_finite_values_unless_its_dataset_vouches_for_it(monkeypatch):
    """Each window's values are checked (a NaN stops the run naming it), except where the dataset has verified its
    windows once (an in-memory pool: ``"finite": True``): on GPU-resident windows the per-access check was two
    host-device syncs per window, 32 per step (BENCHMARKS.md, session 15)."""
    import data.transforms as T
    from study.loop import BadDataError, PositionDataset, SampleOrder

    class Pool:
        def __init__(self, vouch):
            self.vouch = vouch

        def __len__(self):
            return 2

        def __getitem__(self, i):
            x = torch.zeros(1, 4, 4, 4, 2)
            if i == 1:
                x[0, 0, 0, 0, 0] = float("nan")
            return {"x": x, "subject": f"s{i}", **({"finite": True} if self.vouch else {})}

    order = SampleOrder(2, 0)
    bad_pos = next(p for p in range(2) if order.index(p) == 1)
    with pytest.raises(BadDataError, match="s1.*non-finite values"):
        PositionDataset(Pool(vouch=False), order)[bad_pos]
    calls = []
    monkeypatch.setattr("study.loop.all_finite", lambda t: calls.append(1) or T.all_finite(t))
    assert PositionDataset(Pool(vouch=True), order)[bad_pos]["subject"] == "s1" and calls == []
