"""Bad data inside a study (issue #28): every subject file is verified before any trial starts, and a bad one
ends the study with one line naming it and what to do, exit code 2, no traceback, no Ray."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
VIEWS = [{"split": ("train", "val", "test"), "sequence_length": 8, "grid": (24, 24, 24)}]


@pytest.fixture
def cohort(tiny_cohort, tmp_path):
    """A private copy of the tiny cohort (12 subjects, 24^3 x 16 frames): its manifest and its rows."""
    dst = tmp_path / "cohort"
    shutil.copytree(Path(tiny_cohort).parent, dst)
    return dst / "manifest.parquet", pd.read_parquet(dst / "manifest.parquet")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_sound_cohort_passes_full_and_quick(cohort):
    from data.verify import verify

    manifest, df = cohort
    for depth in ("full", "quick", "auto"):
        r = verify(manifest, VIEWS, depth=depth)
        assert r.ok and r.files == len(df), r.problems
    assert verify(manifest, VIEWS).depth == "full"  # a small cohort is read in full by default


def test_each_kind_of_bad_file_is_named_once(cohort):
    from data.verify import verify

    manifest, df = cohort
    root = manifest.parent
    truncated, flipped, missing = (root / p for p in df.path[:3])
    _truncate(truncated)
    missing.unlink()
    import h5py

    with h5py.File(flipped, "r") as f:  # one byte inside the first chunk of BOLD data: the file still opens
        info = f["bold"].id.get_chunk_info(0)
        at = info.byte_offset + info.size // 2
    with open(flipped, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    r = verify(manifest, VIEWS, depth="full")
    by = {Path(p.path).name: p.what for p in r.problems}
    assert len(r.problems) == 3, r.problems
    assert "truncated or corrupt" in by[truncated.name]
    assert "does not exist" in by[missing.name]
    assert any(w in by[flipped.name] for w in ("content_sha256", "cannot decode")), by[flipped.name]


def test_manifest_disagreement_and_view_mismatch(cohort):
    from data.verify import verify

    manifest, df = cohort
    df = df.copy()
    df.loc[0, "n_frames"] = 99
    df.to_parquet(manifest, index=False)
    r = verify(manifest, [{"split": ("train", "val", "test"), "sequence_length": 20, "grid": (24, 24, 24)}])
    first = [p for p in r.problems if p.path.endswith(df.path[0])]
    assert first and "manifest says 99" in first[0].what and not first[0].structural
    short = [p for p in r.problems if p.structural]
    assert len(short) == len(df) - 1 and "shorter than one window" in short[0].what


def test_only_the_files_a_view_reads_are_checked(cohort):
    from data.verify import verify

    manifest, df = cohort
    bad = df[df.split == "val"].path.iloc[0]
    _truncate(manifest.parent / bad)
    assert verify(manifest, [{"split": "train", "sequence_length": 8}]).ok
    assert not verify(manifest, [{"split": "val", "sequence_length": 8}]).ok


def test_skip_policy_warns_instead(cohort, mamba_spec, capsys):
    from study.preflight import BadDataFiles, check_specs

    manifest, df = cohort
    bad = manifest.parent / df[df.split == "train"].path.iloc[0]
    _truncate(bad)
    spec = mamba_spec.replace(manifest=str(manifest))
    with pytest.raises(BadDataFiles) as err:
        check_specs([spec], str(manifest))
    assert str(err.value) == (f"{bad}: {str(err.value).split(': ', 1)[1].rsplit('; fix', 1)[0]}; "
                              f"fix or remove it from {manifest}, or rerun with --bad-data skip to quarantine it "
                              "and train without it")
    check_specs([spec.replace(bad_data="skip")], str(manifest))
    assert f"warning: {bad}: " in capsys.readouterr().err


def test_corrupt_file_in_a_smoke_study_ends_with_one_line(tmp_path):
    """The issue's scenario through the real entry point: the preset's cached synthetic cohort has one truncated
    train file; the study stops before Ray starts, naming the file, with exit code 2."""
    from study.plans import load_plan
    from study.runner import ensure_cohort

    storage = tmp_path / "studies"
    manifest = Path(ensure_cohort(load_plan("smoke"), storage))
    df = pd.read_parquet(manifest)
    bad = manifest.parent / df[df.split == "train"].path.iloc[0]
    _truncate(bad)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "study/scaling_law.py", "--preset", "smoke", "--storage", str(storage),
                        "--study-name", "demo-corrupt"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - t0
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"error: {bad}: not a readable HDF5 file"), r.stderr
    assert lines[0].endswith(f"; fix or remove it from {manifest}, or rerun with --bad-data skip to quarantine it "
                             "and train without it")
    assert not (storage / "demo-corrupt" / "store").exists()  # nothing trained, no report
    assert wall < 60, wall


def test_a_cohort_without_validation_subjects_is_refused(cohort, mamba_spec):
    """It used to train to "finished" with val_loss NaN."""
    from study.preflight import BadDataFiles, check_specs

    manifest, df = cohort
    df = df.copy()
    df.loc[df.split == "val", "split"] = "train"
    df.to_parquet(manifest, index=False)
    with pytest.raises(BadDataFiles, match=r"the runs read the 'val' split\(s\), which select no subject file"):
        check_specs([mamba_spec.replace(manifest=str(manifest))], str(manifest))
