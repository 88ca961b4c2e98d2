"""Subject-file format: round trip, statistics, codecs, chunking, atomic writes and bad input."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from data.subject_file import (CODECS, SCHEMA_VERSION, SubjectFileError, SubjectReader, is_complete, read_info,
                               read_subject_full, transcode, write_subject)

SHAPE = (13, 11, 9, 7)  # X, Y, Z, T: distinct so a swapped axis fails


def _series(seed=0, shape=SHAPE, base=1000.0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape[:3], dtype=bool)
    mask[3:10, 2:9, 1:6] = True
    mask[3, 2, 1] = False
    bold = np.zeros(shape, dtype=np.float64)
    bold[mask] = base + 25.0 * rng.standard_normal((int(mask.sum()), shape[3]))
    return bold, mask


def _no_tmp(folder):
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_round_trip_crop_offsets_and_values(tmp_path):
    bold, mask = _series()
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    info = write_subject(tmp_path / "s.h5", bold, mask, tr=0.72, affine=aff, subject="s1", cohort="c")
    assert info.crop_offset == (3, 2, 1) and info.crop_shape == (7, 7, 5)
    assert info.orig_shape == (13, 11, 9) and info.n_frames == 7 and info.tr == pytest.approx(0.72)
    np.testing.assert_array_equal(info.affine, aff)
    back, mask_b, _ = read_subject_full(tmp_path / "s.h5")
    np.testing.assert_array_equal(mask_b, mask)
    assert back.shape == SHAPE
    # float16 storage around the brain mean: error well below the signal's 25-unit std
    err = np.abs(back[mask] - bold[mask])
    assert err.max() < 0.06 and np.all(back[~mask] == 0)
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["bold"].dtype == np.float16 and f["bold"].shape == (7, 7, 7, 5)
        assert f["bold"].chunks == (4, 7, 7, 5)  # full crop x a few frames
        assert int(f.attrs["schema_version"]) == SCHEMA_VERSION
    assert _no_tmp(tmp_path)


def test_statistics_match_float64_reference(tmp_path):
    bold, mask = _series(1)
    info = write_subject(tmp_path / "s.h5", bold, mask, tr=2.0, subject="s")
    with SubjectReader(tmp_path / "s.h5") as r:
        dec = r.read_raw().astype(np.float64)[:, r.mask]  # the values a loader decodes
    ref = dict(mean=dec.mean(), std=dec.std(), min=dec.min(), max=dec.max(), median=np.median(dec),
               q25=np.percentile(dec, 25), q75=np.percentile(dec, 75))
    for k, v in ref.items():
        assert info.stats[k] == pytest.approx(v, rel=1e-6), k
    assert info.stats["iqr"] == pytest.approx(ref["q75"] - ref["q25"], rel=1e-6)
    # and the decoded values are within float16 rounding of the source
    assert abs(info.stats["mean"] - bold[mask].mean()) < 0.01


def test_large_values_use_value_scale_without_overflow(tmp_path):
    bold, mask = _series(2, base=0.0)
    bold[mask] = bold[mask] * 8000.0  # +-600k: beyond float16
    info = write_subject(tmp_path / "s.h5", bold, mask, tr=1.0, subject="s")
    assert info.value_scale < 1.0
    back, _, _ = read_subject_full(tmp_path / "s.h5")
    assert np.all(np.isfinite(back))
    rel = np.abs(back[mask] - bold[mask]).max() / np.abs(bold[mask]).max()
    assert rel < 1e-3


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_reads_back_identically(tmp_path, codec):
    bold, mask = _series(3)
    ref = write_subject(tmp_path / "ref.h5", bold, mask, tr=1.0, subject="s", codec="none")
    info = write_subject(tmp_path / f"{codec}.h5", bold, mask, tr=1.0, subject="s", codec=codec)
    assert info.content_sha256 == ref.content_sha256  # hash is over values, not bytes on disk
    with SubjectReader(tmp_path / f"{codec}.h5") as a, SubjectReader(tmp_path / "ref.h5") as b:
        np.testing.assert_array_equal(a.read_frames(2, 6), b.read_frames(2, 6))
        np.testing.assert_array_equal(a.read_frames(0, 7, 3), b.read_frames(0, 7)[::3])
    if codec == "gzip":  # readable by any HDF5 build: standard deflate filter
        with h5py.File(tmp_path / "gzip.h5") as f:
            assert f["bold"].compression == "gzip"


def test_transcode_keeps_content(tmp_path):
    bold, mask = _series(4)
    a = write_subject(tmp_path / "a.h5", bold, mask, tr=1.5, subject="s", codec="gzip")
    b = transcode(tmp_path / "a.h5", tmp_path / "b.h5", "lz4", chunk_frames=2)
    assert b.codec == "lz4" and b.content_sha256 == a.content_sha256 and b.stats == a.stats
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["bold"].chunks[0] == 2


def test_bad_codec_is_a_config_error(tmp_path):
    bold, mask = _series()
    with pytest.raises(ValueError, match="codec='lzma'.*allowed values"):
        write_subject(tmp_path / "s.h5", bold, mask, tr=1.0, subject="s", codec="lzma")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_rejected_and_nothing_written(tmp_path, bad):
    bold, mask = _series()
    bold[5, 5, 3, 2] = bad
    with pytest.raises(SubjectFileError, match=r"s\.h5.*1 NaN/Inf"):
        write_subject(tmp_path / "s.h5", bold, mask, tr=1.0, subject="s")
    assert not (tmp_path / "s.h5").exists() and _no_tmp(tmp_path)


def test_empty_mask_rejected(tmp_path):
    bold, mask = _series()
    with pytest.raises(SubjectFileError, match=r"s\.h5.*empty brain mask"):
        write_subject(tmp_path / "s.h5", bold, np.zeros_like(mask), tr=1.0, subject="s")
    assert not (tmp_path / "s.h5").exists()


def test_bad_tr_and_shape_rejected(tmp_path):
    bold, mask = _series()
    with pytest.raises(SubjectFileError, match="TR must be a positive"):
        write_subject(tmp_path / "s.h5", bold, mask, tr=0.0, subject="s")
    with pytest.raises(SubjectFileError, match="must be 4-D"):
        write_subject(tmp_path / "s.h5", bold[..., 0], mask, tr=1.0, subject="s")


def test_truncated_file_named_in_error(tmp_path):
    bold, mask = _series()
    p = tmp_path / "s.h5"
    write_subject(p, bold, mask, tr=1.0, subject="s")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SubjectFileError, match=r"s\.h5.*truncated or corrupt|s\.h5.*cannot decode"):
        with SubjectReader(p) as r:
            r.read_frames(0, 7)
    assert not is_complete(p)


def test_corrupt_header_named_in_error(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(SubjectFileError, match=r"junk\.h5: not a readable HDF5 file"):
        read_info(p)


def test_wrong_schema_version_named_in_error(tmp_path):
    bold, mask = _series()
    p = tmp_path / "s.h5"
    write_subject(p, bold, mask, tr=1.0, subject="s")
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SubjectFileError, match=rf"s\.h5: unsupported schema_version {SCHEMA_VERSION + 1}"):
        read_info(p)
    q = tmp_path / "other.h5"
    with h5py.File(q, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SubjectFileError, match=r"other\.h5: not a NeuroX subject file"):
        read_info(q)


def test_window_past_end_of_run(tmp_path):
    bold, mask = _series()
    write_subject(tmp_path / "s.h5", bold, mask, tr=1.0, subject="s")
    with SubjectReader(tmp_path / "s.h5") as r:
        with pytest.raises(SubjectFileError, match=r"s\.h5: frames \[3:9\] outside the run of 7 frames"):
            r.read_frames(3, 9)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    bold, mask = _series()
    p = tmp_path / "s.h5"
    good = write_subject(p, bold, mask, tr=1.0, subject="s", source_fingerprint="v1")
    bad = bold.copy()
    bad[5, 5, 3, 0] = np.nan
    with pytest.raises(SubjectFileError):
        write_subject(p, bad, mask, tr=1.0, subject="s", source_fingerprint="v2")
    assert read_info(p).content_sha256 == good.content_sha256
    assert is_complete(p, "v1") and not is_complete(p, "v2")
