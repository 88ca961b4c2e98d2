"""Bad data met mid-training: a subject file truncated after the manifest was written, NaNs in a window."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from study.devices import local_context
from study.reporters import MemoryReporter
from study.train import BadDataError, train


@pytest.fixture
def damaged_cohort(tiny_cohort, tmp_path):
    """A copy of the tiny cohort whose train subject files of cohort_c are truncated to half."""
    from data.manifest import Manifest

    src = Path(tiny_cohort).parent
    dst = tmp_path / "cohort"
    shutil.copytree(src, dst)
    df = Manifest.load(dst / "manifest.parquet").df
    bad = df[(df.split == "train") & (df.cohort == "cohort_c")]
    assert len(bad) >= 1
    for rel in bad.path:
        f = dst / rel
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return str(dst / "manifest.parquet"), [str(p) for p in bad.path]


def test_truncated_file_stops_the_run_naming_the_file(mamba_spec, damaged_cohort):
    manifest, bad = damaged_cohort
    with pytest.raises(BadDataError) as err:
        train(mamba_spec.replace(manifest=manifest, budget=12), local_context("cpu"), MemoryReporter())
    assert any(Path(b).name in str(err.value) for b in bad)


def test_skip_policy_uses_next_window_and_records_the_bad_one(mamba_spec, damaged_cohort):
    manifest, bad = damaged_cohort
    rep = MemoryReporter()
    res = train(mamba_spec.replace(manifest=manifest, budget=12, bad_data="skip"), local_context("cpu"), rep)
    assert res.status == "finished"
    skipped = [r["bad_data_skipped"] for r in rep.logs if "bad_data_skipped" in r]
    assert skipped and all(any(Path(b).name in m for b in bad) for m in skipped)
    assert rep.reports[-1]["bad_windows_skipped"] == len(skipped)
    assert np.isfinite(rep.reports[-1]["val_loss"])
