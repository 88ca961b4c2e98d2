"""Consolidated weight export: world-size independent, ZeRO shards gathered, loadable on one device."""
from __future__ import annotations

import pytest
import torch

from neuro_models import registry as R
from study import checkpoint as ckpt
from study.devices import local_context
from study.reporters import MemoryReporter
from study.run_math import model_config
from study.train import train


def test_export_round_trips_into_a_fresh_model(mamba_spec, tmp_path):
    spec = mamba_spec.replace(budget=3, eval_every=3)
    train(spec, local_context("cpu"), MemoryReporter(), run_dir=tmp_path)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    out = ckpt.export_weights(last, tmp_path / "w.safetensors", model_config=model_config(spec),
                              spec_json=spec.to_json(), mup_base_width=None)
    sd, info = ckpt.load_exported(out)
    assert info["spec"]["family"] == "neuromamba" and info["model_config"]["embed_dim"] == model_config(spec).embed_dim
    model = R.build_pretrain_model(model_config(spec))
    model.load_state_dict(sd, strict=True)
    saved = torch.load(last / "model.pt", weights_only=True)
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v.float()), k


def test_load_exported_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="not a NeuroX weights export"):
        ckpt.load_exported(tmp_path / "x.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_exported(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_zero2_shards_export_to_the_ddp_weights(mamba_spec, tmp_path, torchrun_losses):
    """2-rank DeepSpeed ZeRO-2 and 2-rank DDP train identically; their exports hold the same weights."""
    spec = mamba_spec.replace(budget=3, eval_every=3)
    torchrun_losses(spec, tmp_path / "ddp")
    torchrun_losses(spec.replace(distributed="deepspeed", zero_stage=2), tmp_path / "ds")
    exports = {}
    for name in ("ddp", "ds"):
        last = ckpt.latest_checkpoint(tmp_path / name / "checkpoints")
        f = ckpt.export_weights(last, tmp_path / f"{name}.safetensors", model_config=model_config(spec),
                                spec_json=spec.to_json())
        exports[name], _ = ckpt.load_exported(f)
    assert any((p / "ds").is_dir() for p in (tmp_path / "ds" / "checkpoints").iterdir())  # sharded format
    assert exports["ddp"].keys() == exports["ds"].keys()
    for k in exports["ddp"]:
        torch.testing.assert_close(exports["ds"][k], exports["ddp"][k], rtol=1e-5, atol=1e-6)
