"""Converters on the real 4-D fMRI fixtures shipped in the nibabel and nitime wheels, BIDS and legacy layouts."""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from data.cli import main as cli_main
from data.convert import convert_bids, convert_legacy, main
from data.datasets import WindowedDataset
from data.manifest import Manifest
from data.subject_file import read_info, read_subject_full

REPO = Path(__file__).resolve().parents[2]


def nibabel_functional() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "functional.nii"


def nitime_fmri1() -> Path:
    return Path(str(importlib.resources.files("nitime") / "data" / "fmri1.nii.gz"))


def test_nifti_fixtures_convert_with_known_summaries(tmp_path):
    f1, f2 = nibabel_functional(), nitime_fmri1()
    assert main(["nifti", "--out", str(tmp_path), str(f1), str(f2), "--no-progress"]) == 0
    m = Manifest.load(tmp_path / "manifest.parquet")
    rows = m.df.set_index("subject")
    assert rows.loc["functional", "n_frames"] == 20 and rows.loc["functional", "tr"] == pytest.approx(2.0)
    assert rows.loc["fmri1", "n_frames"] == 40 and rows.loc["fmri1", "tr"] == pytest.approx(1.35)
    for name, src, shape in (("functional", f1, (17, 21, 3, 20)), ("fmri1", f2, (10, 10, 18, 40))):
        img = nib.load(src)
        ref = np.asarray(img.dataobj, dtype=np.float64)
        bold, mask, info = read_subject_full(m.resolve(rows.loc[name, "path"]))
        assert bold.shape == shape == ref.shape and info.orig_shape == shape[:3]
        np.testing.assert_allclose(info.affine, img.affine)
        assert mask.sum() > 0.2 * mask.size
        # values inside the mask survive float16 storage (int16 sources: error < 1 unit)
        assert np.abs(bold[mask] - ref[mask]).max() <= 1.0
        assert info.stats["mean"] == pytest.approx(ref[mask].mean(), rel=1e-4)
        assert info.stats["max"] == pytest.approx(ref[mask].max(), abs=1.0)
    # iterate windows of the converted real data
    both = Manifest(m.df.assign(split="train"), m.path)
    ds = WindowedDataset(both, split="train", sequence_length=10, grid=(24, 24, 24), scaling="znorm_zeroback")
    assert len(ds) == 2 + 4 and ds[0]["x"].shape == (1, 24, 24, 24, 10)


def test_resumable_and_reconverts_changed_source(tmp_path):
    src = tmp_path / "in" / "functional.nii"
    src.parent.mkdir()
    shutil.copy(nibabel_functional(), src)
    out = tmp_path / "out"
    from data.convert import convert_nifti

    r1 = convert_nifti([src], out, progress=False, log=lambda s: None)
    assert (r1.converted, r1.skipped) == (1, 0)
    r2 = convert_nifti([src], out, progress=False, log=lambda s: None)
    assert (r2.converted, r2.skipped) == (0, 1)
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))  # source changed
    r3 = convert_nifti([src], out, progress=False, log=lambda s: None)
    assert (r3.converted, r3.skipped) == (1, 0)
    r4 = convert_nifti([src], out, progress=False, codec="gzip", log=lambda s: None)  # options changed
    assert r4.converted == 1 and read_info(out / "nifti" / "functional.h5").codec == "gzip"


def test_failures_are_summarised_with_nonzero_exit(tmp_path, capsys):
    img = nib.load(nibabel_functional())
    three_d = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), three_d)
    nan4d = tmp_path / "nan.nii.gz"
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[8, 10, 1, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), nan4d)
    out = tmp_path / "out"
    rc = main(["nifti", "--out", str(out), str(three_d), str(nibabel_functional()), str(nan4d), "--no-progress",
               "--workers", "2"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "converted 1, skipped 0 (complete and unchanged), failed 2" in text
    assert "FAILED flat: " in text and "flat.nii.gz: NIfTI is 3-D with shape (17, 21, 3)" in text
    assert "FAILED nan: " in text and "nan.nii.gz: 1 NaN/Inf values inside the brain mask" in text
    m = Manifest.load(out / "manifest.parquet")
    assert m.df["subject"].tolist() == ["functional"]
    assert sorted(p.name for p in (out / "nifti").iterdir()) == ["functional.h5"]  # nothing half-written


def _bids_tree(root: Path) -> Path:
    img = nib.load(nibabel_functional())
    data = np.asarray(img.dataobj)
    deriv = root / "derivatives" / "fmriprep"
    runs = [("01", "ses-1", 1.0), ("01", "ses-2", 1.0), ("02", None, 1.0)]
    for sub, ses, scale in runs:
        func = deriv / f"sub-{sub}" / (ses or "") / "func"
        func.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{sub}_{ses + '_' if ses else ''}task-rest_space-MNI152NLin2009cAsym_res-2"
        nib.save(nib.Nifti1Image((data * scale).astype(np.int16), img.affine), func / f"{stem}_desc-preproc_bold.nii.gz")
        (func / f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 0.72}))
        if sub == "02":
            mask = np.zeros(data.shape[:3], np.uint8)
            mask[4:12, 5:15, :] = 1
            nib.save(nib.Nifti1Image(mask, img.affine), func / f"{stem}_desc-brain_mask.nii.gz")
        # another space must be ignored
        nib.save(nib.Nifti1Image(data[..., :3], img.affine),
                 func / (stem.replace("MNI152NLin2009cAsym", "T1w").replace("_res-2", "") + "_desc-preproc_bold.nii.gz"))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t31\tF\nsub-02\t45\tM\n")
    return deriv


