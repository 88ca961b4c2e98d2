"""Run a check script of this folder in a subprocess under the Triton interpreter (``TRITON_INTERPRET=1`` must be
set before Triton decorates a kernel, so not inside the shared pytest process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_check(script: str, case: str) -> None:
    """``python <this folder>/<script> <case>`` with the interpreter on; it must exit 0 and print ``ok`` last."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), case], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
