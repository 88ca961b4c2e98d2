"""Fixtures for the training-engine and study tests (``tiny_cohort`` / ``mamba_spec``: tests/conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _torchrun_losses(spec, run_dir: Path, nproc: int = 2) -> list[float]:
    """Run ``spec`` under ``torchrun --standalone`` with ``nproc`` gloo ranks; rank 0's logged losses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(spec.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "study.launch_local", "--spec", str(spec_file), "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if r["kind"] == "log"]


@pytest.fixture
def torchrun_losses():
    return _torchrun_losses


