"""Fine-tuning engine: strategies' trainable sets, frozen parameters, LoRA merge, weight loading, errors, resume."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from neuro_models import registry as R
from study import checkpoint as ckpt
from study import finetune_engine as FE
from study.devices import DistContext
from study.reporters import MemoryReporter
from study.spec import STRATEGIES, RunSpec
from study.run_math import model_config
from study.train import train

GRID = (24, 24, 24)
T = 4


@pytest.fixture(scope="module")
def ft_cohort(tmp_path_factory):
    """16 subjects (24^3 x 8 frames), a quarter each in val and test, so every split has subjects."""
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("ftcohort")
    return str(generate_cohort(root, n_subjects=16, grid=GRID, n_frames=8, seed=3, progress=False,
                               fractions=(0.5, 0.25, 0.25)))


def _spec(**kw) -> RunSpec:
    base = dict(task="finetune", family="swift_v2", size="debug", grid=GRID, sequence_length=T, batch_size=4,
                budget=3, eval_every=3, precision="fp32", target="trait_bin", task_type="classification",
                lr=3e-3, log_every=1)
    base.update(kw)
    return RunSpec(**base)


def _export(tmp_path, spec: RunSpec, name: str, seed: int = 11) -> str:
    """Export the weights of a (randomly initialised) pre-training model of ``spec``'s architecture."""
    pre = RunSpec(**{**{k: v for k, v in spec.to_dict().items()
                        if k in ("family", "size", "grid", "sequence_length", "width", "model_overrides")},
                     "task": "pretrain"})
    cfg = model_config(pre)
    torch.manual_seed(seed)
    model = R.build_pretrain_model(cfg)
    cdir = tmp_path / f"ck_{name}"
    cdir.mkdir()
    torch.save(model.state_dict(), cdir / "model.pt")
    return str(ckpt.export_weights(cdir, tmp_path / f"{name}.safetensors", model_config=cfg,
                                   spec_json=pre.to_json()))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("w"), _spec(), "debug")


def _built(strategy, weights, **kw):
    spec = _spec(strategy=strategy, init_from=None if strategy == "scratch" else weights, **kw)
    cfg = model_config(spec)
    return spec, FE.build_model(spec, cfg, FE.load_weights(spec, cfg))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trainable_set_of_each_strategy(strategy, weights):
    spec, model = _built(strategy, weights)
    names = {n for n, _ in model.named_parameters()}
    train_names = _trainable(model)
    head = {n for n in names if n.startswith("head.")}
    assert head and head <= train_names
    last = len(model.encoder.stages) - 1
    if strategy in ("scratch", "full"):
        assert train_names == names
    elif strategy == "last_block":
        expect = {n for n in names if n.startswith((f"encoder.stages.{last}.", "encoder.norm.", "head."))}
        assert train_names == expect
        assert not any(n.startswith("encoder.stages.0.") for n in train_names)
    elif strategy == "lora":
        lora = {n for n in names if "lora_" in n}
        assert lora and train_names == lora | head
        # adapters sit on every linear of the blocks: qkv, proj, fc1, fc2 of each block (4 per block)
        n_blocks = sum(len(s.blocks) for s in model.encoder.stages)
        assert len({n.rsplit(".lora_", 1)[0] for n in lora}) == 4 * n_blocks
    elif strategy == "prompt":
        assert model.prompts.shape == (spec.prompt_tokens, model.encoder.num_features)
        assert train_names == {"prompts"} | head
    elif strategy == "frozen_mlp":
        assert train_names == head
        linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 2 and linears[0].out_features == model.encoder.num_features
    frac = FE.trainable_summary(model)["trainable_frac"]
    assert 0 < frac <= 1
    assert (frac == 1) == (strategy in ("scratch", "full"))


def test_last_block_is_about_30_percent_of_51M():
    spec = _spec(size="51M", grid=(96, 96, 96), sequence_length=20, strategy="last_block", init_from="unused")
    with torch.device("meta"):
        model = FE.build_model(spec, model_config(spec), None)
    frac = FE.trainable_summary(model)["trainable_frac"]
    assert 0.25 < frac < 0.32, frac  # the seed: "fine-tuning only 30% of the total parameters"


