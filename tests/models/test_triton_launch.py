"""The launch-configuration choice shared by the hand-written Triton kernels (``swift.kernels.triton_launch``)."""
from __future__ import annotations

import time

import pytest

from neuro_models.swift.kernels.triton_launch import fastest, tuned


def _make_run(cfg: dict):
    if cfg["fail"]:
        raise RuntimeError("out of shared memory")  # a configuration this card cannot run

    def run() -> None:
        time.sleep(cfg["s"])
    return run


def test_fastest_skips_configurations_that_fail_and_keeps_every_time():
    configs = [dict(fail=True, s=0.0), dict(fail=False, s=0.02), dict(fail=False, s=0.0)]
    best, times = fastest(configs, _make_run, "test kernel")
    assert best is configs[2]
    assert set(times) == {str(configs[1]), str(configs[2])}
    assert times[str(configs[1])] >= 20.0 > times[str(configs[2])]


def test_fastest_names_the_kernel_when_nothing_runs():
    with pytest.raises(RuntimeError, match="no launch configuration of the test kernel ran"):
        fastest([dict(fail=True, s=0.0)], _make_run, "test kernel")


def test_tuned_caches_and_times_only_on_cuda():
    configs = [dict(fail=False, s=0.02), dict(fail=False, s=0.0)]
    calls = []
    cache, timings = {}, {}
    run = lambda cfg: calls.append(cfg)  # noqa: E731
    # off CUDA (the interpreter): the first configuration, nothing timed or cached
    assert tuned(cache, timings, "k", configs, run, "test kernel", "cpu") is configs[0]
    assert not calls and not cache and not timings
    cache["k"] = configs[1]  # a cached choice is returned without running anything, on any device
    assert tuned(cache, timings, "k", configs, run, "test kernel", "cuda") is configs[1] and not calls
