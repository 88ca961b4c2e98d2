"""The run's own errors survive the trip from a Ray worker to the driver (pickling) with their message
and fields: otherwise Ray reports a TypeError / "worker health check failed" and the step, file or
checkpoint the message names is lost (found by test_divergence_in_study)."""
from __future__ import annotations

import pickle

import pytest

from study.checkpoint import CheckpointError
from study.train import BadDataError, TrainingDiverged


@pytest.mark.parametrize("exc", [
    TrainingDiverged(7, float("inf"), "/runs/r/checkpoints/step_0000006"),
    TrainingDiverged(3, float("nan"), None),
    BadDataError("subject file /data/sub-07.h5 is truncated (window 4)"),
    CheckpointError("saving checkpoint /c/step_0000006 failed (No space left on device)"),
])
def test_run_errors_pickle_round_trip(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, TrainingDiverged):
        assert (back.step, back.last_good) == (exc.step, exc.last_good)
        assert f"at step {exc.step}" in str(back) and str(exc.last_good or "none") in str(back)
