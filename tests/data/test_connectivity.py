"""Parcel series and connectivity features (data.connectivity) and the generator's trait_scale / network atlas."""
from __future__ import annotations

import numpy as np
import pytest

from data.connectivity import block_parcellation, correlation_vector, load_parcellation, parcel_series
from data.manifest import Manifest
from data.subject_file import read_subject_full
from data.synthetic import generate_cohort


def test_block_parcellation_covers_the_mask_with_consecutive_labels():
    mask = np.zeros((7, 8, 9), dtype=bool)
    mask[1:6, 2:8, 0:9] = True
    lab = block_parcellation(mask, edge=3, min_voxels=1)
    assert lab.shape == (7, 8, 9) and lab.dtype == np.int32
    assert (lab[~mask] == 0).all() and (lab[mask] > 0).all()
    assert sorted(np.unique(lab[mask])) == list(range(1, lab.max() + 1))
    assert lab.max() == 2 * 3 * 3  # x 1..5 -> 2 blocks, y 2..7 -> 3, z 0..8 -> 3
    small = block_parcellation(mask, edge=3, min_voxels=10)  # blocks cut by the mask edge are dropped
    assert 0 < small.max() < lab.max() and (small[mask] == 0).any()


def test_correlation_vector_recovers_a_planted_correlation():
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 4000))
    series_TP = np.stack([a, 0.6 * a + 0.8 * b, c], axis=1)
    z = correlation_vector(series_TP)
    assert z.shape == (3,)
    assert np.tanh(z[0]) == pytest.approx(0.6, abs=0.03) and abs(np.tanh(z[1])) < 0.05
    assert correlation_vector(np.c_[a[:10], np.zeros(10)]).tolist() == [0.0]  # a constant parcel gives 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc_cohort")
    return generate_cohort(root, n_subjects=6, grid=(20, 22, 18), n_frames=10, seed=2, progress=False,
                           cohorts=["cohort_a"])


def test_parcel_series_are_parcel_means_of_the_decoded_run(cohort):
    m = Manifest.load(cohort)
    labels, name = load_parcellation(m, "auto")
    assert name == "blocks" and labels.shape == (20, 22, 18) and labels.max() > 10
    path = m.resolve(m.df["path"].iloc[0])
    s_TP = parcel_series(path, labels)
    bold, mask, info = read_subject_full(path)
    assert s_TP.shape == (10, labels.max())
    p = 3
    sel = mask & (labels == p)
    assert s_TP[:, p - 1] == pytest.approx(bold[sel].mean(axis=0), rel=1e-5)


def test_network_atlas_is_written_and_loaded(cohort):
    labels, name = load_parcellation(cohort, "networks")
    assert name == "networks" and labels.shape == (20, 22, 18)
    assert 1 <= labels.min() + 1 and 2 <= labels.max() <= 8
    with pytest.raises(ValueError, match="neither"):
        load_parcellation(cohort, "no-such-atlas.npz")


def test_trait_scale_default_keeps_the_cohort_and_scales_only_the_effects(tmp_path):
    kw = dict(n_subjects=4, grid=(20, 20, 20), n_frames=8, seed=5, cohorts=["cohort_a"], progress=False)
    plain = Manifest.load(generate_cohort(tmp_path / "plain", **kw))
    one = Manifest.load(generate_cohort(tmp_path / "one", trait_scale=1.0, **kw))
    two = Manifest.load(generate_cohort(tmp_path / "two", trait_scale=2.0, **kw))
    assert one.content_hash == plain.content_hash
    assert two.content_hash != plain.content_hash
    assert two.df["trait_cont"].tolist() == plain.df["trait_cont"].tolist()  # same subjects, same labels
    with pytest.raises(ValueError, match="trait_scale"):
        generate_cohort(tmp_path / "bad", trait_scale=-1.0, **kw)
