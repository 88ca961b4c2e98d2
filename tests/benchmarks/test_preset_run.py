"""benchmarks/preset_run.py: the ladder preset's run, shortened and re-planned for one device, and its rate read
back from the study's store rows."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_plan_is_the_presets_run_shortened_and_planned_for_one_device(monkeypatch):
    from benchmarks.preset_run import ladder_run
    from study.plans import ladder

    monkeypatch.setenv("NEUROX_PRESET_STEPS", "120")
    opts = SimpleNamespace(manifest="cohort/manifest.parquet", device_kind="h100-80gb", cpus_per_device=8,
                           study_name="p51", lr_from=None, parametrization=None)
    plan = ladder_run(opts)
    preset = ladder(SimpleNamespace(manifest=opts.manifest, site="polaris", study_name="p51"))
    (spec,) = plan.specs
    first = next(s for s in preset.specs if s.size == "51M")
    assert (spec.size, spec.batch_size, spec.parametrization, spec.lr) == \
        ("51M", first.batch_size, first.parametrization, first.lr)  # the preset's global batch (32 on Polaris)
    assert (spec.budget_kind, spec.budget, spec.n_subjects, spec.eval_every) == ("steps", 120.0, None, 30)
    rp = plan.run_plans[spec.run_id]
    assert (rp.device_kind, rp.workers, rp.micro_batch, rp.accumulation) == ("h100-80gb", 1, 32, 1)
    assert plan.num_workers == 1 and "h100-80gb" in plan.extra["hardware"]


def test_rate_from_store_rows(tmp_path):
    from analysis.store import ResultsStore

    store = ResultsStore(tmp_path / "st" / "p51" / "store")
    rows = [{"run_id": "r", "step": 30 * (i + 1), "samples_per_s": v, "train_loss": 1.0 / (i + 1)}
            for i, v in enumerate([100.0, 300.0, 310.0, 320.0, 330.0])]
    store.append("train", rows)
    out = tmp_path / "rate.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/preset_run.py"), "--storage", str(tmp_path / "st"),
                        "--study-name", "p51", "--skip", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["samples_per_s"] == pytest.approx(315.0) and res["steps"] == 150 and res["rows"] == 5
    assert res["train_loss"] == pytest.approx(0.2)
