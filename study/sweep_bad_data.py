"""The Tune side of a study's bad-data policy (issue #28): a trial that fails on a bad subject file stops the study.

A run meets a bad subject file (truncated, a corrupt chunk, non-finite values) that the pre-flight check could not
see; it records the file in the study's quarantine list (:mod:`data.quarantine`, from
:class:`study.loop.PositionDataset`) and, under ``bad_data="stop"``, fails with :class:`study.loop.BadDataError`.
Every other trial would meet the same file and fail the same way, each after its own start-up, so
:class:`study.sweep.Progress` calls :func:`request_stop` on the first such failure (Tune's first attempt: it is not
retried) and :class:`BadDataStop`, the Tuner's stopper, stops the sweep: no new trial starts, running ones stop
gracefully (a rerun resumes them from their last checkpoint), and the later Tuners of the study end at once. The
runner then names the file(s) once, with the command that quarantines them (``--bad-data skip``).

Also: :data:`QUIET_TUNE_ENV`, what keeps Tune from printing each failed trial's traceback on the console (Tune
still writes it to the trial's ``error.txt``; the progress line points there).

In a ``study/sweep*`` module because it subclasses Tune's ``Stopper`` (only the launch and sweep modules import Ray).
"""
from __future__ import annotations

import logging

from ray.tune.stopper import Stopper

#: What keeps Tune 2.60's trial errors off the console (each stays in its trial's ``error.txt``):
#:
#: * ``TUNE_PRINT_ALL_TRIAL_ERRORS=0``: ``TuneController._trial_task_failure`` logs "Trial task failed for trial ..."
#:   with the whole traceback at ERROR on every failed attempt otherwise;
#: * ``RAY_AIR_NEW_OUTPUT=0``: the new output engine's reporter (``ray.tune.experimental.output``) prints a
#:   configuration box, "View detailed results here" and "Trial ... errored ... Error file: <Ray's temp dir>" whatever
#:   ``verbose`` is; the former reporter prints nothing at ``verbose=0`` (what ``study.sweep._tuner`` passes);
#: * ``RAY_IGNORE_UNHANDLED_ERRORS=1``: the driver logs "Unhandled error" with the traceback of a stopped trial's
#:   result that Tune never fetched (``ray._private.worker.raise_errors``).
QUIET_TUNE_ENV = {"TUNE_PRINT_ALL_TRIAL_ERRORS": "0", "RAY_AIR_NEW_OUTPUT": "0", "RAY_IGNORE_UNHANDLED_ERRORS": "1"}

# "Wrote the latest version of all result files and experiment state to ..." at the end of every Tuner.fit()
logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)

#: study name -> the first bad-data failure's cause, for the Tuners of this process (the stopper and the progress
#: callback share it by name: Tune may copy either)
_STOPPED: dict[str, str] = {}


def is_bad_data(cause: str) -> bool:
    """A trial's error line (:func:`study.sweep.error_cause`) says it failed on a bad subject file."""
    return "BadDataError" in (cause or "")


def request_stop(study: str, cause: str) -> bool:
    """Stop ``study``'s sweep; returns True the first time (the caller names the failure then)."""
    if study in _STOPPED:
        return False
    _STOPPED[study] = cause
    return True


def stopped(study: str) -> bool:
    return study in _STOPPED


def reset(study: str) -> None:
    """Forget a stop (each ``run_trials`` starts with none)."""
    _STOPPED.pop(study, None)


class BadDataStop(Stopper):
    """Stops every trial of the Tuner once :func:`request_stop` was called for ``study``."""

    def __init__(self, study: str) -> None:
        self.study = study

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return stopped(self.study)
