"""Synthetic cohort: real MNI mask, determinism, cohort differences, planted (learnable, not trivial) traits."""
from __future__ import annotations

import time

import numpy as np
import pytest

from data.manifest import Manifest
from data.subject_file import SubjectReader
from data.synthetic import (AMP_PATTERN, DEFAULT_COHORTS, CohortSpec, brain_mask, generate_cohort, hrf,
                            network_maps, texture_field)


def test_brain_mask_is_the_mni_brain_fitted_to_grid():
    m = brain_mask((24, 26, 22))
    assert m.shape == (24, 26, 22) and m.dtype == bool
    frac = m.mean()
    assert 0.15 < frac < 0.6  # a brain, not a box or a speck
    idx = np.nonzero(m)
    extent = [int(i.max() - i.min() + 1) for i in idx]
    assert max(e / g for e, g in zip(extent, m.shape)) == pytest.approx(0.9, abs=0.08)
    # MNI brains are longer front-to-back (y) than wide (x)
    m2 = brain_mask((40, 40, 40))
    ext2 = [int(i.max() - i.min() + 1) for i in np.nonzero(m2)]
    assert ext2[1] > ext2[0] and ext2[1] > ext2[2]


def test_hrf_shape():
    h = hrf(0.5)
    t = np.arange(len(h)) * 0.5
    assert h.sum() == pytest.approx(1.0) and 4.0 <= t[np.argmax(h)] <= 6.0 and h.min() < 0  # undershoot


def test_deterministic_by_seed_and_cohort_properties(small_cohort, tmp_path):
    m = Manifest.load(small_cohort)
    again = Manifest.load(generate_cohort(tmp_path / "again", n_subjects=12, grid=(24, 26, 22), n_frames=30,
                                          seed=3, progress=False, workers=2))
    assert again.content_hash == m.content_hash  # same seed, other worker count -> identical data
    other = Manifest.load(generate_cohort(tmp_path / "other", n_subjects=12, grid=(24, 26, 22), n_frames=30,
                                          seed=4, progress=False))
    assert not set(other.df["content_sha256"]) & set(m.df["content_sha256"])
    trs = m.df.groupby("cohort")["tr"].first().to_dict()
    assert trs == {c.name: c.tr for c in DEFAULT_COHORTS}
    assert m.df.groupby("cohort").size().to_dict() == {"cohort_a": 6, "cohort_b": 4, "cohort_c": 2}
    assert set(m.df["trait_bin"].unique()) <= {0, 1} and m.df["trait_cont"].std() > 0.3
    assert set(m.df["split"]) <= {"train", "val", "test"}


def test_rerun_skips_existing_subjects(small_cohort):
    t0 = time.perf_counter()
    again = generate_cohort(small_cohort.parent, n_subjects=12, grid=(24, 26, 22), n_frames=30, seed=3,
                            progress=False)
    assert time.perf_counter() - t0 < 3.0
    assert Manifest.load(again).content_hash == Manifest.load(small_cohort).content_hash


def test_noise_levels_differ_between_cohorts(tmp_path):
    specs = [CohortSpec(name="quiet", noise=0.5, tr=1.0), CohortSpec(name="loud", noise=3.0, tr=1.0)]
    m = Manifest.load(generate_cohort(tmp_path, n_subjects=4, grid=(20, 20, 20), n_frames=20, seed=0,
                                      cohorts=specs, progress=False))
    rel_sd = {}
    for cohort, g in m.df.groupby("cohort"):
        vals = []
        for p in g["path"]:
            with SubjectReader(m.resolve(p)) as r:
                x = r.read_raw()[:, r.mask].astype(np.float64)
            vals.append(np.mean(x.std(axis=0) / x.mean(axis=0)))  # temporal sd / mean per voxel
        rel_sd[cohort] = np.mean(vals)
    assert rel_sd["loud"] > 2.5 * rel_sd["quiet"]


