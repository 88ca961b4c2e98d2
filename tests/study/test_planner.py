"""The run planner: device kinds as data, the memory model, the choice of a plan, measured vs extrapolated speed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from neuro_models import registry as R
from study import planner as P
from study.spec import RunSpec
from study.run_math import model_config


def _spec(size: str, **kw) -> RunSpec:
    d = dict(family="swift_v2", size=size, grid=(96, 96, 96), sequence_length=20, batch_size=32, budget_kind="steps",
             budget=100, precision="bf16", distributed="deepspeed", zero_stage=0)
    d.update(kw)
    return RunSpec(**d)


def test_device_kinds_are_data_found_by_key_or_driver_name():
    assert P.device_kind("a100-40gb").peak_bf16_tflops == 312  # not the H100's 989
    assert P.device_kind("NVIDIA H100 80GB HBM3").name == "h100-80gb"
    assert P.device_kind("Intel(R) Data Center GPU Max 1550").memory_gib == 64
    with pytest.raises(ValueError, match="unknown; allowed: .*a100-40gb"):
        P.device_kind("TPU v5")


# weights 4 + grads 4 + moments 8 + the step's temporaries 4 (partitioned by ZeRO-1 with the moments)
@pytest.mark.parametrize("zero,world,bytes_per_param", [(0, 1, 20.0), (1, 4, 4 + 4 + (8 + 4) / 4),
                                                        (2, 4, 4 + 1 + 3), (3, 4, 1 + 1 + 3)])
def test_model_state_bytes_follow_the_zero_stage(zero, world, bytes_per_param):
    spec = _spec("202M")
    n = R.param_counts(model_config(spec))["total"]
    mem = P.memory_gib(spec, world=world, micro_batch=1, zero_stage=zero, checkpointing=False, compiled=False)
    assert mem["state"] == pytest.approx(n * bytes_per_param / 2**30)
    ddp = P.memory_gib(spec.replace(distributed="ddp"), world=world, micro_batch=1, zero_stage=zero,
                       checkpointing=False, compiled=False)
    assert ddp["state"] == pytest.approx(n * (20 + (4 if world > 1 else 0)) / 2**30)  # DDP's buckets


def test_activations_grow_with_micro_batch_and_shrink_with_checkpointing():
    spec = _spec("806M")
    one, four = (P.memory_gib(spec, world=1, micro_batch=m, zero_stage=0, checkpointing=False, compiled=False)
                 for m in (1, 4))
    ck = P.memory_gib(spec, world=1, micro_batch=4, zero_stage=0, checkpointing=True, compiled=False)
    assert four["activations"] == pytest.approx(4 * one["activations"]) and ck["activations"] < four["activations"]


def test_plan_keeps_the_global_batch_and_the_run_id_and_fits_with_a_margin():
    spec = _spec("3B", batch_size=96, zero_stage=1)
    planned, plan = P.plan_run(spec, "max1550-tile", workers=12, cpus_per_device=8)
    assert plan.fits and plan.predicted_peak_gib <= 64 * P.MEMORY_MARGIN
    assert plan.micro_batch * plan.accumulation * plan.workers == 96 == planned.batch_size
    assert planned.run_id == spec.run_id == plan.run_id  # how a run is split never changes what it computes
    assert plan.loader_workers == 6 and plan.compile is False  # XPU stays eager until measured there
    assert planned.micro_batch_size == plan.micro_batch and planned.num_workers == 6


def test_plan_turns_on_checkpointing_then_zero_before_refusing():
    spec = _spec("3B", batch_size=8, zero_stage=0)
    planned, plan = P.plan_run(spec, "a100-40gb", workers=1)
    assert plan.fits is False and "does not fit a100-40gb" in plan.reason and "ZeRO-3" in plan.reason
    planned, plan = P.plan_run(spec.replace(batch_size=64), "a100-40gb", workers=8)
    assert plan.fits and plan.zero_stage >= 1
    planned, plan = P.plan_run(_spec("806M", batch_size=64, zero_stage=1), "a100-40gb", workers=1)
    assert plan.fits and (plan.activation_checkpointing or plan.micro_batch < 64)
    with pytest.raises(ValueError, match="fit no plan on a100-40gb"):
        P.plan_study([_spec("3B", batch_size=8)], "a100-40gb", workers=1)


def test_mamba_checkpoints_its_blocks_only_when_it_must_and_packs_brain_tokens_only():
    spec = RunSpec(family="neuromamba", size="12M", grid=(96, 96, 96), sequence_length=20, batch_size=16,
                   precision="bf16")
    _, plan = P.plan_run(spec, "h100-80gb", workers=1)
    assert plan.activation_checkpointing is False and plan.fits
    # 320M does not fit an A100 40 GB without recomputing its blocks: NeuroMamba's field is checkpoint_blocks
    big = spec.replace(size="320M", batch_size=8)
    planned, plan = P.plan_run(big, "a100-40gb", workers=1)
    assert plan.fits and plan.activation_checkpointing and model_config(planned).checkpoint_blocks
    # background removal packs the kept tokens: the activations are that fraction of the unpacked model's
    on, off = model_config(big), model_config(big.replace(model_overrides={"remove_background": False}))
    assert P.activation_elements(on)[0] == pytest.approx(P.activation_elements(off)[0] * on.brain_token_fraction)


def _row(size, mb, sps, kind="NVIDIA H100 80GB HBM3", compile=True):
    fps = R.flops_per_sample(model_config(_spec(size)))["train"]
    return {"family": "swift_v2", "size": size, "micro_batch": mb, "compile": compile, "checkpointing": False,
            "samples_per_s": sps, "device": kind, "device_kind": P.device_kind(kind).name,
            "train_flops_per_sample": fps, "_file": "t.jsonl"}


def test_throughput_is_measured_or_says_how_it_was_extrapolated():
    rows = [_row("51M", 16, 200.0), _row("806M", 4, 40.0)]
    h100, a100 = P.device_kind("h100-80gb"), P.device_kind("a100-40gb")
    rate, src = P.predict_throughput(_spec("51M"), h100, world=1, micro_batch=16, compiled=True,
                                     checkpointing=False, rows=rows)
    assert rate == 200.0 and src.startswith("measured")
    rate, src = P.predict_throughput(_spec("51M"), h100, world=1, micro_batch=32, compiled=True,
                                     checkpointing=False, rows=rows)
    assert rate == 200.0 and "micro-batch 16 -> 32 at the same rate" in src and src.startswith("extrapolated")
    two = rows + [_row("51M", 64, 300.0)]  # between two measured micro-batches: the log-log line through them
    rate, src = P.predict_throughput(_spec("51M"), h100, world=1, micro_batch=32, compiled=True,
                                     checkpointing=False, rows=two)
    assert rate == pytest.approx(math.sqrt(200.0 * 300.0)) and "mb16 and mb64" in src
    rate, _ = P.predict_throughput(_spec("51M"), h100, world=1, micro_batch=128, compiled=True,
                                   checkpointing=False, rows=two)
    assert rate == 300.0  # never above the largest micro-batch measured
    rate, src = P.predict_throughput(_spec("806M"), a100, world=4, micro_batch=4, compiled=True,
                                     checkpointing=False, rows=rows)
    assert rate == pytest.approx(40.0 * 312 / 989 * 4 * P.SCALING_EFFICIENCY) and "peak ratio" in src
    rate, src = P.predict_throughput(_spec("806M"), h100, world=1, micro_batch=4, compiled=False,
                                     checkpointing=False, rows=rows)
    assert src.startswith("ASSUMED") and rate > 0


def test_dry_run_json_has_one_object_per_run_then_a_summary(tmp_path, capsys):
    from study.scaling_law import main

    (tmp_path / "m.parquet").write_bytes(b"")
    assert main(["--preset", "ladder-xl", "--site", "aurora", "--manifest", str(tmp_path / "m.parquet"), "--dry-run",
                 "--json", "--device-kind", "h100-80gb"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    keys = {"run_id", "family", "size", "parametrization", "lr", "device_kind", "global_batch", "micro_batch",
            "accumulation", "workers", "activation_checkpointing", "zero_stage", "compile", "loader_workers",
            "predicted_peak_gib", "device_memory_gib", "predicted_samples_per_s", "throughput_source", "gpu_hours"}
    assert len(runs) == 48 and all(keys <= set(r) for r in runs)
    assert {r["device_kind"] for r in runs} == {"h100-80gb"} and all(r["fits"] for r in runs)
    assert summary["summary"] and summary["runs"] == 48 and math.isclose(
        summary["gpu_hours"], sum(r["gpu_hours"] for r in runs))
    assert main(["--preset", "ladder-xl", "--site", "aurora", "--manifest", str(tmp_path / "nope.parquet"),
                 "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_memory_model_matches_every_measured_peak_within_15_percent():
    """Every peak measured through train() on a GPU (benchmarks/planner_calibration.sh), including the rows the
    fit left out (the 3B's, whose peak is the optimizer step's, and the checkpointed one)."""
    rows = P.measured_rows()
    assert len(rows) >= 16, "benchmarks/results/planner holds the calibration rows (benchmarks/planner_calibration.sh)"
    assert {r["size"] for r in rows if r["family"] == "swift_v2"} == {"51M", "202M", "806M", "3B"}
    assert {r["size"] for r in rows if r["family"] == "neuromamba"} == {"1.4M", "3.1M", "12M", "41M", "91M"}
    for r in rows:
        spec = _spec(r["size"], family=r["family"], distributed=r["dist"], batch_size=r["global_batch"],
                     model_overrides=P._row_overrides(r))
        mem = P.memory_gib(spec, world=r["gpus"], micro_batch=r["micro_batch"], zero_stage=r["zero_stage"],
                           checkpointing=r["checkpointing"], compiled=r["compile"])
        err = mem["total"] / r["peak_mem_gib"] - 1
        assert abs(err) <= 0.15, (r["_file"], r["size"], r["micro_batch"], mem, r["peak_mem_gib"])


def test_committed_constants_are_the_least_squares_fit_of_the_rows():
    for mode, compiled in (("eager", False), ("compiled", True)):
        rows = [r for r in P.measured_rows() if r["compile"] == compiled and not r["checkpointing"]
                and r["family"] == "swift_v2"]
        fit = P.fit_activation_model(rows)
        assert fit.c == pytest.approx(P.ACTIVATION_FITS[mode].c, abs=0.05)
        assert fit.f == pytest.approx(P.ACTIVATION_FITS[mode].f, abs=0.05)
    # NeuroMamba's fit is session 16's four rows; the rows measured later are its held-out check (the 15% test)
    committed = P.FAMILY_ACTIVATION_FITS["neuromamba"]["compiled"]
    fitted = {("1.4M", 8, False), ("3.1M", 8, False), ("12M", 4, False), ("91M", 2, True)}
    rows = [r for r in P.measured_rows() if r["family"] == "neuromamba"
            and (r["size"], r["micro_batch"], P._row_overrides(r)["remove_background"]) in fitted]
    assert len(rows) == 4
    fit = P.fit_activation_model(rows, f=committed.f, transient=True)
    assert fit.c == pytest.approx(committed.c, abs=0.05)
    assert fit.transient == pytest.approx(committed.transient, abs=0.1)


def test_a_neuromamba_row_is_exact_only_for_its_own_background_setting():
    """NeuroMamba's rows carry their background-removal setting in ``overrides``: the same size and micro-batch
    with the other setting is a different amount of work, predicted at the row's FLOP rate, not its samples/s."""
    h100 = P.device_kind("h100-80gb")
    mamba = [r for r in P.measured_rows() if r["family"] == "neuromamba"]
    row = next(r for r in mamba if r["size"] == "1.4M" and not P._row_overrides(r)["remove_background"])
    measured_on = next(r for r in mamba if r["size"] == "1.4M" and P._row_overrides(r)["remove_background"])
    rows = [r for r in mamba if r is not measured_on]  # 1.4M measured without background removal only
    same = _spec("1.4M", family="neuromamba", distributed="ddp", batch_size=8,
                 model_overrides={"remove_background": False})
    rate, src = P.predict_throughput(same, h100, world=1, micro_batch=8, compiled=True, checkpointing=False, rows=rows)
    assert rate == row["samples_per_s"] and src.startswith("measured")
    other = same.replace(model_overrides={"remove_background": True})
    rate, src = P.predict_throughput(other, h100, world=1, micro_batch=8, compiled=True, checkpointing=False, rows=rows)
    assert not src.startswith("measured") and rate > 2 * row["samples_per_s"]
    # at the row's FLOP rate, above the measured removal run (session 19, one H100: 88.1 predicted, 74.3 measured):
    # removal runs at a lower FLOP rate than the full grid (10.8 against 12.8 TFLOP/s at 1.4M)
    assert rate > measured_on["samples_per_s"]


