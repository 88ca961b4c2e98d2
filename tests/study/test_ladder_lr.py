"""Ladders train under muP with a transferred LR, and always say where their LR came from."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from study.lr_transfer import TRANSFER_FILE, TransferredLR, pooled_base_lr
from study.plans import load_plan
from study.scaling_law import main


def _artifact(**kw) -> TransferredLR:
    d = dict(family="swift_v2", size="51M", base_width=48, base_lr=2.0 ** -9, lr_lo=2.0 ** -9.4, lr_hi=2.0 ** -8.6,
             widths=(24, 48, 96, 192), slope=0.05, slope_lo=-0.2, slope_hi=0.3, sp_slope=-0.9, study="mut51")
    d.update(kw)
    return TransferredLR(**d)


def _opts(tmp_path, **kw):
    return SimpleNamespace(manifest=str(tmp_path / "m.parquet"), storage=str(tmp_path), **kw)


def _ladder(tmp_path, **kw):  # the 3-size ladder on 4 A100 per run
    return load_plan("ladder", _opts(tmp_path, site="polaris", **kw))


def _ladder_xl(tmp_path, **kw):  # the 4-size ladder (to 3B) on 12 Max 1550 tiles per run
    return load_plan("ladder-xl", _opts(tmp_path, site="aurora", **kw))


def test_ladder_presets_default_to_mup_and_say_the_lr_is_not_transferred(tmp_path):
    plan = _ladder(tmp_path)
    assert {s.parametrization for s in plan.specs} == {"mup"}
    assert {s.mup_base_width for s in plan.specs} == {96}  # 51M's width: muP equals SP there
    assert {s.lr for s in plan.specs} == {5e-4}
    assert "NOT transferred" in plan.extra["lr_source"] and plan.extra["lr_transferred"] is False


def test_sp_ladder_only_on_request_and_warns_of_bias(tmp_path):
    plan = _ladder_xl(tmp_path, parametrization="sp")
    assert {s.parametrization for s in plan.specs} == {"sp"}
    assert "biased" in plan.extra["lr_source"]
    with pytest.raises(ValueError, match="does not apply with --parametrization sp"):
        _ladder_xl(tmp_path, parametrization="sp", lr_from="x")


@pytest.mark.parametrize("ref", ["folder", "name", "file"])
def test_lr_from_a_mutransfer_study_sets_base_width_and_lr_of_every_size(tmp_path, ref):
    study = tmp_path / "mut51"
    path = _artifact().write(study / "report" / TRANSFER_FILE)
    given = {"folder": str(study), "name": "mut51", "file": str(path)}[ref]
    plan = _ladder_xl(tmp_path, lr_from=given)
    assert {s.size for s in plan.specs} == {"51M", "202M", "806M", "3B"}
    assert {(s.parametrization, s.mup_base_width, s.lr) for s in plan.specs} == {("mup", 48, 2.0 ** -9)}
    assert plan.extra["lr_transferred"] is True and "mut51" in plan.extra["lr_source"]


def test_dry_run_shows_parametrization_base_width_lr_and_source(tmp_path, capsys):
    _artifact().write(tmp_path / "mut51" / "report" / TRANSFER_FILE)
    (tmp_path / "m.parquet").write_bytes(b"")
    assert main(["--preset", "ladder", "--site", "polaris", "--manifest", str(tmp_path / "m.parquet"),
                 "--storage", str(tmp_path), "--lr-from", "mut51", "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("swift_v2-202M-mup"))
    assert row.split()[4:7] == ["mup", "48", "0.00195"]
    assert "LR: 0.00195 (95% 0.00148..0.00258) at muP base width 48, from µTransfer study 'mut51'" in out


def test_a_transfer_that_drifted_is_flagged(tmp_path):
    art = _artifact(slope=-0.8, slope_lo=-1.1, slope_hi=-0.5)
    assert not art.transfers and "may not transfer" in art.describe()


@pytest.mark.parametrize("kw,needle", [
    (dict(family="neuromamba", size="debug"), "trained family 'neuromamba'"),
    (dict(size="debug"), "not only in width"),
])
def test_lr_from_another_family_or_architecture_is_refused(tmp_path, kw, needle):
    _artifact(**kw).write(tmp_path / "m" / "report" / TRANSFER_FILE)
    with pytest.raises(ValueError, match=needle):
        _ladder(tmp_path, lr_from="m")


def test_missing_or_bad_artifact_exits_2_naming_where_it_looked(tmp_path, capsys):
    argv = ["--preset", "ladder", "--site", "polaris", "--manifest", "m.parquet", "--storage", str(tmp_path),
            "--dry-run"]
    assert main([*argv, "--lr-from", "nope"]) == 2
    assert "no µTransfer result found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_artifact().to_dict(), "base_lr": 1.0}))
    assert main([*argv, "--lr-from", str(bad)]) == 2
    assert "inside its interval" in capsys.readouterr().err


def test_artifact_round_trips_and_pools_log2_optima():
    art = _artifact()
    assert TransferredLR.from_dict(json.loads(json.dumps(art.to_dict()))) == art
    lr, lo, hi = pooled_base_lr([-7.0, -7.2, -6.8, -7.0])
    assert lr == pytest.approx(2.0 ** -7) and lo < lr < hi
    assert hi / lr == pytest.approx(lr / lo)  # symmetric in log2
