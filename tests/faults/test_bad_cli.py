"""Bad configs and specs across the command lines: a clear message and a non-zero exit before any compute.

One table drives two tests: the CLIs' ``main(argv)`` in-process (default run, fast) and the same rows as
real ``python -m ...`` subprocesses (``faults`` marker: one interpreter start per row). A row whose CLI
currently gets it wrong is a strict ``xfail`` naming the bug (it turns red once fixed, so it is removed).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (module, argv with {t} = a fresh temp dir, expected exit code, text the message must contain)
CASES = [
    ("study.scaling_law", ["--preset", "nope"], 2, "unknown preset"),
    ("study.scaling_law", ["--preset", "smoke", "--manifest", "{t}/none.parquet", "--storage", "{t}/s",
                           "--no-report"], 2, "none.parquet does not exist"),
    ("study.scaling_law", ["--preset", "nomod_xyz:fn", "--storage", "{t}/s"], 2, "cannot import fn from nomod_xyz"),
    ("study.scaling_law", ["--preset", "smoke", "--lr-search", "many"], 2, "--lr-search: invalid int value"),
    ("study.scaling_law", ["--preset", "smoke", "--storage", "/proc/neurox-ro"], 2, "not writable"),
    ("study.finetune", ["--tasks", "trait_cont:bogus", "--storage", "{t}/f"], 2, "'classification', 'regression'"),
    ("study.finetune", ["--spec-json", "{{not json", "--storage", "{t}/f"], 2, "Expecting property name"),
    ("study.finetune", ["--spec-json", "[1, 2]", "--storage", "{t}/f"], 2, "must be a JSON object"),
    ("study.finetune", ["--strategies", "nope", "--storage", "{t}/f"], 2, "invalid choice: 'nope'"),
    ("study.finetune", ["--quick", "--manifest", "{t}/none.parquet", "--strategies", "scratch",
                        "--storage", "{t}/f"], 2, "none.parquet does not exist"),
    pytest.param("study.finetune", ["--quick", "--spec-json", '{{"family": "nope"}}', "--strategies", "scratch",
                                    "--storage", "{t}/f"], 2, "family",
                 marks=pytest.mark.slow),  # makes a cohort first
    ("study.launch_local", ["--spec", "{t}/missing.json", "--run-dir", "{t}/r"], 2, "cannot read run spec"),
    ("study.launch_local", ["--spec", "{t}/kind.json", "--run-dir", "{t}/r"], 2,
     "budget_kind='bogus' is not allowed; choose one of ['steps', 'samples', 'tokens', 'flops']"),
    ("study.launch_local", ["--spec", "{t}/garbage.json", "--run-dir", "{t}/r"], 2, "cannot read run spec"),
    ("study.launch_local", ["--spec", "{t}/family.json", "--run-dir", "{t}/r"], 2, "family='nope'"),
    ("study.launch_local", ["--spec", "{t}/kind.json", "--run-dir", "{t}/r", "--device", "tpu"], 2,
     "invalid choice: 'tpu'"),
    ("analysis.cli", ["fit", "power", "{t}/missing.csv", "--x", "x", "--loss", "loss"], 2, "no such file"),
    ("analysis.cli", ["fit", "power", "{t}/pts.csv", "--x", "nocol", "--loss", "loss"], 2, "column 'nocol' not found"),
    ("analysis.cli", ["fit", "power", "{t}/pts.csv", "--x", "x", "--loss", "loss"], 2, "needs at least 4 points"),
    ("analysis.cli", ["fit", "cubic", "{t}/pts.csv", "--loss", "loss"], 2, "invalid choice: 'cubic'"),
    ("data.convert", ["legacy", "{t}/nowhere", "--tr", "0.8", "--out", "{t}/d"], 2, "no 'img/' folder"),
    ("data.convert", ["nifti", "{t}/missing.nii.gz", "--out", "{t}/d", "--no-progress"], 1,
     "missing.nii.gz"),  # per-subject failures are recorded and exit 1 (data/convert.py's documented policy)
    ("data.convert", ["nifti", "{t}/x.nii.gz", "--out", "{t}/d", "--codec", "zip"], 2, "invalid choice: 'zip'"),
]


def _inputs(t: Path) -> None:
    (t / "kind.json").write_text(json.dumps({"budget_kind": "bogus"}))
    (t / "family.json").write_text(json.dumps({"family": "nope"}))
    (t / "garbage.json").write_text("{\"family\": ")
    (t / "pts.csv").write_text("x,loss\n1,2\n2,1\n")


def _argv(argv, t: Path) -> list[str]:
    return [a.format(t=t) for a in argv]


def _no_compute(t: Path) -> None:
    """Nothing was trained: no checkpoint, no result row, no converted subject, no cohort generated."""
    made = [p for p in t.rglob("*") if p.name.startswith(("step_", "part-")) or p.suffix in (".h5", ".pt")
            or p.name == "manifest.parquet"]
    assert made == [], made


@pytest.mark.parametrize("module,argv,code,needle", CASES)
def test_bad_input_in_process(module, argv, code, needle, tmp_path):
    _inputs(tmp_path)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = importlib.import_module(module).main(_argv(argv, tmp_path))
        except SystemExit as exc:  # argparse
            rc = exc.code
    assert rc == code, (rc, err.getvalue()[-500:])
    assert needle in err.getvalue() + out.getvalue()
    _no_compute(tmp_path)


@pytest.mark.faults
@pytest.mark.parametrize("module,argv,code,needle", CASES)
def test_bad_input_subprocess(module, argv, code, needle, tmp_path):
    _inputs(tmp_path)
    mod = "analysis" if module == "analysis.cli" else module
    r = subprocess.run([sys.executable, "-m", mod, *_argv(argv, tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == code, (r.returncode, r.stderr[-800:])
    assert needle in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    _no_compute(tmp_path)
