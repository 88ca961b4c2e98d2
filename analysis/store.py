"""Append-only Parquet results store shared by ``study`` (writer) and ``analysis`` (reader).

Layout (see ``docs/CONTRACTS.md``)::

    <storage>/<study>/store/<table>/part-<seq>-<writer>.parquet

* Every :meth:`ResultsStore.append` writes **one new part file** atomically: the rows go to a hidden
  temporary file (``.tmp-...``, ignored by readers and by ``pandas.read_parquet``) that is then
  renamed with :func:`os.replace`. A reader therefore sees either all rows of an append or none.
* Every row gets a ``_seq`` stamp (int64, strictly increasing within a process and following
  ``time.time_ns()`` across processes) and a ``_writer`` token (random per process), so
  ``(_writer, _seq)`` identifies a row write uniquely.
* Readers concatenate the parts (the union of their columns: new columns may appear at any time)
  and keep, per key, the row with the largest ``(_seq, _writer)``: a row re-emitted after a resume
  replaces the earlier one.
* :meth:`ResultsStore.compact` merges the parts it sees into one part (rows keep their stamps) and
  then deletes exactly the parts it merged, so appends that race with it are never lost.

Read a table in one line::

    df = read_table("runs/my_study/store", "train")          # deduplicated, pandas DataFrame
    raw = pd.read_parquet("runs/my_study/store/train")        # raw parts (no dedup; same schema only)
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["TABLE_KEYS", "ResultsStore", "read_table", "append_rows"]

#: Key columns per known table; rows with equal keys replace each other (largest ``_seq`` wins).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("run_id", "step"),
    "finetune": ("run_id", "task", "strategy", "repeat"),
    "finetune_steps": ("run_id", "step"),
    "benchmark": ("name", "config", "device", "device_count"),
}

SEQ_COL = "_seq"
WRITER_COL = "_writer"
INTERNAL_COLS = (SEQ_COL, WRITER_COL)

_WRITER_TOKEN: str | None = None
_WRITER_PID: int | None = None
_LAST_SEQ = 0
_SEQ_LOCK = threading.Lock()
_PART_COUNTER = itertools.count()


def _writer_token() -> str:
    """A random token per process (regenerated after ``fork``)."""
    global _WRITER_TOKEN, _WRITER_PID
    pid = os.getpid()
    if _WRITER_TOKEN is None or _WRITER_PID != pid:
        _WRITER_TOKEN = f"{pid:x}-{uuid.uuid4().hex[:12]}"
        _WRITER_PID = pid
    return _WRITER_TOKEN


def _next_seqs(n: int) -> np.ndarray:
    """Reserve ``n`` consecutive stamps, strictly above every stamp this process handed out."""
    global _LAST_SEQ
    with _SEQ_LOCK:
        start = max(time.time_ns(), _LAST_SEQ + 1)
        _LAST_SEQ = start + max(n, 1) - 1
    return np.arange(start, start + n, dtype=np.int64)


def _jsonify_cell(v):
    if isinstance(v, (dict, list, tuple, set)):
        return json.dumps(v if not isinstance(v, set) else sorted(v), sort_keys=True, default=str)
    return v


def _to_frame(rows: "Sequence[Mapping] | pd.DataFrame") -> pd.DataFrame:
    if isinstance(rows, pd.DataFrame):
        df = rows.reset_index(drop=True).copy()
    elif isinstance(rows, Mapping):
        df = pd.DataFrame([dict(rows)])
    else:
        rows = list(rows)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise ValueError(f"rows[{i}] is a {type(r).__name__}; expected a dict (or pass a DataFrame)")
        df = pd.DataFrame([dict(r) for r in rows])
    for col in df.columns:
        if not isinstance(col, str):
            raise ValueError(f"column names must be strings, got {col!r}")
        if df[col].dtype == object:
            # nested values (package_versions, lists) are stored as JSON strings: Parquet needs one type
            df[col] = df[col].map(_jsonify_cell)
    return df


class ResultsStore:
    """A directory of append-only Parquet tables.

    Parameters
    ----------
    root : str or Path
        The store directory (``<storage>/<study>/store``); created on first append.
    keys : dict, optional
        Extra or overriding key columns per table name (defaults: :data:`TABLE_KEYS`). Tables without
        a key keep every row (only exact duplicates of one write are dropped).
    """

    def __init__(self, root: str | os.PathLike, keys: Mapping[str, Sequence[str]] | None = None):
        self.root = Path(root)
        self.keys = dict(TABLE_KEYS)
        if keys:
            self.keys.update({k: tuple(v) for k, v in keys.items()})

    # ------------------------------------------------------------------ paths
    def table_dir(self, table: str) -> Path:
        """Directory holding the part files of ``table``."""
        if not table or "/" in table or table.startswith((".", "_")):
            raise ValueError(f"table name {table!r} is invalid: use a plain name such as 'train'")
        return self.root / table

    def parts(self, table: str) -> list[Path]:
        """The committed part files of ``table`` (sorted by name; temporary files are excluded)."""
        d = self.table_dir(table)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")

    def tables(self) -> list[str]:
        """Names of the tables that have at least one part."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.parts(p.name))

    # ------------------------------------------------------------------ write
    def _write_part(self, table: str, df: pd.DataFrame, tag: str) -> Path:
        d = self.table_dir(table)
        d.mkdir(parents=True, exist_ok=True)
        try:
            arrow = pa.Table.from_pandas(df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"table {table!r}: rows cannot be stored in Parquet ({exc}); "
                             "give each column a single type") from exc
        name = f"part-{int(df[SEQ_COL].max()) if len(df) else time.time_ns():020d}-{tag}-" \
               f"{_writer_token()}-{next(_PART_COUNTER)}.parquet"
        tmp = d / f".tmp-{uuid.uuid4().hex}-{name}"
        try:
            pq.write_table(arrow, tmp)
            os.replace(tmp, d / name)
        finally:
            if tmp.exists():
                tmp.unlink()
        return d / name

    def append(self, table: str, rows: "Sequence[Mapping] | pd.DataFrame") -> int:
        """Append rows to ``table`` as one new atomically written part file.

        Parameters
        ----------
        table : str
            Table name (``train``, ``finetune``, ``benchmark`` or any other plain name).
        rows : list of dict or pandas.DataFrame
            The rows. Dict/list cells are stored as JSON strings. Columns may differ between appends.

        Returns
        -------
        int
            Number of rows written.

        Raises
        ------
        ValueError
            If a key column of the table is missing or null, or a column mixes incompatible types.
        """
        df = _to_frame(rows)
        if df.empty:
            return 0
        for k in self.keys.get(table, ()):
            if k not in df.columns:
                raise ValueError(f"table {table!r}: key column {k!r} missing; the key is {self.keys[table]}")
            if df[k].isna().any():
                raise ValueError(f"table {table!r}: key column {k!r} has missing values")
        for c in INTERNAL_COLS:
            if c in df.columns:
                df = df.drop(columns=c)
        df[SEQ_COL] = _next_seqs(len(df))
        df[WRITER_COL] = _writer_token()
        self._write_part(table, df, "a")
        return len(df)

    # ------------------------------------------------------------------ read
    def _read_parts(self, parts: Iterable[Path]) -> tuple[pd.DataFrame, list[Path]]:
        frames, used = [], []
        for p in parts:
            try:
                frames.append(pd.read_parquet(p))
            except FileNotFoundError:  # merged and deleted by a concurrent compaction: its rows live on
                continue
            used.append(p)
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(), used
        return pd.concat(frames, ignore_index=True, sort=False), used

    def _dedup(self, table: str, df: pd.DataFrame) -> pd.DataFrame:
        if df.empty:
            return df
        df = df.sort_values([SEQ_COL, WRITER_COL], kind="stable")
        df = df.drop_duplicates(subset=[SEQ_COL, WRITER_COL], keep="last")
        keys = [k for k in self.keys.get(table, ()) if k in df.columns]
        if keys:
            df = df.drop_duplicates(subset=keys, keep="last")
        return df.reset_index(drop=True)

    def read(self, table: str, *, internal: bool = False) -> pd.DataFrame:
        """Read ``table``: all parts concatenated, the last row (largest ``_seq``) kept per key.

        Parameters
        ----------
        table : str
            Table name.
        internal : bool
            Keep the ``_seq`` and ``_writer`` columns.

        Returns
        -------
        pandas.DataFrame
            Rows in write order; an empty frame if the table does not exist.
        """
        for _ in range(100):
            parts = self.parts(table)
            df, used = self._read_parts(parts)
            if len(used) == len(parts):
                break
            # a part vanished while reading: a compaction merged it, and its merged part (written
            # before the deletion) is in the next listing
        else:  # pragma: no cover - needs 100 compactions racing one read
            raise RuntimeError(f"table {table!r}: parts kept vanishing while reading (compaction storm?)")
        df = self._dedup(table, df)
        if not internal and not df.empty:
            df = df.drop(columns=[c for c in INTERNAL_COLS if c in df.columns])
        return df

    def compact(self, table: str) -> int:
        """Merge the current parts of ``table`` into one part; delete only the parts merged.

        Safe against concurrent appends (new parts are left alone) and concurrent compactions
        (rows are deduplicated by their write stamp, so a row present twice is counted once).

        Returns
        -------
        int
            Number of parts merged and deleted (0 if there was at most one part).
        """
        snapshot = self.parts(table)
        if len(snapshot) <= 1:
            return 0
        df, used = self._read_parts(snapshot)
        if not used:
            return 0
        df = self._dedup(table, df)
        if not df.empty:
            self._write_part(table, df, "c")
        for p in used:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return len(used)


def read_table(store_dir: str | os.PathLike, table: str = "train", **kwargs) -> pd.DataFrame:
    """Read one table of a results store (last row per key). See :meth:`ResultsStore.read`."""
    return ResultsStore(store_dir).read(table, **kwargs)


def append_rows(store_dir: str | os.PathLike, table: str, rows) -> int:
    """Append rows to one table of a results store. See :meth:`ResultsStore.append`."""
    return ResultsStore(store_dir).append(table, rows)
