"""A NIfTI whose header TR cannot be seconds (2000 with unit 'sec': milliseconds mislabelled) is refused, naming
the file and the fix, instead of being stored with TR 2000.0 (issue #28); msec headers are converted."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from data.convert import MAX_TR_S, load_nifti, main
from data.subject_file import SubjectFileError


def _nifti(path, zt: float, unit: str):
    rng = np.random.default_rng(0)
    data = (100 + rng.normal(0, 1, (7, 8, 9, 5))).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_zooms((2.0, 2.0, 2.0, zt))
    img.header.set_xyzt_units("mm", unit)
    nib.save(img, path)
    return path


def test_header_units_are_honoured(tmp_path):
    assert load_nifti(str(_nifti(tmp_path / "ms.nii.gz", 2000.0, "msec")))[3] == pytest.approx(2.0)
    assert load_nifti(str(_nifti(tmp_path / "s.nii.gz", 0.8, "sec")))[3] == pytest.approx(0.8)


def test_milliseconds_labelled_as_seconds_are_refused(tmp_path):
    f = _nifti(tmp_path / "bad.nii.gz", 2000.0, "sec")
    with pytest.raises(SubjectFileError) as err:
        load_nifti(str(f))
    assert str(err.value).startswith(f"{f}: header TR 2000 with time unit 'sec' means 2000 s, implausible")
    assert "pass --tr" in str(err.value)
    assert load_nifti(str(f), tr=2.0)[3] == 2.0  # an explicit TR in seconds overrides the header


def test_cli_names_the_file_and_writes_no_subject(tmp_path, capsys):
    f = _nifti(tmp_path / "bad.nii.gz", 2000.0, "sec")
    assert main(["nifti", str(f), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "FAILED bad: " in text and "implausible for fMRI" in text
    assert not list((tmp_path / "out").rglob("*.h5"))
    with pytest.raises(SubjectFileError, match=r"--tr 2000 is not a TR in seconds"):
        load_nifti(str(f), tr=2000.0)
    assert MAX_TR_S == 100.0
