"""WindowedDataset: windows, strides, scaling, grid placement, TR handling, mixtures, handles, contract."""
from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest
import torch

from data.datasets import WindowedDataset
from data.manifest import Manifest
from data.subject_file import SubjectFileError, SubjectReader, write_subject
from data.testing import DatasetContract
from data.transforms import finish_on_device

SHAPE = (13, 11, 9)


def _write(tmp_path, n_frames=(17, 23), trs=(0.8, 2.0), seed=0):
    """Two subjects with a known ramp in time so window starts are visible in the values."""
    rng = np.random.default_rng(seed)
    recs = []
    raws = {}
    for i, (n, tr) in enumerate(zip(n_frames, trs)):
        mask = np.zeros(SHAPE, dtype=bool)
        mask[2:11, 1:8, 2:7] = True
        mask[2, 1, 2] = mask[10, 7, 6] = False  # not a full box: background inside the crop
        bold = np.zeros(SHAPE + (n,))
        bold[mask] = 500.0 + 10.0 * rng.standard_normal((int(mask.sum()), n)) + np.arange(n) * 3.0
        p = tmp_path / f"s{i}.h5"
        info = write_subject(p, bold, mask, tr=tr, subject=f"s{i}", cohort=f"c{i}")
        raws[f"s{i}"] = (bold, mask)
        recs.append(dict(subject=f"s{i}", cohort=f"c{i}", path=p.name, n_frames=n, tr=tr,
                         content_sha256=info.content_sha256, split="train", score=float(i) + 0.5))
    m = Manifest.from_records(recs, path=tmp_path / "manifest.parquet")
    m.save()
    return m, raws


class TestWindowedDatasetContract(DatasetContract):
    expected_shape = (1, 28, 30, 24, 6)
    has_target = True

    def make_dataset(self):
        import tempfile
        from pathlib import Path

        from data.synthetic import generate_cohort

        p = generate_cohort(Path(tempfile.mkdtemp()), n_subjects=6, grid=(28, 30, 24), n_frames=14, seed=1,
                            progress=False, fractions=(1.0, 0.0, 0.0))
        return WindowedDataset(Manifest.load(p), split="train", sequence_length=6, grid=(28, 30, 24),
                               target="trait_cont")


class TestCropContract(DatasetContract):
    """``grid=None`` also honours the contract (crop shapes differ per subject, so batch size 1)."""

    def make_dataset(self):
        import tempfile
        from pathlib import Path

        m, _ = _write(Path(tempfile.mkdtemp()), n_frames=(17, 17))
        return WindowedDataset(m, split="train", sequence_length=5, grid=None, scaling="robust")


def test_window_count_and_starts(tmp_path):
    m, _ = _write(tmp_path)
    ds = WindowedDataset(m, sequence_length=5, stride_within=1, stride_between=1.0, grid=None)
    # 17 frames -> starts 0,5,10 ; 23 frames -> 0,5,10,15,(18 no: 15+5=20<=23 ok, 20+5>23)
    assert [ds.window(i)[1] for i in range(len(ds))] == [0, 5, 10, 0, 5, 10, 15]
    half = WindowedDataset(m, sequence_length=5, stride_between=0.5, grid=None)   # span 5 -> step round(2.5)=2
    assert [half.window(i)[1] for i in range(len(half)) if half.window(i)[0].endswith("s0.h5")] == \
        [0, 2, 4, 6, 8, 10, 12]
    within = WindowedDataset(m, sequence_length=4, stride_within=2, grid=None)    # span 7
    assert [within.window(i)[1] for i in range(len(within)) if within.window(i)[0].endswith("s0.h5")] == [0, 7]


def test_stride_within_reads_every_other_frame(tmp_path):
    m, _ = _write(tmp_path)
    ds = WindowedDataset(m, sequence_length=4, stride_within=2, grid=None, scaling="none")
    it = ds[1]  # s0, start 7 -> frames 7, 9, 11, 13
    with SubjectReader(tmp_path / "s0.h5") as r:
        ref = r.read_raw(7, 14)[::2]
    got = it["x"][0].permute(3, 0, 1, 2).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
    assert it["start"] == 7


