"""Fixtures of the analysis tests."""
from __future__ import annotations

import pytest

from _analysis_synth import make_store


@pytest.fixture
def synthetic_store(tmp_path):
    return make_store(tmp_path / "store")
