"""study.loop.PinnedBatches: the loader's multi-threaded pinning stage (order, copies, errors, shutdown).

On this CPU box the copies go to ordinary memory (``pin=False``); the pinned path runs on a GPU through
``make_loader`` (benchmarks/loader_rate.py)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from study.loop import PIN_PARALLEL_BYTES, PinnedBatches


def _batches(n: int, *, fail_at: int | None = None, closed: threading.Event | None = None):
    g = torch.Generator().manual_seed(0)
    try:
        for i in range(n):
            if i == fail_at:
                raise RuntimeError(f"worker failed at batch {i}")
            big = torch.randn(6, PIN_PARALLEL_BYTES // (6 * 4) + 1000, generator=g)  # sliced over the threads
            yield {"x": big, "mask": torch.arange(5) + i, "subject": [f"s{i}"], "i": i}
    finally:
        if closed is not None:
            closed.set()


def test_batches_come_in_order_as_equal_copies():
    ref = list(_batches(5))
    got = list(PinnedBatches(_batches(5), threads=3, pin=False))
    assert [b["i"] for b in got] == list(range(5))
    for a, b in zip(got, ref):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["mask"], b["mask"]) and a["subject"] == b["subject"]
        assert a["x"].untyped_storage().data_ptr() != b["x"].untyped_storage().data_ptr()  # a copy, not the source


def test_an_error_in_the_source_is_raised_in_order():
    it = PinnedBatches(_batches(5, fail_at=2), threads=2, pin=False)
    assert [next(it)["i"], next(it)["i"]] == [0, 1]
    with pytest.raises(RuntimeError, match="worker failed at batch 2"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_stopping_early_releases_the_source(how):
    closed = threading.Event()
    it = PinnedBatches(_batches(100, closed=closed), threads=2, depth=2, pin=False)
    assert next(it)["i"] == 0
    if how == "close":
        it.close()
    else:
        del it
    assert closed.wait(10), "the source was not released (a DataLoader's workers would live on)"


def test_a_dataloader_with_workers_through_the_pinning_stage():
    ds = [torch.full((3, 4), float(i)) for i in range(10)]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         collate_fn=lambda items: {"x": torch.stack(items)})
    got = [b["x"][:, 0, 0].tolist() for b in PinnedBatches(iter(loader), threads=2, pin=False)]
    assert got == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
