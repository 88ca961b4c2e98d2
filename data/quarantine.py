"""A study's quarantine list: the subject files found bad, recorded once so that no later trial rediscovers them.

Layout (beside the results store's tables, ignored by :mod:`analysis.store`, which only reads ``part-*.parquet``)::

    <storage>/<study>/store/quarantine/<sha1(path)[:16]>-<time_ns>-<pid>.json

One small JSON file per record, written to a hidden temporary file and renamed (:func:`os.replace`), as the results
store writes its parts: append-only, safe for many writers on a shared filesystem (every trial, every loader
worker), and a reader sees a record whole or not at all. Readers keep the newest record per file path.

A record says which file, what is wrong with it, who found it (``preflight`` or a run id) and under which policy:

* ``policy="skip"``: the file is quarantined; every run with ``bad_data="skip"`` skips its windows from the start
  (:class:`study.loop.PositionDataset`), and a resumed study does too;
* ``policy="stop"``: a run with ``bad_data="stop"`` met it and the study stopped; a rerun with the skip policy
  (``--bad-data skip``) skips it from the start as well.

A record also keeps the file's size and modification time: a file replaced or repaired since (either changed) is no
longer skipped. Delete ``quarantine/`` to forget every record.

Imports neither ``study`` nor ``analysis`` (the training path reads it; see ``tests/test_import_layering.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DIRNAME = "quarantine"
POLICIES = ("skip", "stop")


@dataclass(frozen=True)
class Entry:
    """One record: ``path`` (absolute), ``what`` is wrong, ``found_by`` (``preflight`` or a run id), ``policy``."""

    path: str
    what: str
    found_by: str
    policy: str
    time: float
    size: int = -1
    mtime_ns: int = -1

    def unchanged(self) -> bool:
        """The file still has the size and modification time it had when recorded (or is still missing)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self.size < 0
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


class Quarantine:
    """The quarantine list of the study whose results store is ``store_dir`` (picklable: loader workers and Ray
    workers get a copy)."""

    def __init__(self, store_dir: str | os.PathLike) -> None:
        self.store_dir = str(store_dir)

    @property
    def dir(self) -> Path:
        return Path(self.store_dir) / DIRNAME

    def record(self, path: str, what: str, *, found_by: str, policy: str) -> Entry:
        """Append one record (atomically) and return it."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; allowed values: {list(POLICIES)}")
        path = os.path.abspath(path)
        size, mtime_ns = _stat(path)
        e = Entry(path=path, what=str(what)[:1000], found_by=str(found_by), policy=policy, time=time.time(),
                  size=size, mtime_ns=mtime_ns)
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        name = f"{hashlib.sha1(path.encode()).hexdigest()[:16]}-{time.time_ns()}-{os.getpid()}.json"
        tmp = d / f".tmp-{name}"
        tmp.write_text(json.dumps(asdict(e)))
        os.replace(tmp, d / name)
        return e

    def entries(self) -> list[Entry]:
        """The newest record of every file, oldest first (an unreadable record is ignored)."""
        newest: dict[str, Entry] = {}
        if not self.dir.is_dir():
            return []
        for f in self.dir.glob("*.json"):
            if f.name.startswith("."):
                continue
            try:
                e = Entry(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if e.path not in newest or e.time >= newest[e.path].time:
                newest[e.path] = e
        return sorted(newest.values(), key=lambda e: e.time)

    def skipped_paths(self) -> set[str]:
        """Files a run with ``bad_data="skip"`` skips from the start: every recorded file that has not changed
        since it was recorded."""
        return {e.path for e in self.entries() if e.unchanged()}

    def found_since(self, t: float) -> list[Entry]:
        """Records made at or after ``time.time() == t`` (what this invocation of a study found)."""
        return [e for e in self.entries() if e.time >= t]
