"""The data package imports neither neuro_models, study, ray nor wandb (checked in a fresh interpreter)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_package_layering():
    code = ("import sys, data.subject_file, data.manifest, data.synthetic, data.datasets, data.transforms, "
            "data.convert, data.cli, data.testing\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('neuro_models', 'study', 'ray', 'wandb', "
            "'analysis'))\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
