"""analysis imports none of data, neuro_models, study, ray (it reads only the results store)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_analysis_imports_no_forbidden_package():
    code = ("import sys, pkgutil, importlib, analysis\n"
            "for m in pkgutil.iter_modules(analysis.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('analysis.' + m.name)\n"
            "bad = sorted({n.split('.')[0] for n in sys.modules} & {'data', 'neuro_models', 'study', 'ray', 'wandb', 'torch'})\n"
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
