"""Shared pytest configuration: CPU-friendly defaults and marker handling."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always installed
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """12 subjects, 24^3 x 16 frames, three cohorts: manifest path (str). Shared by every test folder."""
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    return str(generate_cohort(root, n_subjects=12, grid=(24, 24, 24), n_frames=16, seed=0, progress=False))


@pytest.fixture
def mamba_spec(tiny_cohort):
    """A fast NeuroMamba debug pre-training spec on ``tiny_cohort`` (6 steps, fp32, CPU)."""
    from study.spec import RunSpec

    return RunSpec(family="neuromamba", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4,
                   budget=6, eval_every=3, eval_windows=4, manifest=tiny_cohort, precision="fp32", log_every=1)