def test_traits_are_planted_learnable_not_trivial(tmp_path):
    """trait_cont shifts network amplitudes along AMP_PATTERN; a least-squares read-out recovers it partly."""
    grid, n, T = (20, 22, 18), 40, 40
    m = Manifest.load(generate_cohort(tmp_path, n_subjects=n, grid=grid, n_frames=T, seed=11,
                                      cohorts=["cohort_a"], progress=False))
    mask = brain_mask(grid)
    maps = network_maps(mask, seed=11).astype(np.float64)          # (K, V)
    proj = np.linalg.pinv(maps.T)                                    # (K, V): voxel -> network time courses
    feats, cont, coupling = [], [], []
    for p, tc in zip(m.df["path"], m.df["trait_cont"]):
        with SubjectReader(m.resolve(p)) as r:
            x = r.read_raw()[:, r.mask].astype(np.float64)           # (T, V)
        pct = x / x.mean(axis=0) - 1.0
        s = pct @ proj.T                                             # (T, K) network signals
        feats.append(np.log(s.std(axis=0)))
        cont.append(tc)
        coupling.append(0.5 * (np.corrcoef(s[:, 0], s[:, 1])[0, 1] + np.corrcoef(s[:, 2], s[:, 3])[0, 1]))
    f = np.array(feats)
    score = (f - f.mean(0)) @ AMP_PATTERN[: f.shape[1]]
    r = np.corrcoef(score, cont)[0, 1]
    assert 0.5 < r < 0.99, r  # learnable, yet jitter keeps it from being an exact function
    # trait_bin raises the coupling of network pairs (0,1), (2,3): separable, not perfectly
    b = m.df["trait_bin"].to_numpy()
    c = np.array(coupling)
    assert 0 < b.sum() < len(b)
    auroc = np.mean([(ci > cj) + 0.5 * (ci == cj) for ci in c[b == 1] for cj in c[b == 0]])
    assert c[b == 1].mean() - c[b == 0].mean() > 0.2 and 0.75 < auroc < 1.0, (auroc, c[b == 1].mean(), c[b == 0].mean())


@pytest.mark.slow
def test_three_hundred_small_subjects_in_about_a_minute(tmp_path):
    t0 = time.perf_counter()
    generate_cohort(tmp_path, n_subjects=300, grid=(48, 48, 48), n_frames=40, seed=0, progress=False, workers=2)
    assert time.perf_counter() - t0 < 90.0


def test_demo_cli(tmp_path, capsys):
    from data.synthetic import main

    assert main(["--root", str(tmp_path), "--n-subjects", "5", "--grid", "20", "22", "18", "--frames", "8"]) == 0
    out = capsys.readouterr().out
    assert "Manifest(5 files" in out and "x (1, 20, 22, 18, 8)" in out
    assert (tmp_path / "manifest.parquet").exists()


def _mean_and_temporal(m: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    means, rel_sd = [], []
    for p in m.df.sort_values("subject")["path"]:
        with SubjectReader(m.resolve(p)) as r:
            x = r.read_raw()[:, r.mask].astype(np.float64)
        means.append(x.mean(axis=0))
        rel_sd.append(x.std(axis=0) / x.mean(axis=0))
    return means, rel_sd


def test_texture_adds_shared_fine_anatomy_and_nothing_else(tmp_path):
    """``texture`` multiplies a power-law random field into the static anatomy, the same for every subject of
    the cohort; the fluctuations (% of baseline) are unchanged, and ``texture=0`` is the default cohort."""
    kw = dict(n_subjects=4, grid=(20, 22, 18), n_frames=8, seed=5, cohorts=["cohort_a"], progress=False)
    plain = Manifest.load(generate_cohort(tmp_path / "plain", **kw))
    zero = Manifest.load(generate_cohort(tmp_path / "zero", texture=0.0, texture_exponent=0.5, **kw))
    assert zero.content_hash == plain.content_hash
    rich = Manifest.load(generate_cohort(tmp_path / "rich", texture=0.15, texture_exponent=1.0, **kw))
    (m0, sd0), (m1, sd1) = _mean_and_temporal(plain), _mean_and_temporal(rich)
    tex = [a / b - 1.0 for a, b in zip(m1, m0)]                        # the multiplied field, per subject
    assert 0.1 < np.std(tex[0]) < 0.2                                   # ~15% of baseline
    assert np.corrcoef(tex[0], tex[-1])[0, 1] > 0.99                    # shared by the cohort's subjects
    assert np.allclose(np.mean(sd1, axis=0), np.mean(sd0, axis=0), rtol=0.02)  # fluctuations as before
    field = texture_field(brain_mask((20, 22, 18)), seed=5, exponent=1.0)
    assert abs(field.mean()) < 1e-5 and field.std() == pytest.approx(1.0, rel=1e-4)
    assert np.corrcoef(tex[0], field)[0, 1] > 0.95


@pytest.mark.parametrize("kw,field", [(dict(texture=1.5), "texture"), (dict(texture=-0.1), "texture"),
                                      (dict(texture_exponent=float("nan")), "texture_exponent")])
def test_bad_texture_is_refused_naming_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        generate_cohort(tmp_path, n_subjects=2, grid=(20, 20, 20), n_frames=8, progress=False, **kw)
