"""The loader's crop batches (PositionDataset.__getitems__ over a deferred dataset on a grid): each window's brain-box
crop is decoded straight into one micro-batch buffer and padded on the device, bit-identical to the padded items."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.datasets import WindowedDataset
from data.manifest import Manifest
from data.subject_file import write_subject
from data.transforms import finish_on_device
from study.loop import BadDataError, PositionDataset, SampleOrder, collate

GRID = (16, 15, 14)
#: brain boxes of different shapes, so a micro-batch's box is larger than some of its crops
BOXES = [(slice(2, 13), slice(1, 9), slice(2, 11)), (slice(3, 9), slice(2, 14), slice(1, 6)),
         (slice(1, 14), slice(4, 11), slice(3, 12))]


def _cohort(tmp_path, n_frames=12):
    rng = np.random.default_rng(0)
    recs = []
    for i, box in enumerate(BOXES):
        mask = np.zeros(GRID, dtype=bool)
        mask[box] = True
        mask[box[0].start, box[1].start, box[2].start] = False  # background inside the crop too
        bold = np.zeros(GRID + (n_frames,))
        bold[mask] = 800.0 + 25.0 * rng.standard_normal((int(mask.sum()), n_frames))
        p = tmp_path / f"s{i}.h5"
        info = write_subject(p, bold, mask, tr=1.0, subject=f"s{i}", cohort="c")
        recs.append(dict(subject=f"s{i}", cohort="c", path=p.name, n_frames=n_frames, tr=1.0,
                         content_sha256=info.content_sha256, split="train"))
    m = Manifest.from_records(recs, path=tmp_path / "manifest.parquet")
    m.save()
    return m


def _masks(position: int) -> torch.Tensor:
    return torch.tensor([position % 3 == 0, position % 2 == 0])


def _positions_ds(m, **kw):
    ds = WindowedDataset(m, sequence_length=4, grid=GRID, defer=True, scaling="znorm_minback", **kw)
    return PositionDataset(ds, SampleOrder(len(ds), 7), masks=_masks)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def test_crop_batch_ships_crops_and_finishes_bit_identical(tmp_path):
    pds = _positions_ds(_cohort(tmp_path))
    assert pds.ds.batches_crops and len(pds.ds) == 9
    positions = list(range(9))
    items = pds.__getitems__(positions)
    batch = collate(items)
    crops = [pds.ds.crop_shape(pds.order.index(p)) for p in positions]
    box = tuple(max(c[d] for c in crops) for d in range(3))
    # what travels is the micro-batch's brain box, not the padded grid, and collate does not copy it
    assert tuple(batch["x"].shape) == (9, 1, 4, *box) and box != GRID and batch["x"].dtype == torch.float16
    assert batch["x"].data_ptr() == items[0]["x_batch"].data_ptr()
    assert sorted(set(map(tuple, batch["crop_shape"].tolist()))) == sorted(set(crops)) and len(set(crops)) == 3
    ref = collate([pds[p] for p in positions])  # the per-item path: padded float16 grid windows
    assert tuple(ref["x"].shape) == (9, 1, 4, *GRID)
    _same(finish_on_device(batch, "cpu"), finish_on_device(ref, "cpu"))


def test_crop_batch_from_a_worker_equals_the_item_path(tmp_path):
    """In a loader worker the buffer is new shared memory: its padding must read as zeros."""
    pds = _positions_ds(_cohort(tmp_path))
    loader = torch.utils.data.DataLoader(pds, batch_sampler=[[0, 1, 2, 3], [4, 5, 6, 7, 8]], collate_fn=collate,
                                         num_workers=1)
    for positions, batch in zip([[0, 1, 2, 3], [4, 5, 6, 7, 8]], loader):
        assert "crop_shape" in batch
        _same(finish_on_device(batch, "cpu"), finish_on_device(collate([pds[p] for p in positions]), "cpu"))


def test_crop_batch_same_shapes_is_one_contiguous_read(tmp_path):
    """One subject: every crop fills the box (the 96^3 cohort's case: read straight into the slot)."""
    pds = _positions_ds(_cohort(tmp_path), max_subjects=1)
    batch = collate(pds.__getitems__([0, 1]))
    assert tuple(batch["x"].shape[3:]) == tuple(batch["crop_shape"][0].tolist())
    _same(finish_on_device(batch, "cpu"), finish_on_device(collate([pds[0], pds[1]]), "cpu"))


def test_other_datasets_and_bad_windows_take_the_item_path(tmp_path):
    m = _cohort(tmp_path)
    (tmp_path / "s1.h5").write_bytes(b"not an hdf5 file")  # before any handle opens it
    cpu = PositionDataset(WindowedDataset(m, sequence_length=4, grid=GRID), SampleOrder(9, 7))
    ok = [p for p in range(9) if not cpu.ds.window(cpu.order.index(p))[0].endswith("s1.h5")]
    assert not cpu.ds.batches_crops and "crop_shape" not in collate(cpu.__getitems__(ok[:2]))
    strided = WindowedDataset(m, sequence_length=2, stride_within=2, grid=GRID, defer=True)
    assert not strided.batches_crops
    pds = _positions_ds(m)
    bad = next(p for p in range(9) if pds.ds.window(pds.order.index(p))[0].endswith("s1.h5"))
    with pytest.raises(BadDataError, match=r"s1\.h5"):  # the policy's error (stop), naming the file
        pds.__getitems__([bad])


def test_reused_buffers_from_a_ring_equal_the_item_path(tmp_path):
    """Workers writing into a BufferRing's reused slots, released by PinnedBatches after each copy: every batch
    equals the per-item path, though slots are reused with other boxes (their padding must be zeroed again), and
    the workers never write a slot the consumer has not released."""
    from study.loop import BufferRing, PinnedBatches

    pds = _positions_ds(_cohort(tmp_path))
    batches = [[p % 9, (p + 4) % 9, (p + 7) % 9][: 1 + p % 3] for p in range(24)]  # boxes change batch to batch
    pds.ring = ring = BufferRing(workers=2, slots=2)
    loader = torch.utils.data.DataLoader(pds, batch_sampler=batches, collate_fn=collate, num_workers=2,
                                         prefetch_factor=1)
    got = list(PinnedBatches(iter(loader), threads=2, pin=False, ring=ring))
    assert len(got) == len(batches)
    for positions, batch in zip(batches, got):
        assert "buffer_slot" not in batch
        for b, (cx, cy, cz) in enumerate(batch["crop_shape"].tolist()):  # the padding reads zeros, as documented
            pad = torch.ones_like(batch["x"][b], dtype=torch.bool)
            pad[..., :cx, :cy, :cz] = False
            assert not batch["x"][b][pad].any()
        _same(finish_on_device(batch, "cpu"), finish_on_device(collate([pds[p] for p in positions]), "cpu"))
    assert int(ring.flags.sum()) == 0  # every slot released


def test_a_ring_slot_is_not_reused_before_release(tmp_path):
    """In a worker, a ring with one slot hands it out again only after the consumer releases it."""
    from study.loop import BufferRing

    pds = _positions_ds(_cohort(tmp_path))
    pds.ring = ring = BufferRing(workers=1, slots=1, wait_s=2.0)
    loader = iter(torch.utils.data.DataLoader(pds, batch_sampler=[[0, 1], [2, 3]], collate_fn=collate,
                                              num_workers=1, prefetch_factor=2))
    first = next(loader)
    assert first["buffer_slot"] == (0, 0) and int(ring.flags[0, 0]) == 1
    with pytest.raises(RuntimeError, match="no free batch buffer after 2 s"):
        next(loader)  # the worker waited for the unreleased slot, then said why
