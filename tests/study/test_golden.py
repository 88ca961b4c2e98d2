"""Golden numbers: the first 20 losses of a debug SwiFT v2 run (fp32, CPU), checked in.

Plain python (the 2-rank global batch by gradient accumulation, same sample order) and ``torchrun`` with
2 gloo ranks must reproduce them within 1e-5 relative; the Ray Train launcher is held to the same
numbers by ``test_ray_train.py``. Regenerate only for an intended change of the model, data generator
or engine, with ``python tests/study/test_golden.py`` (and say why in the commit).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_swift_debug.json")
REL = 1e-5


def golden_spec(manifest: str):
    from study.spec import RunSpec

    return RunSpec(family="swift_v2", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4,
                   micro_batch_size=2, budget=20, eval_every=20, eval_windows=4, lr=1e-3, warmup_frac=0.1,
                   precision="fp32", manifest=manifest, log_every=1, seed=0)


def python_losses(manifest: str) -> list[float]:
    from study.devices import local_context
    from study.reporters import MemoryReporter
    from study.train import train

    rep = MemoryReporter()
    train(golden_spec(manifest), local_context("cpu"), rep)
    return [r["train_loss"] for r in rep.logs]


def test_plain_python_reproduces_golden_losses(tiny_cohort):
    want = json.loads(GOLDEN.read_text())["losses"]
    got = python_losses(tiny_cohort)
    assert len(got) == 20
    assert got == pytest.approx(want, rel=REL)


def test_torchrun_two_ranks_reproduces_golden_losses(tiny_cohort, tmp_path, torchrun_losses):
    want = json.loads(GOLDEN.read_text())["losses"]
    got = torchrun_losses(golden_spec(tiny_cohort).replace(micro_batch_size=None), tmp_path / "tr")
    assert got == pytest.approx(want, rel=REL)


if __name__ == "__main__":  # regenerate
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import tempfile

    from data.synthetic import generate_cohort

    with tempfile.TemporaryDirectory() as d:
        m = str(generate_cohort(d, n_subjects=12, grid=(24, 24, 24), n_frames=16, seed=0, progress=False))
        losses = python_losses(m)
    GOLDEN.write_text(json.dumps({"spec": "tests/study/test_golden.py:golden_spec", "losses": losses}, indent=1))
    print(losses)
