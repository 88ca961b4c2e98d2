"""Contract tests every dataset implementation inherits (pytest collects the ``test_*`` methods).

Usage in a test module::

    class TestMyDataset(DatasetContract):
        def make_dataset(self):
            return MyDataset(...)

A dataset honours the contract when its items are dicts with ``x`` (float32 ``[1, X, Y, Z, T]`` at
``expected_shape``), ``brain_mask`` (bool ``[X, Y, Z]``), ``subject`` (str), ``cohort`` (str),
``start`` (int), ``y`` when the dataset has a target; indexing is deterministic, out-of-range raises
``IndexError``, the dataset pickles (loader workers, Ray Train) and ``DistributedSampler`` shards
cover every index.
"""
from __future__ import annotations

import pickle

import torch


class DatasetContract:
    """Mixin with the behaviour every NeuroX dataset must have; override :meth:`make_dataset`."""

    #: expected ``x`` shape ``(1, X, Y, Z, T)``, or None to skip the shape check
    expected_shape: tuple | None = None
    #: whether items carry ``y``
    has_target: bool = False

    def make_dataset(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _ds(self):
        if not hasattr(self, "_cached_ds"):
            type(self)._cached_ds = self.make_dataset()
        return self._cached_ds

    def test_contract_nonempty(self):
        assert len(self._ds()) > 0

    def test_contract_item_schema(self):
        ds = self._ds()
        for i in (0, len(ds) - 1):
            it = ds[i]
            x, m = it["x"], it["brain_mask"]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 5 and x.shape[0] == 1
            if self.expected_shape is not None:
                assert tuple(x.shape) == tuple(self.expected_shape)
            assert m.dtype == torch.bool and tuple(m.shape) == tuple(x.shape[1:4])
            assert m.any(), "an item without brain voxels"
            assert torch.isfinite(x).all()
            assert isinstance(it["subject"], str) and isinstance(it["cohort"], str)
            assert isinstance(it["start"], int) and it["start"] >= 0
            if self.has_target:
                assert it["y"].dtype == torch.float32 and it["y"].ndim == 0
            else:
                assert "y" not in it

    def test_contract_deterministic(self):
        ds = self._ds()
        a, b = ds[len(ds) // 2], ds[len(ds) // 2]
        assert torch.equal(a["x"], b["x"]) and a["subject"] == b["subject"] and a["start"] == b["start"]

    def test_contract_index_errors(self):
        ds = self._ds()
        try:
            ds[len(ds)]
        except IndexError:
            pass
        else:  # pragma: no cover - failure path
            raise AssertionError("indexing past the end must raise IndexError")
        assert torch.equal(ds[-1]["x"], ds[len(ds) - 1]["x"])

    def test_contract_pickles(self):
        ds = self._ds()
        ds[0]  # opens handles, which must not travel
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(clone[0]["x"], ds[0]["x"])

    def test_contract_distributed_sampler_covers_all(self):
        ds = self._ds()
        seen = []
        for rank in range(3):
            s = torch.utils.data.DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=5)
            seen += list(s)
        assert set(seen) == set(range(len(ds)))

    def test_contract_batches(self):
        ds = self._ds()
        dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
        batch = next(iter(dl))
        assert batch["x"].shape[0] == min(2, len(ds)) and batch["brain_mask"].shape[0] == batch["x"].shape[0]
