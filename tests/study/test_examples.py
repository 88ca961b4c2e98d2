"""examples/debug_run.json is a valid run spec whose manifest is the smoke preset's cohort, and it trains through
``python -m study.launch_local`` (issue #28: a runnable spec for launch_local and torchrun)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "examples" / "debug_run.json"


def test_example_spec_is_valid_and_points_at_the_smoke_cohort(tmp_path):
    from study.plans import load_plan
    from study.runner import ensure_cohort
    from study.spec import RunSpec

    spec = RunSpec.from_json(SPEC.read_text())
    storage = tmp_path / "studies"
    made = Path(ensure_cohort(load_plan("smoke"), storage))
    assert Path("studies") / made.relative_to(storage) == Path(spec.manifest)


@pytest.mark.slow
def test_example_spec_trains_through_launch_local(tmp_path, tiny_cohort):
    spec = json.loads(SPEC.read_text())
    spec.update(manifest=tiny_cohort, budget=4, eval_every=2, checkpoint_every=2)
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-m", "study.launch_local", "--spec", str(f), "--run-dir",
                        str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["status"] == "finished" and last["step"] == 4
