"""Storage filling up (ENOSPC on a real, small tmpfs) while a checkpoint or a result row is written.

What must hold: a clear error; the previous complete checkpoint intact and loadable; earlier rows
intact; nothing half-written that a resume would trust (no COMPLETE marker on a partial checkpoint,
no visible partial Parquet part). Each test mounts its own 8 MiB tmpfs (skipped without root).
"""
from __future__ import annotations

import errno
import os

import pandas as pd
import pytest
import torch

from analysis.store import ResultsStore
from study import checkpoint as ckpt
from study.devices import local_context
from study.reporters import MemoryReporter, MultiReporter, NullReporter, StoreReporter
from study.train import train

from faults_helpers import fill_disk  # noqa: E402  (tests/faults/faults_helpers.py)


class FillDiskAfterFirstReport(NullReporter):
    """Fault injector: right after the first evaluation row (and its checkpoint) fill the disk, leaving
    ``leave_bytes`` free so the next checkpoint starts writing and dies half way."""

    def __init__(self, disk, leave_bytes: int) -> None:
        self.disk, self.leave_bytes, self.free_after = disk, leave_bytes, None

    def report(self, metrics, checkpoint_dir=None) -> None:
        if self.free_after is None:
            _, self.free_after = fill_disk(self.disk, self.leave_bytes)


def test_checkpoint_save_hits_enospc(mamba_spec, small_disk):
    spec = mamba_spec.replace(checkpoint_every=3, keep_last=2)
    run_dir, store_dir = small_disk / "run", small_disk / "store"
    mem = MemoryReporter()
    filler = FillDiskAfterFirstReport(small_disk, leave_bytes=300_000)  # a checkpoint is ~620 kB
    reporter = MultiReporter([mem, StoreReporter(ResultsStore(store_dir), {"study": "faults"}), filler])
    with pytest.raises(ckpt.CheckpointError) as err:
        train(spec, local_context("cpu"), reporter, run_dir=run_dir)
    msg = str(err.value)
    # a clear error: which checkpoint, that the disk is full, and the previous good checkpoint
    assert "step_0000006" in msg and "No space left on device" in msg and "step_0000003" in msg
    assert isinstance(err.value.__cause__, (OSError, RuntimeError))
    assert filler.free_after is not None and filler.free_after <= 300_000

    good, partial = ckpt.step_dir(run_dir / "checkpoints", 3), ckpt.step_dir(run_dir / "checkpoints", 6)
    assert partial.exists() and not ckpt.is_complete(partial)  # the half-written one carries no marker
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") == good  # a resume picks the previous one
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_trainer_state(partial)
    # the earlier row is intact (exactly one, step 3, the loss the run reported)
    rows = ResultsStore(store_dir).read("train")
    assert list(rows["step"]) == [3]
    assert rows["train_loss"].iloc[0] == mem.reports[0]["train_loss"]

    # free the disk: resuming from the previous complete checkpoint finishes the run exactly like an
    # uninterrupted one (the partial step-6 directory is overwritten, never trusted)
    (small_disk / "ballast.bin").unlink()
    resumed = MemoryReporter()
    train(spec, local_context("cpu"), resumed, run_dir=run_dir, resume_from=good)
    ref = MemoryReporter()
    train(spec, local_context("cpu"), ref, run_dir=small_disk / "ref")
    assert [r["step"] for r in resumed.reports] == [6]
    assert resumed.reports[-1]["train_loss"] == pytest.approx(ref.reports[-1]["train_loss"], rel=1e-6)
    assert resumed.reports[-1]["val_loss"] == pytest.approx(ref.reports[-1]["val_loss"], rel=1e-6)
    assert ckpt.is_complete(partial)
    sd = torch.load(partial / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_result_append_hits_enospc(small_disk):
    store = ResultsStore(small_disk / "store")
    rows = [{"run_id": f"r{i}", "step": s, "train_loss": 1.0 / (s + 1), "note": "x" * 200}
            for i in range(5) for s in range(4)]
    store.append("train", rows)
    before = store.read("train", internal=True)
    parts_before = store.parts("train")
    fill_disk(small_disk, leave_bytes=0)
    big = [{"run_id": "big", "step": s, "train_loss": float(s), "blob": os.urandom(512).hex()} for s in range(2000)]
    with pytest.raises(OSError) as err:
        store.append("train", big)
    assert err.value.errno == errno.ENOSPC or "No space left" in str(err.value)
    # earlier rows intact, no new part visible, no temp file left behind
    assert store.parts("train") == parts_before
    pd.testing.assert_frame_equal(store.read("train", internal=True), before)
    assert sorted(p.name for p in (small_disk / "store" / "train").iterdir()) == [p.name for p in parts_before]
    # pandas over the directory (the one-line reader) sees only the committed rows
    assert len(pd.read_parquet(small_disk / "store" / "train")) == len(rows)
    # once space is back the same append goes through
    (small_disk / "ballast.bin").unlink()
    assert store.append("train", big) == 2000
    assert len(store.read("train")) == len(rows) + 2000