def test_throughput_prediction_is_the_measured_rate_where_measured():
    h100 = P.device_kind("h100-80gb")
    for r in P.measured_rows():
        if r.get("memory_only"):  # a superseded rate, kept for a memory fit's provenance
            continue
        spec = _spec(r["size"], family=r["family"], distributed="ddp", batch_size=r["global_batch"],
                     model_overrides=P._row_overrides(r))
        rate, src = P.predict_throughput(spec, h100, world=1, micro_batch=r["micro_batch"], compiled=r["compile"],
                                         checkpointing=r["checkpointing"])
        assert rate == r["samples_per_s"] and src.startswith("measured")


def test_zero0_on_cuda_runs_as_ddp_so_its_small_stages_replay_as_cuda_graphs():
    """ZeRO-0 is replicated data parallelism: the planner hands it to DDP (the same step), where the compiled
    launch-bound regions may replay as CUDA graphs; a ZeRO stage >= 1, and XPU, stay under DeepSpeed."""
    from study.run_math import BatchPlan
    from study.train import uses_cuda_graphs

    planned, plan = P.plan_run(_spec("51M", batch_size=64, zero_stage=0), "h100-80gb", workers=4)
    assert plan.fits and plan.zero_stage is None and planned.distributed == "ddp" and planned.compile
    assert uses_cuda_graphs(planned, BatchPlan.make(planned, 4), torch.device("cuda", 0))
    assert not uses_cuda_graphs(planned, BatchPlan.make(planned, 4), torch.device("cpu"))
    assert not uses_cuda_graphs(planned.replace(cuda_graphs=False), BatchPlan.make(planned, 4), torch.device("cuda"))
    accum = planned.replace(micro_batch_size=planned.batch_size // 8)
    assert BatchPlan.make(accum, 4).accumulation == 2
    assert not uses_cuda_graphs(accum, BatchPlan.make(accum, 4), torch.device("cuda"))  # graphs would free grads
    planned, _ = P.plan_run(_spec("3B", batch_size=64, zero_stage=1), "h100-80gb", workers=8)
    assert planned.distributed == "deepspeed" and not uses_cuda_graphs(planned, BatchPlan.make(planned, 8),
                                                                        torch.device("cuda"))
    planned, _ = P.plan_run(_spec("51M", batch_size=64, zero_stage=0), "max1550-tile", workers=4)
    assert planned.distributed == "deepspeed" and not planned.compile


def test_flop_rate_interpolation_is_exact_at_points_log_log_between_and_clamped_outside():
    """log(FLOP rate) linear in log(FLOPs per sample) between two points: samples/s then lies between theirs too
    (linear in the rate itself put SwiFT 202M at micro-batch 8 above 51M's samples/s)."""
    pts = [(1e12, 10.0, "a"), (1e14, 50.0, "c"), (1e13, 30.0, "b")]
    assert [P.interpolate_flop_rate(pts, f)[0] for f in (1e12, 1e13, 1e14)] == [10.0, 30.0, 50.0]
    rate, how, used = P.interpolate_flop_rate(pts, 10 ** 12.5)
    assert rate == pytest.approx(math.sqrt(10.0 * 30.0)) and used == ["a", "b"]
    assert how.startswith("interpolated between a and b rows")
    assert P.interpolate_flop_rate(pts, 1e11)[0] == 10.0 and P.interpolate_flop_rate(pts, 1e15)[0] == 50.0


def _mamba(size, mb, bg=True):
    return _spec(size, family="neuromamba", distributed="ddp", batch_size=mb,
                 model_overrides={"remove_background": bg})


def test_an_unmeasured_neuromamba_size_is_interpolated_between_its_measured_neighbours():
    """Issue #22 item 2: 41M took the FLOP rate of one row picked by micro-batch first, so with session 16's rows
    it was predicted slower than 91M (3.1M's 15.6 TFLOP/s against 91M's 51). Now its FLOP rate lies between 12M's
    and 91M's, linear in log FLOPs per sample, at every micro-batch and with background removal on or off."""
    h100 = P.device_kind("h100-80gb")

    def sps(size, mb, bg=True, rows=None):
        return P.predict_throughput(_mamba(size, mb, bg), h100, world=1, micro_batch=mb, compiled=True,
                                    checkpointing=False, rows=rows)

    mamba = [r for r in P.measured_rows() if r["family"] == "neuromamba"]
    no41 = [r for r in mamba if r["size"] != "41M"]  # 41M held out (measured since session 19)
    for bg in (True, False):
        for mb in (1, 2, 4, 8):
            (r12, _), (r41, src), (r91, _) = (sps(s, mb, bg, rows=no41) for s in ("12M", "41M", "91M"))
            assert r12 > r41 > r91, (bg, mb, r12, r41, r91)
            assert src.startswith("interpolated between 12M") and " and 91M" in src, src
    # the held-out 41M rows (session 19, one H100): with removal at micro-batch 8, without at 2
    for bg, mb in ((True, 8), (False, 2)):
        got = next(r for r in mamba if r["size"] == "41M" and r["micro_batch"] == mb
                   and P._row_overrides(r)["remove_background"] == bg)
        assert sps("41M", mb, bg, rows=no41)[0] == pytest.approx(got["samples_per_s"], rel=0.15), (bg, mb)
    # one row per size with mixed settings (session 16's flaw setting): 41M with removal, micro-batch 8, still
    # between 12M and 91M
    one = [r for r in mamba if (r["size"], r["micro_batch"], P._row_overrides(r)["remove_background"]) in
           {("1.4M", 8, False), ("3.1M", 8, False), ("12M", 4, False), ("91M", 4, True)}]
    assert len(one) == 4
    (r12, _), (r41, _), (r91, _) = (sps(s, 8, rows=one) for s in ("12M", "41M", "91M"))
    assert r12 > r41 > r91


def test_the_interpolation_is_exact_at_every_measured_row():
    """Not through the ``measured`` shortcut: the row under another size name is the point the run sits on."""
    h100 = P.device_kind("h100-80gb")
    for r in P.measured_rows():
        if r.get("memory_only"):  # not a throughput row
            continue
        rows = [dict(r, size="elsewhere")] + [q for q in P.measured_rows() if q is not r]
        spec = _spec(r["size"], family=r["family"], distributed="ddp", batch_size=r["global_batch"],
                     model_overrides=P._row_overrides(r))
        rate, src = P.predict_throughput(spec, h100, world=1, micro_batch=r["micro_batch"], compiled=r["compile"],
                                         checkpointing=r["checkpointing"], rows=rows)
        assert rate == pytest.approx(r["samples_per_s"], rel=1e-9) and "from elsewhere at its FLOP rate" in src


def test_swift_202m_compiled_lies_between_its_measured_neighbours():
    """No compiled 202M row: its FLOP rate is between 51M's and 806M's at the same micro-batch (monotone in size),
    not one neighbour's (41-64 TFLOP/s at 51M, 238 at 806M: a single-row pick swung the prediction ~9x)."""
    h100 = P.device_kind("h100-80gb")
    for mb in (8, 16, 32):
        rates = {}
        for size in ("51M", "202M", "806M"):
            spec = _spec(size, distributed="ddp", batch_size=mb)
            rate, src = P.predict_throughput(spec, h100, world=1, micro_batch=mb, compiled=True, checkpointing=False)
            fps = R.flops_per_sample(model_config(spec))["train"]
            rates[size] = (rate, rate * fps, src)
        assert rates["51M"][0] > rates["202M"][0] > rates["806M"][0], (mb, rates)
        assert rates["51M"][1] < rates["202M"][1] < rates["806M"][1]
        assert rates["202M"][2].startswith("interpolated between 51M and 806M rows")


def test_run_prediction_adds_host_input_time_and_matches_the_measured_study_run():
    """A run reads its windows from files: its predicted rate is the device's (preloaded rows) with the host's input
    time per window added, scaled by the window's size and per device; the preset's 51M run measured through
    study/scaling_law.py on one H100 (session 18) is within 15% of its plan's prediction."""
    import json
    from pathlib import Path

    spec = _spec("51M")
    t = P.INPUT_S_PER_WINDOW
    assert P.with_input_cost(400.0, spec, 1) == pytest.approx(1 / (1 / 400.0 + t))
    small = spec.replace(grid=(48, 48, 48))  # 1/8 of the voxels: 1/8 of the input time
    assert P.with_input_cost(400.0, small, 1) == pytest.approx(1 / (1 / 400.0 + t / 8))
    four = P.with_input_cost(4 * 400.0 * P.SCALING_EFFICIENCY, spec, 4)  # each device pays its own input time
    assert four == pytest.approx(4 * P.SCALING_EFFICIENCY / (1 / 400.0 + t))

    root = Path(__file__).resolve().parents[2]
    measured = json.loads((root / "benchmarks/results/gpu/session18/call3/preset51.json").read_text())
    run = spec.replace(batch_size=32, compile=True, parametrization="mup", mup_base_width=96, manifest="m.parquet")
    planned, plan = P.plan_run(run, "h100-80gb", workers=1, cpus_per_device=8)
    assert (plan.micro_batch, plan.accumulation) == (32, 1) and plan.throughput_source.startswith("measured")
    preloaded, _ = P.predict_throughput(planned, P.device_kind("h100-80gb"), world=1, micro_batch=32, compiled=True,
                                        checkpointing=False)
    assert plan.predicted_samples_per_s < preloaded
    assert abs(plan.predicted_samples_per_s / measured["samples_per_s"] - 1) <= 0.15
