"""Fixtures of the fault-injection suite: a tiny cohort, a fast NeuroMamba spec, a small tmpfs "disk".

``tiny_cohort`` / ``mamba_spec`` mirror ``tests/study/conftest.py`` (conftest fixtures are not shared
across sibling test folders).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """12 subjects, 24^3 x 16 frames, three cohorts: manifest path (str)."""
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    return str(generate_cohort(root, n_subjects=12, grid=(24, 24, 24), n_frames=16, seed=0, progress=False))


@pytest.fixture
def mamba_spec(tiny_cohort):
    from study.spec import RunSpec

    return RunSpec(family="neuromamba", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4,
                   budget=6, eval_every=3, eval_windows=4, manifest=tiny_cohort, precision="fp32", log_every=1)


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: cannot create a small tmpfs to fill")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"neurox-faults-{uuid.uuid4().hex[:6]}",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A freshly mounted 8 MiB tmpfs (a disk that can really fill up); unmounted afterwards."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "8m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