@pytest.mark.parametrize("method", ["minmax", "znorm_zeroback", "znorm_minback", "robust", "none"])
def test_scaling_matches_float64_reference(tmp_path, method):
    m, _ = _write(tmp_path)
    ds = WindowedDataset(m, sequence_length=5, grid=None, scaling=method)
    it = ds[4]  # s1, start 5
    with SubjectReader(tmp_path / "s1.h5") as r:
        all_raw = r.read_raw().astype(np.float64)
        mask = r.mask
    v = all_raw[:, mask]
    mean, std, mn, mx = v.mean(), v.std(), v.min(), v.max()
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    win = all_raw[5:10]
    ref_fn, bg = {"minmax": ((win - mn) / (mx - mn), 0.0), "znorm_zeroback": ((win - mean) / std, 0.0),
                  "znorm_minback": ((win - mean) / std, (mn - mean) / std),
                  "robust": ((win - med) / (q75 - q25), 0.0), "none": (win, 0.0)}[method]
    ref = np.where(mask[None], ref_fn, bg)
    got = it["x"][0].permute(3, 0, 1, 2).double().numpy()
    tol = 2e-3 * max(1.0, np.abs(ref).max()) if method == "none" else 1e-4
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    if method == "znorm_zeroback":
        assert abs(got[:, mask].mean()) < 2.0  # z-scored over all frames, this window is near 0


def test_grid_placement_and_padding(tmp_path):
    m, _ = _write(tmp_path)
    ds = WindowedDataset(m, sequence_length=5, grid=(15, 14, 12), scaling="znorm_minback")
    it = ds[0]
    crop = WindowedDataset(m, sequence_length=5, grid=None, scaling="znorm_minback")[0]
    # crop (9, 7, 5) centred in (15, 14, 12): offsets (3, 3, 3)
    assert it["x"].shape == (1, 15, 14, 12, 5) and tuple(crop["x"].shape) == (1, 9, 7, 5, 5)
    assert torch.equal(it["x"][:, 3:12, 3:10, 3:8], crop["x"])
    bg = crop["x"][0][~crop["brain_mask"]].unique()
    assert bg.numel() == 1 and float(bg) < -1.0  # min-background
    outside = it["x"].clone()
    outside[:, 3:12, 3:10, 3:8] = bg
    assert (outside == bg).all()
    assert it["brain_mask"][3:12, 3:10, 3:8].equal(crop["brain_mask"]) and it["brain_mask"].sum() == crop["brain_mask"].sum()
    assert tuple(crop["crop_offset"].tolist()) == (2, 1, 2)
    with pytest.raises(ValueError, match=r"s0\.h5: brain box \(9, 7, 5\) does not fit the model grid \(8, 14, 12\)"):
        WindowedDataset(m, sequence_length=5, grid=(8, 14, 12))[0]


@pytest.mark.parametrize("grid", [(15, 14, 12), None])
def test_deferred_device_finish_equals_cpu_path(tmp_path, grid):
    m, _ = _write(tmp_path, n_frames=(17, 17))
    for method in ("znorm_minback", "minmax"):
        cpu = WindowedDataset(m, sequence_length=5, grid=grid, scaling=method)
        dev = WindowedDataset(m, sequence_length=5, grid=grid, scaling=method, defer=True)
        items = [dev[0]] if grid is None else [dev[0], dev[5]]
        assert items[0]["x"].dtype == torch.float16
        batch = torch.utils.data.default_collate(items)
        out = finish_on_device(batch, "cpu")
        ref = torch.stack([cpu[0]["x"]] if grid is None else [cpu[0]["x"], cpu[5]["x"]])
        torch.testing.assert_close(out["x"], ref, rtol=0, atol=1e-6)


def test_target_tr_resamples_in_time(tmp_path):
    m, _ = _write(tmp_path, n_frames=(17, 23), trs=(1.0, 2.0))
    ds = WindowedDataset(m, sequence_length=4, grid=None, scaling="none", target_tr=1.0, cohorts=["c1"])
    # s1 has TR 2 s, 23 frames = 44 s; windows of 4 samples at 1 s (3 s) every 4 s -> starts 0..40 s
    assert len(ds) == 11 and ds[0]["tr"] == 1.0
    it = ds[1]  # starts at 4 s = source frame 2.0, samples at frames 2, 2.5, 3, 3.5
    with SubjectReader(tmp_path / "s1.h5") as r:
        raw = r.read_raw(2, 5).astype(np.float64)
    ref = np.stack([raw[0], 0.5 * (raw[0] + raw[1]), raw[1], 0.5 * (raw[1] + raw[2])])
    np.testing.assert_allclose(it["x"][0].permute(3, 0, 1, 2).numpy(), ref, atol=0.3)
    native = WindowedDataset(m, sequence_length=4, grid=None, cohorts=["c1"])
    assert native[0]["tr"] == 2.0 and len(native) == 5