@pytest.mark.parametrize("strategy", ["last_block", "lora", "prompt", "frozen_mlp"])
def test_frozen_parameters_get_no_gradient(strategy, weights):
    _, model = _built(strategy, weights)
    x = torch.randn(2, 1, *GRID, T)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_pretrained_encoder_is_loaded(weights):
    _, model = _built("full", weights)
    sd, _ = ckpt.load_exported(weights)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, sd[f"encoder.{k}"], rtol=0, atol=0)
    _, scratch = _built("scratch", weights)
    k = "patch_embed.proj.weight"
    assert not torch.equal(scratch.encoder.state_dict()[k], sd[f"encoder.{k}"])


def test_lora_merged_equals_unmerged(weights):
    from peft.tuners.lora import LoraLayer

    _, model = _built("lora", weights)
    model = model.double().eval()
    torch.manual_seed(0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    with torch.no_grad():
        for m in layers:  # B starts at zero; make the adapters do something
            m.lora_B["default"].weight.normal_(0, 0.2)
    x = torch.randn(3, 1, *GRID, T, dtype=torch.float64)
    with torch.no_grad():
        base_out = model(x)
        for m in layers:
            m.merge()
        merged_out = model(x)
        for m in layers:
            m.unmerge()
        unmerged_again = model(x)
    torch.testing.assert_close(merged_out, base_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unmerged_again, base_out, rtol=1e-10, atol=1e-10)
    # and the adapters matter: with B = 0 the output differs
    with torch.no_grad():
        for m in layers:
            m.lora_B["default"].weight.zero_()
        assert not torch.allclose(model(x), base_out)


# ------------------------------------------------------------------------------------------------
# bad input: clear errors before compute
# ------------------------------------------------------------------------------------------------
def test_unknown_strategy_errors():
    with pytest.raises(ValueError, match="strategy='bitfit'.*scratch"):
        _spec(strategy="bitfit")
    with pytest.raises(ValueError, match="strategy='bitfit'"):
        FE.check_strategy("bitfit")


def test_strategy_and_init_from_must_agree(weights):
    ctx = DistContext()
    with pytest.raises(ValueError, match="needs init_from"):
        train(_spec(strategy="lora", manifest="/nonexistent/manifest.parquet"), ctx)
    with pytest.raises(ValueError, match="scratch.*init_from"):
        train(_spec(strategy="scratch", init_from=weights, manifest="/nonexistent/manifest.parquet"), ctx)


@pytest.mark.parametrize("other", [dict(width=32), dict(family="neuromamba")])
def test_mismatched_checkpoint_errors_before_compute(tmp_path, other):
    wrong = _export(tmp_path, _spec(**other), "wrong")
    # a manifest that does not exist: if data (compute) were touched first, a different error would come
    spec = _spec(strategy="last_block", init_from=wrong, manifest="/nonexistent/manifest.parquet")
    with pytest.raises(ckpt.CheckpointError, match="do not fit this model") as err:
        train(spec, DistContext())
    field = "embed_dim" if "width" in other else "family"
    assert field in str(err.value)


def test_missing_weights_file_errors(tmp_path):
    spec = _spec(strategy="full", init_from=str(tmp_path / "nope.safetensors"), manifest="/nonexistent")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        train(spec, DistContext())


# ------------------------------------------------------------------------------------------------
# runs on data
# ------------------------------------------------------------------------------------------------
def test_finetune_run_keeps_frozen_weights_and_reports_test_metrics(ft_cohort, weights, tmp_path):
    spec = _spec(strategy="last_block", init_from=weights, manifest=ft_cohort)
    rep = MemoryReporter()
    res = train(spec, DistContext(), rep, run_dir=tmp_path / "run")
    assert res.status == "finished" and res.step == 3
    final = rep.reports[-1]
    assert final["is_final"] and 0 <= final["test_auroc"] <= 1 and 0 <= final["test_bacc"] <= 1
    import pandas as pd

    n_split = pd.read_parquet(ft_cohort).split.value_counts()
    assert final["test_n_subjects"] == n_split["test"] and final["val_n_subjects"] == n_split["val"]
    assert final["trainable_frac"] == pytest.approx(FE.trainable_summary(_built("last_block", weights)[1])
                                                    ["trainable_frac"])
    sd, _ = ckpt.load_exported(weights)
    after = torch.load(ckpt.step_dir(tmp_path / "run" / "checkpoints", 3) / "model.pt", weights_only=True)
    last = "encoder.stages.1."
    moved = [k for k in sd if k.startswith("encoder.") and not torch.equal(sd[k], after[k])]
    assert moved and all(k.startswith((last, "encoder.norm.")) for k in moved), moved
    frozen = [k for k in sd if k.startswith("encoder.") and not k.startswith((last, "encoder.norm."))]
    assert frozen and all(torch.equal(sd[k], after[k]) for k in frozen)


def test_regression_reports_mae_in_target_units(ft_cohort):
    """A model that predicts 0 on the standardised scale predicts the training mean: MAE is known exactly."""
    import pandas as pd

    spec = _spec(strategy="scratch", target="trait_cont", task_type="regression", manifest=ft_cohort)
    cfg = model_config(spec)
    model = FE.build_model(spec, cfg, None)
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    _, train_ds, _, test_ds = FE.build_finetune_datasets(spec)
    mean, std = FE.target_stats(spec, train_ds)
    df = pd.read_parquet(ft_cohort)
    y_train = df[df.split == "train"]["trait_cont"].to_numpy(np.float64)
    assert mean == pytest.approx(y_train.mean(), rel=1e-12) and std == pytest.approx(y_train.std(), rel=1e-12)
    assert abs(mean) > 1e-3  # a mean of zero would hide a missing de-standardisation
    out = FE.evaluate_split(model, test_ds, spec, DistContext(), prefix="test", y_mean=mean, y_std=std, batch_size=3)
    y_test = df[df.split == "test"]["trait_cont"].to_numpy(np.float64)
    assert out["test_n_subjects"] == len(y_test)
    assert out["test_mae"] == pytest.approx(np.abs(y_test - mean).mean(), rel=1e-6)


def test_resume_reproduces_uninterrupted_losses(ft_cohort, weights, tmp_path):
    spec = _spec(strategy="lora", init_from=weights, manifest=ft_cohort, budget=4, eval_every=2)
    ctx = DistContext()
    full = MemoryReporter()
    train(spec, ctx, full, run_dir=tmp_path / "a")
    part = MemoryReporter()
    calls = iter(range(100))
    r1 = train(spec, ctx, part, run_dir=tmp_path / "b", should_stop=lambda: next(calls) >= 2)
    assert r1.status == "stopped" and r1.step == 2
    r2 = train(spec, ctx, part, run_dir=tmp_path / "b",
               resume_from=ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert r2.status == "finished"
    a = [m["train_loss"] for m in full.logs]
    b = [m["train_loss"] for m in part.logs]
    assert len(a) == 4 and len(b) == 4
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert part.reports[-1]["test_auroc"] == pytest.approx(full.reports[-1]["test_auroc"], abs=1e-9)


def test_batch_that_does_not_divide_across_ranks_errors_before_compute(weights):
    spec = _spec(strategy="full", init_from=weights, batch_size=4, manifest="/nonexistent")
    with pytest.raises(ValueError, match="does not divide across world_size=3"):
        train(spec, DistContext(world_size=3))


def test_nan_loss_stops_with_step_and_last_checkpoint(ft_cohort, tmp_path):
    from study.loop import TrainingDiverged

    spec = _spec(strategy="full", manifest=ft_cohort)
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = model_config(RunSpec(family="swift_v2", size="debug", grid=GRID, sequence_length=T))
    model = R.build_pretrain_model(cfg)
    sd = model.state_dict()
    sd["encoder.norm.weight"] = torch.full_like(sd["encoder.norm.weight"], float("nan"))
    torch.save(sd, bad / "model.pt")
    w = ckpt.export_weights(bad, tmp_path / "nan.safetensors", model_config=cfg, spec_json="{}")
    with pytest.raises(TrainingDiverged, match="non-finite loss nan at step 1; last good checkpoint: none"):
        train(spec.replace(init_from=str(w)), DistContext(), run_dir=tmp_path / "run")


@pytest.mark.slow  # two torchrun processes start torch: ~30 s on 2 busy cores
def test_torchrun_two_ranks_match_one_process(ft_cohort, weights, tmp_path):
    """DDP fine-tuning on 2 gloo ranks == 1 process with accumulation: losses and per-subject test metric."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    spec = _spec(strategy="lora", init_from=weights, manifest=ft_cohort, target="trait_cont",
                 task_type="regression", budget=4, eval_every=2)
    ref = MemoryReporter()
    train(spec.replace(micro_batch_size=2), DistContext(), ref)
    run_dir = tmp_path / "tr"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(spec.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "study.launch_local", "--spec", str(run_dir / "spec.json"), "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [r["train_loss"] for r in rows if r["kind"] == "log"]
    assert got == pytest.approx([m["train_loss"] for m in ref.logs], rel=1e-5)
    final = [r for r in rows if r["kind"] == "report"][-1]
    assert final["test_mae"] == pytest.approx(ref.reports[-1]["test_mae"], rel=1e-5)
    assert final["test_n_subjects"] == ref.reports[-1]["test_n_subjects"]


@pytest.mark.parametrize("strategy", ["last_block", "lora", "frozen_mlp"])
def test_neuromamba_strategies(strategy):
    """Families without stages: last block = last Mamba block + norm + head; LoRA on the block linears."""
    spec = _spec(family="neuromamba", sequence_length=8, strategy=strategy, init_from="unused")
    model = FE.build_model(spec, model_config(spec), None)
    names = _trainable(model)
    if strategy == "last_block":
        last = len(model.encoder.blocks) - 1
        assert names == {n for n, _ in model.named_parameters()
                         if n.startswith((f"encoder.blocks.{last}.", "encoder.norm_f.", "head."))}
    elif strategy == "lora":
        assert all("lora_" in n or n.startswith("head.") for n in names) and any("lora_" in n for n in names)
    else:
        assert all(n.startswith("head.") for n in names)
    model(torch.randn(2, 1, *GRID, 8)).sum().backward()
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())


def test_prompt_strategy_on_a_family_without_prompts_errors():
    spec = _spec(family="neuromamba", sequence_length=8, strategy="prompt", init_from="unused")
    with pytest.raises(ValueError, match="strategy='prompt' is not supported by family 'neuromamba'"):
        FE.build_model(spec, model_config(spec), None)


def test_zero_budget_and_missing_target_error():
    with pytest.raises(ValueError, match="budget=0"):
        _spec(budget=0)
    with pytest.raises(ValueError, match="target"):
        _spec(target=None)
    with pytest.raises(ValueError, match="task_type='ranking'"):
        _spec(task_type="ranking")


def test_unknown_target_column_errors(ft_cohort):
    spec = _spec(strategy="scratch", target="trait_missing", manifest=ft_cohort)
    with pytest.raises(ValueError, match="target='trait_missing' is not a manifest column"):
        train(spec, DistContext())


def test_checkpoints_follow_checkpoint_every_not_eval_every(ft_cohort, weights, tmp_path):
    """A checkpoint step evaluates and saves even when it is not an evaluation step (shared step loop)."""
    spec = _spec(strategy="lora", init_from=weights, manifest=ft_cohort, budget=4, eval_every=3,
                 checkpoint_every=2, keep_last=5)
    rep = MemoryReporter()
    train(spec, DistContext(), rep, run_dir=tmp_path)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == ["step_0000002", "step_0000004"]
    assert [r["step"] for r in rep.reports] == [2, 3, 4]
    assert rep.reports[-1]["tokens_seen"] == rep.reports[-1]["samples_seen"] * R.tokens_per_sample(model_config(spec))
