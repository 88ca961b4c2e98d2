"""Fixtures for the training-engine and study tests: one tiny synthetic cohort per session."""
from __future__ import annotations

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