def test_cohort_mixture_weights(tmp_path):
    m, _ = _write(tmp_path, n_frames=(40, 40))
    ds = WindowedDataset(m, sequence_length=2, grid=None, cohorts={"c0": 3.0, "c1": 1.0})
    counts = collections.Counter(ds.window_cohorts())
    assert counts["c0"] == 30 and counts["c1"] == 10  # 40 windows in all, 3:1
    again = WindowedDataset(m, sequence_length=2, grid=None, cohorts={"c0": 3.0, "c1": 1.0})
    assert [again.window(i) for i in range(len(again))] == [ds.window(i) for i in range(len(ds))]
    only = WindowedDataset(m, sequence_length=2, grid=None, cohorts=["c1"])
    assert set(only.window_cohorts()) == {"c1"}
    with pytest.raises(ValueError, match=r"unknown cohort\(s\) \['zz'\]; allowed values: \['c0', 'c1'\]"):
        WindowedDataset(m, sequence_length=2, grid=None, cohorts=["zz"])


def test_max_subjects_is_nested(small_cohort):
    m = Manifest.load(small_cohort)
    n_train = len(m.subjects("train"))
    sets = [set(WindowedDataset(m, split="train", sequence_length=5, grid=None, max_subjects=k).subject_keys)
            for k in range(1, n_train + 1)]
    assert [len(s) for s in sets] == list(range(1, n_train + 1))
    assert all(a < b for a, b in zip(sets, sets[1:]))
    with pytest.raises(ValueError, match=rf"max_subjects={n_train + 1} must be in \[1, {n_train}\]"):
        WindowedDataset(m, split="train", sequence_length=5, grid=None, max_subjects=n_train + 1)


def test_lru_caps_open_handles(small_cohort):
    m = Manifest.load(small_cohort)
    ds = WindowedDataset(m, split="train", sequence_length=10, grid=None, max_open_files=2)
    for i in range(len(ds)):
        ds[i]
        assert ds.open_files() <= 2
    assert ds.opens == len(ds.df)  # windows of one subject are consecutive: one open each
    for i in range(len(ds)):       # a second pass with 2 handles re-opens everything
        ds[i]
    assert ds.opens == 2 * len(ds.df)
    ds.close()
    assert ds.open_files() == 0


def test_tr_and_frame_count_mismatch_name_the_file(tmp_path):
    m, _ = _write(tmp_path)
    bad_tr = Manifest(m.df.assign(tr=[0.8, 3.0]), m.path)
    with pytest.raises(SubjectFileError, match=r"s1\.h5: TR 2\.0 s disagrees with the manifest's 3\.0 s"):
        WindowedDataset(bad_tr, sequence_length=5, grid=None)[3]
    bad_n = Manifest(m.df.assign(n_frames=[17, 30]), m.path)
    with pytest.raises(SubjectFileError, match=r"s1\.h5: has 23 frames but the manifest says 30"):
        WindowedDataset(bad_n, sequence_length=5, grid=None)[3]


def test_window_longer_than_run(tmp_path):
    m, _ = _write(tmp_path)
    with pytest.raises(SubjectFileError, match=r"s0\.h5: run of 17 frames \(TR 0\.8 s\) is shorter than one window"):
        WindowedDataset(m, sequence_length=20, grid=None)
    ds = WindowedDataset(m, sequence_length=20, grid=None, short_runs="skip")
    assert ds.subject_keys == ["c1/s1"] and len(ds) == 1


def test_config_errors_name_field_and_values(tmp_path):
    m, _ = _write(tmp_path)
    with pytest.raises(ValueError, match="scaling='zscore' is not supported; allowed values: minmax"):
        WindowedDataset(m, scaling="zscore")
    with pytest.raises(ValueError, match="split='pretrain': allowed values are"):
        WindowedDataset(m, split="pretrain")
    with pytest.raises(ValueError, match="target='sex' is not a manifest column; label columns: \\['score'\\]"):
        WindowedDataset(m, target="sex", grid=None)
    with pytest.raises(ValueError, match="stride_between=0"):
        WindowedDataset(m, stride_between=0)


def test_target_values_and_missing_labels_dropped(tmp_path):
    m, _ = _write(tmp_path)
    df = m.df.copy()
    df.loc[df["subject"] == "s0", "score"] = np.nan
    ds = WindowedDataset(Manifest(df, m.path), sequence_length=5, grid=None, target="score")
    assert ds.subject_keys == ["c1/s1"] and float(ds[0]["y"]) == pytest.approx(1.5)


def test_dataloader_workers_and_distributed_shards(small_cohort):
    m = Manifest.load(small_cohort)
    ds = WindowedDataset(m, split="train", sequence_length=10, grid=(24, 26, 22), scaling="minmax")
    ref = {(ds[i]["subject"], ds[i]["start"]): ds[i]["x"] for i in range(len(ds))}
    got = {}
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        dl = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2,
                                         multiprocessing_context="fork")
        for b in dl:
            for j in range(len(b["subject"])):
                got[(b["subject"][j], int(b["start"][j]))] = b["x"][j]
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k])
    assert pd.Series([k[0] for k in got]).nunique() == len(ds.subject_keys)