def test_bids_derivatives_with_participants_and_sessions(tmp_path):
    deriv = _bids_tree(tmp_path / "bids")
    out = tmp_path / "out"
    res = convert_bids(deriv, out, cohort="ds1", progress=False, log=lambda s: None)
    assert res.ok and res.converted == 3
    m = Manifest.load(out / "manifest.parquet")
    df = m.df.sort_values("path")
    assert df["path"].tolist() == ["ds1/sub-01_ses-1_task-rest.h5", "ds1/sub-01_ses-2_task-rest.h5",
                                   "ds1/sub-02_task-rest.h5"]
    assert df["tr"].tolist() == [0.72] * 3 and df["n_frames"].tolist() == [20] * 3
    assert df.set_index("path")["age"].to_dict()["ds1/sub-02_task-rest.h5"] == 45
    assert set(df.loc[df["subject"] == "sub-01", "sex"]) == {"F"}
    assert df.groupby("subject")["split"].nunique().max() == 1  # both sessions share a split
    info = read_info(out / "ds1" / "sub-02_task-rest.h5")
    assert info.crop_offset == (4, 5, 0) and info.crop_shape == (8, 10, 3)  # the fMRIPrep brain mask was used
    with pytest.raises(ValueError, match="no runs match"):
        convert_bids(deriv, out, space="MNI152NLin6Asym", progress=False)


def _legacy_tree(root: Path, n_subjects=3, frames=12, shape=(10, 12, 8)):
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(n_subjects):
        d = root / "img" / f"subj{i}"
        d.mkdir(parents=True)
        mask = np.zeros(shape, bool)
        mask[2:8, 3:10, 1:7] = True
        vol = np.where(mask[..., None], rng.standard_normal(shape + (frames,)), 0.0).astype(np.float16)
        for t in range(frames):  # written out of order; names are numeric
            torch.save(torch.from_numpy(vol[..., t].copy()).unsqueeze(0), d / f"frame_{t}.pt")
        truth[f"subj{i}"] = (vol.astype(np.float32), mask)
    pd.DataFrame({"subject": [f"subj{i}" for i in range(n_subjects)], "sex": [0, 1, 1][:n_subjects],
                  "age": [20.5, 30.0, 41.0][:n_subjects]}).to_csv(root / "labels.csv", index=False)
    return truth


def test_legacy_pt_layout_migrates_exactly(tmp_path):
    truth = _legacy_tree(tmp_path / "legacy")
    out = tmp_path / "out"
    res = convert_legacy(tmp_path / "legacy", out, tr=0.72, labels=str(tmp_path / "legacy" / "labels.csv"),
                         progress=False, log=lambda s: None)
    assert res.ok and res.converted == 3
    m = Manifest.load(out / "manifest.parquet")
    assert m.df.set_index("subject")["age"].to_dict() == {"subj0": 20.5, "subj1": 30.0, "subj2": 41.0}
    for subj, (vol, mask) in truth.items():
        bold, mask_b, info = read_subject_full(out / "legacy" / f"{subj}.h5")
        np.testing.assert_array_equal(mask_b, mask)
        np.testing.assert_allclose(bold, vol, atol=2e-3)  # float16 -> float16 around the mean
        assert info.tr == 0.72 and info.n_frames == 12


def test_legacy_missing_tr_and_bad_frame(tmp_path, capsys):
    _legacy_tree(tmp_path / "legacy", n_subjects=2)
    torch.save(torch.zeros(3, 4), tmp_path / "legacy" / "img" / "subj1" / "frame_5.pt")
    out = tmp_path / "out"
    rc = main(["legacy", str(tmp_path / "legacy"), "--out", str(out), "--tr", "0.8", "--no-progress"])
    assert rc == 1
    assert "frame_5.pt: legacy frame has shape (3, 4), expected a 3-D volume" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --tr is required for legacy data (no TR in the layout)
        main(["legacy", str(tmp_path / "legacy"), "--out", str(out)])
    m = Manifest.load(out / "manifest.parquet")
    assert m.df["subject"].tolist() == ["subj0"]


def test_cli_module_and_entry_point(tmp_path):
    assert cli_main is main
    r = subprocess.run([sys.executable, "-m", "data.convert", "nifti", "--out", str(tmp_path), "--no-progress",
                        str(nibabel_functional())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "converted 1" in r.stdout and (tmp_path / "manifest.parquet").exists()


def test_resample_to_grid(tmp_path):
    rc = main(["nifti", "--out", str(tmp_path), "--resample-to", "34", "42", "6", "--no-progress",
               str(nibabel_functional())])
    assert rc == 0
    bold, mask, info = read_subject_full(tmp_path / "nifti" / "functional.h5")
    assert bold.shape == (34, 42, 6, 20) and info.orig_shape == (34, 42, 6)
    src = nib.load(nibabel_functional())
    # corner voxel centres stay put: output voxel (33, 41, 5) maps to input voxel (16, 20, 2)
    np.testing.assert_allclose(info.affine @ [33, 41, 5, 1], src.affine @ [16, 20, 2, 1], atol=1e-9)
    np.testing.assert_allclose(info.affine[:3, 3], src.affine[:3, 3])
    ref = np.asarray(src.dataobj, dtype=np.float64)
    assert abs(bold[mask].mean() - ref[ref.mean(axis=3) > 0.2 * np.percentile(ref.mean(axis=3), 98)].mean()) < 50
