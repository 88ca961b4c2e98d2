"""Fixtures of the security suite (tests/security): see sec_helpers.py and SECURITY.md."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sec_helpers import ATTACKER, second_uid_unavailable, shared_tmp  # noqa: E402

_reason = second_uid_unavailable()


@pytest.fixture
def attacker() -> int:
    """The uid of another local user on the same node (skips with the reason when there cannot be one)."""
    if _reason:
        pytest.skip(f"second uid: {_reason}")
    return ATTACKER


@pytest.fixture
def shared(tmp_path) -> Path:
    """A fresh world-writable sticky directory standing for the node's /tmp (or a shared --stage-to)."""
    d = shared_tmp()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
