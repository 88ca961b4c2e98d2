"""W&B reporting in offline mode (the default without a key): runs land on disk and can be synced later."""
from __future__ import annotations


from study.spec import RunSpec
from study.wandb_reporter import WandbReporter, create_sweep, sweep_parameters, wandb_mode


def test_mode_is_offline_without_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    specs = [RunSpec(lr=1e-3), RunSpec(lr=2e-3)]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert create_sweep("s", specs) is None  # never contacts W&B offline
    assert sweep_parameters(specs) == {"lr": {"values": [0.001, 0.002]}}


def test_offline_run_is_written_and_grouped_by_study(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = RunSpec(study="my-study", lr=1e-3)
    rep = WandbReporter(spec, dir=tmp_path)
    assert rep.run.group == "my-study" and rep.run.name == spec.run_id
    rep.log({"step": 1, "train_loss": 1.5, "lr": 1e-3})
    rep.report({"step": 1, "val_loss": 1.4, "flops": 1e9})
    rep.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no offline run file to sync"
