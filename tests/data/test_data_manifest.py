"""Cohort manifest: subject-level splits, content hash, and the downstream-test leakage guard."""
from __future__ import annotations

import pandas as pd
import pytest

from data.datasets import WindowedDataset
from data.manifest import LeakageError, Manifest, assign_splits, concat


def _records(n=40, runs=2):
    recs = []
    for i in range(n):
        for r in range(runs):
            recs.append(dict(subject=f"sub-{i:03d}", cohort="c1" if i % 2 else "c2", path=f"c/sub-{i:03d}_run-{r}.h5",
                             n_frames=30, tr=0.8, content_sha256=f"h{i}{r}", age=20.0 + i))
    return recs


def test_splits_are_subject_level_deterministic_and_stable():
    m = Manifest.from_records(_records(), seed=1)
    per_subject = m.df.groupby(["cohort", "subject"])["split"].nunique()
    assert (per_subject == 1).all()  # both runs of a subject share its split
    counts = m.df.drop_duplicates("subject")["split"].value_counts()
    assert set(counts.index) == {"train", "val", "test"} and counts["train"] > counts["val"]
    again = Manifest.from_records(list(reversed(_records())), seed=1)
    assert again.df.set_index("path")["split"].to_dict() == m.df.set_index("path")["split"].to_dict()
    # adding subjects never moves existing ones
    bigger = Manifest.from_records(_records(60), seed=1)
    old = m.df.set_index("path")["split"]
    assert (bigger.df.set_index("path")["split"].loc[old.index] == old).all()


def test_forced_test_subjects_and_fraction_validation():
    df = pd.DataFrame(_records(10, 1))
    s = assign_splits(df, (1.0, 0.0, 0.0), test_subjects=["c2/sub-000", "sub-003"])
    assert s[df["subject"].isin(["sub-000", "sub-003"])].eq("test").all()
    assert s[~df["subject"].isin(["sub-000", "sub-003"])].eq("train").all()
    with pytest.raises(ValueError, match="fractions=.*summing to 1"):
        assign_splits(df, (0.5, 0.1, 0.1))


def test_leakage_guard_rejects_subject_in_test_and_train(tmp_path):
    m = Manifest.from_records(_records(), seed=0)
    df = m.df.copy()
    test_subj = df.loc[df["split"] == "test", "subject"].iloc[0]
    rows = df.index[df["subject"] == test_subj]
    df.loc[rows[0], "split"] = "train"  # one run of a held-out subject leaks into pre-training
    with pytest.raises(LeakageError, match="more than one split"):
        Manifest(df)
    df.to_parquet(tmp_path / "leaky.parquet")
    with pytest.raises(LeakageError, match=r"leaky\.parquet: 1 subject"):
        Manifest.load(tmp_path / "leaky.parquet")
    other = Manifest(df.drop(index=rows[1:]))  # valid on its own ...
    with pytest.raises(LeakageError):           # ... but merging with a manifest holding it in test leaks
        concat([m, Manifest(other.df.assign(path=other.df["path"] + ".b"))])


def test_downstream_test_subjects_never_reach_pretraining_datasets(small_cohort):
    m = Manifest.load(small_cohort)
    test_keys = m.subjects("test")
    assert test_keys, "fixture must hold downstream test subjects"
    for split in ("train", "val", ["train", "val"]):
        ds = WindowedDataset(m, split=split, sequence_length=5, grid=None)
        assert not (set(ds.subject_keys) & test_keys)
        assert not ({f"{ds[i]['cohort']}/{ds[i]['subject']}" for i in range(len(ds))} & test_keys)
    with pytest.raises(LeakageError, match="cannot be mixed"):
        WindowedDataset(m, split=["train", "test"], sequence_length=5, grid=None)


def test_content_hash_order_independent_and_sensitive(tmp_path):
    m = Manifest.from_records(_records(), seed=0)
    shuffled = Manifest(m.df.sample(frac=1.0, random_state=3))
    assert shuffled.content_hash == m.content_hash
    moved = Manifest(m.df.assign(path="elsewhere/" + m.df["path"]))
    assert moved.content_hash == m.content_hash  # location does not change the data
    relabeled = m.df.copy()
    relabeled.loc[0, "age"] += 1
    assert Manifest(relabeled).content_hash != m.content_hash
    p = m.save(tmp_path / "m.parquet")
    assert Manifest.load(p).content_hash == m.content_hash and not list(tmp_path.glob(".*tmp*"))


def test_missing_columns_and_bad_split_values():
    df = pd.DataFrame(_records(4, 1))
    with pytest.raises(ValueError, match="missing columns \\['split'\\]"):
        Manifest(df)
    with pytest.raises(ValueError, match="split values \\['holdout'\\].*allowed values"):
        Manifest(df.assign(split="holdout"))
