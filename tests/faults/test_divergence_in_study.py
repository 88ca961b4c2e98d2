"""NaN / exploding loss inside a study: the diverging run stops naming its step and last good
checkpoint, the study counts the failed trial (driver output, exit status) and the other runs finish."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.faults]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.parametrize("launcher", ["inline", "ray-train"])
def test_exploding_run_fails_alone_and_is_recorded(tiny_cohort, tmp_path, launcher):
    from analysis.store import read_table

    sys.path.insert(0, str(HERE))
    from faults_plans import diverging

    good1, bad, good2 = diverging().specs
    cmd = [sys.executable, "study/scaling_law.py", "--preset", "faults_plans:diverging", "--study-name", "div",
           "--manifest", tiny_cohort, "--storage", str(tmp_path), "--num-cpus", "2", "--max-concurrent", "1",
           "--no-report", "--trial-launcher", launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.time() - t0
    text = out.stdout + out.stderr
    # the study goes on, then reports the failure: exit 1 (runs remain), the failed trial counted
    assert out.returncode == 1, text[-3000:]
    assert "1 trial(s) failed" in text
    # the console names the cause and what to do, once, instead of "rerun the same command"
    assert f"TrainingDiverged: non-finite loss nan at step 2" in out.stderr and bad.run_id in out.stderr
    assert "a run diverged: lower its LR" in out.stderr and "rerun the same command to retry them" not in text
    rows = read_table(tmp_path / "div" / "store", "train")
    finals = set(rows.loc[rows["is_final"].astype(bool), "run_id"])
    assert finals == {good1.run_id, good2.run_id}  # the other runs completed
    assert bad.run_id not in finals
    # the error Ray kept for the trial names the step and the last good checkpoint
    errors = [p.read_text(errors="replace") for p in (tmp_path / "div").rglob("error.txt")]
    blob = "\n".join(errors) + text
    assert "non-finite loss nan at step 2" in blob, blob[-3000:]
    # ... as a durable checkpoint in the study's storage, never a worker's deleted temporary directory: Ray
    # Train's persisted copy, or the inline trial's own run directory
    durable = {"ray-train": f"last good checkpoint: step_0000001 (persisted by Ray under {tmp_path}/div/runs/{bad.run_id}",
               "inline": f"last good checkpoint: {tmp_path}/div/runs/{bad.run_id}/inline/checkpoints/step_0000001"}
    assert durable[launcher] in blob
    assert "last good checkpoint: /tmp/neurox-" not in blob
    assert "health check failed" not in blob and "TypeError" not in blob
    attempts = blob.count("non-finite loss nan at step 2")
    print(f"\nFAULT divergence-in-study ({launcher}): 3 runs, 1 diverging; study took {elapsed:.0f} s; "
          f"error texts naming the divergence: {attempts}")
