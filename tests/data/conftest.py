"""Fixtures of the data tests: a small synthetic cohort generated once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """12 subjects, 3 cohorts, grid (24, 26, 22), 30 frames; returns the manifest path."""
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    return generate_cohort(root, n_subjects=12, grid=(24, 26, 22), n_frames=30, seed=3, progress=False)
