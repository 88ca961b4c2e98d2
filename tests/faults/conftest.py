"""Fixtures of the fault-injection suite: a small tmpfs "disk" (``tiny_cohort`` / ``mamba_spec`` come
from ``tests/conftest.py``)."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest


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
