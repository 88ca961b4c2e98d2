"""Cohort manifest: one Parquet table listing every subject file, its labels and its split.

Columns (required): ``subject`` (str), ``cohort`` (str), ``path`` (str, relative to the manifest's
folder or absolute), ``n_frames`` (int), ``tr`` (float, seconds), ``split`` (``train`` / ``val`` /
``test``), ``content_sha256`` (str, the subject file's content hash). Any other column is a
phenotype/label (``trait_cont``, ``trait_bin``, ``sex``, ``age``, ...).

Splits are subject-level and persisted: every row of one ``(cohort, subject)`` shares one split,
so a subject with several runs never straddles splits. ``test`` subjects are the held-out
downstream test set: they are never part of a pre-training split (``train``/``val``), which
:meth:`Manifest.check_leakage` enforces on every load and save.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
PRETRAIN_SPLITS = ("train", "val")
REQUIRED_COLUMNS = ("subject", "cohort", "path", "n_frames", "tr", "split", "content_sha256")
MANIFEST_NAME = "manifest.parquet"


class LeakageError(ValueError):
    """A subject held out for downstream testing also appears in a pre-training split."""


def stable_fraction(key: str, seed: int = 0) -> float:
    """Deterministic number in [0, 1) from a string key and a seed (independent of row order)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def assign_splits(df: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                  test_subjects: Iterable[str] | None = None) -> pd.Series:
    """Subject-level split labels for ``df`` (one of ``train``/``val``/``test`` per row).

    Parameters
    ----------
    df : DataFrame
        Needs ``subject`` and ``cohort`` columns.
    fractions : (train, val, test)
        Target fractions; a subject's split depends only on its key and ``seed``, so adding
        subjects never moves existing ones.
    seed : int
        Split seed.
    test_subjects : iterable of str, optional
        ``"cohort/subject"`` or ``"subject"`` keys forced into ``test`` (downstream hold-out).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions={tuple(fractions)} must be three non-negative numbers summing to 1 "
                         "(train, val, test)")
    forced = set(test_subjects or ())
    c1, c2 = fractions[0], fractions[0] + fractions[1]
    out = []
    for cohort, subject in zip(df["cohort"].astype(str), df["subject"].astype(str)):
        key = f"{cohort}/{subject}"
        if key in forced or subject in forced:
            out.append("test")
            continue
        u = stable_fraction(key, seed)
        out.append("train" if u < c1 else "val" if u < c2 else "test")
    return pd.Series(out, index=df.index, name="split")


def _atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Manifest:
    """A cohort manifest: ``df`` (pandas), ``path`` (where it lives), ``content_hash`` (provenance).

    Build one with :meth:`from_records` or load one with :meth:`load`; both validate columns,
    splits and leakage.
    """

    def __init__(self, df: pd.DataFrame, path: str | os.PathLike | None = None):
        self.df = df.reset_index(drop=True)
        self.path = Path(path) if path is not None else None
        self.validate()

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_records(cls, records: Sequence[dict], *, path: str | os.PathLike | None = None,
                     fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                     test_subjects: Iterable[str] | None = None) -> "Manifest":
        """Manifest from per-file records; assigns subject-level splits where ``split`` is missing."""
        df = pd.DataFrame.from_records(list(records))
        if "split" not in df.columns or df["split"].isna().any():
            splits = assign_splits(df, fractions, seed, test_subjects)
            df["split"] = df["split"].fillna(splits) if "split" in df.columns else splits
        df = df.sort_values(["cohort", "subject", "path"], kind="stable")
        return cls(df, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load and validate a manifest Parquet file (raises ``ValueError`` naming the file)."""
        path = Path(path)
        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot read manifest Parquet: {e}") from None
        try:
            return cls(df, path)
        except ValueError as e:
            raise type(e)(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically (temporary file + ``os.replace``); returns the path."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("path: no path given and the manifest was not loaded from a file")
        self.validate()
        _atomic_write_parquet(self.df, path)
        self.path = path
        return path

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check required columns, split values, uniqueness of files and subject-level splits."""
        missing = [c for c in REQUIRED_COLUMNS if c not in self.df.columns]
        if missing:
            raise ValueError(f"manifest is missing columns {missing}; required: {list(REQUIRED_COLUMNS)}")
        bad = sorted(set(self.df["split"].astype(str)) - set(SPLITS))
        if bad:
            raise ValueError(f"split values {bad} are not allowed; allowed values: {list(SPLITS)}")
        dup = self.df["path"].duplicated()
        if dup.any():
            raise ValueError(f"files listed twice: {self.df.loc[dup, 'path'].tolist()[:5]}")
        self.check_leakage()

    def check_leakage(self) -> None:
        """Raise :class:`LeakageError` if a subject's rows fall into more than one split.

        In particular a subject held out for downstream testing (``test``) can never also have a
        run in ``train`` or ``val``.
        """
        if self.df.empty:
            return
        n_splits = self.df.groupby(["cohort", "subject"])["split"].nunique()
        leaking = n_splits[n_splits > 1]
        if len(leaking):
            keys = [f"{c}/{s}" for c, s in leaking.index[:5]]
            raise LeakageError(f"{len(leaking)} subject(s) appear in more than one split (e.g. {keys}); "
                               "downstream test subjects must never be in a pre-training split")

    # ------------------------------------------------------------------ accessors
    @property
    def root(self) -> Path:
        """Folder that relative ``path`` entries are resolved against."""
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, rel: str) -> Path:
        """Absolute path of a manifest ``path`` entry."""
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    @property
    def content_hash(self) -> str:
        """SHA-256 over the sorted (cohort, subject, split, frames, TR, file content hash, labels) rows.

        Independent of row order, file locations and compression codec, so it identifies the data a
        run saw; results record it as provenance.
        """
        cols = [c for c in self.df.columns if c != "path"]
        df = self.df[sorted(cols)].sort_values(["cohort", "subject", "content_sha256"], kind="stable")
        h = hashlib.sha256()
        h.update("|".join(sorted(cols)).encode())
        for row in df.itertuples(index=False):
            h.update(repr(tuple(_canon(v) for v in row)).encode())
        return h.hexdigest()[:16]

    def subjects(self, splits: Sequence[str] | str | None = None) -> set[str]:
        """``cohort/subject`` keys in the given split(s) (all when None)."""
        df = self.df if splits is None else self.df[self.df["split"].isin([splits] if isinstance(splits, str)
                                                                           else list(splits))]
        return set((df["cohort"].astype(str) + "/" + df["subject"].astype(str)).tolist())

    def cohorts(self) -> list[str]:
        """Sorted cohort names."""
        return sorted(self.df["cohort"].astype(str).unique().tolist())

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        counts = self.df["split"].value_counts().to_dict() if len(self.df) else {}
        return f"Manifest({len(self.df)} files, cohorts={self.cohorts()}, splits={counts}, hash={self.content_hash})"


def _canon(v):
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else round(float(v), 9)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def concat(manifests: Sequence[Manifest], path: str | os.PathLike | None = None) -> Manifest:
    """Concatenate manifests (paths made absolute); validation re-runs the leakage guard."""
    dfs = []
    for m in manifests:
        d = m.df.copy()
        d["path"] = [str(m.resolve(p)) for p in d["path"]]
        dfs.append(d)
    return Manifest(pd.concat(dfs, ignore_index=True), path)
