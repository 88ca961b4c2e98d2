"""The study front door: pinned plans, dry run, bad input, a real study on embedded Ray, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.plans import load_plan, run_summary
from study.scaling_law import main

REPO = Path(__file__).resolve().parents[2]

#: The demo plan, pinned: (run id, steps). A change here changes every user's default study.
DEMO_PINNED = [
    ('swift_v2-debug-w48-sp-F1.54e12-a87c580813', 1082),
    ('swift_v2-debug-w64-sp-F1.54e12-f5dbff542a', 641),
    ('swift_v2-debug-w48-sp-F7.68e11-37ec6c7ef0', 541),
    ('swift_v2-debug-w64-sp-F7.68e11-69fb4ca7d6', 321),
    ('swift_v2-debug-w32-sp-F3.84e11-75b8c4adf2', 553),
    ('swift_v2-debug-w48-sp-F3.84e11-dbf9aa1d5f', 271),
    ('swift_v2-debug-w16-sp-F1.92e11-1bc6c275d4', 866),
    ('swift_v2-debug-w32-sp-F1.92e11-ea61bc54e1', 277),
    ('swift_v2-debug-w16-sp-F9.6e10-0fc201a64a', 433),
    ('swift_v2-debug-w16-sp-F4.8e10-d8da885e5e', 217),
    ('swift_v2-debug-w32-sp-F1.92e11-f4a51dc9a7', 277),
]


def test_demo_plan_is_pinned():
    plan = load_plan("demo")
    got = [(s.run_id, run_summary(s)["steps"]) for s in plan.specs]
    assert got == DEMO_PINNED
    budgets = sorted({s.budget for s in plan.specs})
    assert len(budgets) == 6  # IsoFLOP design, budgets x2 apart; every width at 2-3 budgets
    assert sum(1 for s in plan.specs if s.cohorts) == 1  # the data-mixture axis
    # width rules (study/plans.py DEMO_*): LR ~ 1/width, decoder as wide as the encoder, a cohort with texture
    assert {(s.width, s.lr) for s in plan.specs} == {(16, 0.02), (32, 0.01), (48, 0.02 / 3), (64, 0.005)}
    assert all(dict(s.model_overrides)["decoder_dim"] == s.width for s in plan.specs)
    assert plan.cohort["texture"] > 0


def test_dry_run_prints_runs_flops_gpu_hours_and_fit(capsys, tmp_path):
    assert main(["--preset", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert DEMO_PINNED[0][0] in out and "CPU" in out  # a CPU plan predicts no GPU memory or hours
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"")
    assert main(["--preset", "ladder", "--site", "polaris", "--manifest", str(manifest), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours on a100-40gb" in out and " yes " in out and " NO " not in out
    assert "planned for site polaris: 4 x a100-40gb per run" in out


def test_ladder_presets_replicate_small_models_and_partition_large_ones(tmp_path):
    """51M/202M train with ZeRO-0 (ZeRO-1's hooks cost a 51M step 27%), 806M and 3B with ZeRO-1, and the planner's
    predicted peak of every run (state + activations + overhead) fits the site's device with its margin."""
    from types import SimpleNamespace

    from study.planner import MEMORY_MARGIN
    from study.plans import load_plan

    plan = load_plan("ladder-xl", SimpleNamespace(manifest=str(tmp_path / "m.parquet"), site="aurora"))
    stages = {s.size: s.zero_stage for s in plan.specs}
    assert stages == {"51M": 0, "202M": 0, "806M": 1, "3B": 1}
    assert all(s.distributed == "deepspeed" for s in plan.specs)
    assert plan.device_kind == "max1550-tile"
    assert all(p.fits and p.predicted_peak_gib <= 64 * MEMORY_MARGIN for p in plan.run_plans.values())


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "ladder", "--site", "polaris"], "--manifest"),
    (["--preset", "polaris"], "preset 'polaris' is now --preset ladder --site polaris"),  # site names are gone
    (["--preset", "aurora", "--manifest", "m.parquet"], "preset 'aurora' is now --preset ladder-xl --site aurora"),
    (["--preset", "smoke", "--storage", "/proc/neurox-not-writable"], "not writable"),
])
def test_bad_input_exits_2_before_any_trial(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_budget_no_size_can_spend_is_rejected():
    from study.plans import isoflop_grid
    from study.spec import RunSpec

    base = RunSpec(size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4)
    with pytest.raises(ValueError, match="cannot be spent by any width"):
        isoflop_grid(base, budgets=[1e3], widths=[16, 32], min_steps=4)


def _store_rows(storage: Path, study: str = "smoke"):
    from analysis.store import read_table

    return read_table(storage / study / "store", "train")


def _raw_keys(storage: Path, study: str = "smoke"):
    import pandas as pd

    parts = sorted((storage / study / "store" / "train").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p, columns=["run_id", "step"]) for p in parts])


@pytest.mark.ray
def test_unreachable_ray_address_exits_2(tmp_path, capsys):
    rc = main(["--preset", "smoke", "--storage", str(tmp_path), "--address", "127.0.0.1:1", "--no-report"])
    assert rc == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_study_killed_midway_resumes_without_loss_or_duplicates(tmp_path):
    """Run the smoke study in a subprocess, SIGKILL the driver once the first row lands, rerun it."""
    cmd = [sys.executable, "study/scaling_law.py", "--preset", "smoke", "--storage", str(tmp_path),
           "--num-cpus", "2", "--max-concurrent", "1", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = tmp_path / "smoke" / "store" / "train"
    t0 = time.time()
    while time.time() - t0 < 300 and not (store.exists() and any(store.glob("part-*.parquet"))):
        time.sleep(0.5)
    assert store.exists(), "no result row appeared within 300 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _store_rows(tmp_path)
    assert 1 <= len(before) < 4
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    after = _store_rows(tmp_path)
    assert sorted(zip(after["run_id"], after["step"])) == sorted(
        (rid, s) for rid in set(after["run_id"]) for s in (3, 6))
    assert len(after) == 4 and after["is_final"].sum() == 2
    # rows written before the kill are unchanged (the interrupted run resumed, it did not restart)
    for _, r in before.iterrows():
        a = after[(after.run_id == r.run_id) & (after.step == r.step)].iloc[0]
        assert a.train_loss == pytest.approx(r.train_loss, rel=1e-6)


@pytest.mark.ray
def test_small_study_on_embedded_ray_writes_rows_and_reruns_as_noop(tmp_path, capsys):
    argv = ["--preset", "smoke", "--storage", str(tmp_path), "--num-cpus", "2", "--no-report"]
    assert main(argv) == 0
    rows = _store_rows(tmp_path)
    assert len(rows) == 4 and set(rows["step"]) == {3, 6}
    assert rows["run_id"].nunique() == 2 and rows["is_final"].sum() == 2
    for col in ("flops", "tokens_seen", "n_params", "val_loss", "code_commit", "package_versions",
                "data_manifest_hash", "spec.lr"):
        assert rows[col].notna().all(), col
    n_parts = len(_raw_keys(tmp_path))
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert len(_raw_keys(tmp_path)) == n_parts  # nothing re-emitted
    assert len(_store_rows(tmp_path)) == 4
