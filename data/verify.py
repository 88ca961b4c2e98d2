"""Pre-flight verification of the subject files a set of runs will read, before any of them starts.

A study that meets a corrupt subject file mid-training fails every trial that reads it, one traceback each.
:func:`verify` opens every file the given data views select, in one pass, and returns one
:class:`Problem` per bad file, naming it and what is wrong:

* the file is missing, is not readable HDF5 (truncated, corrupt), or is not a complete NeuroX subject file;
* its frame count or TR disagrees with the manifest;
* its brain box does not fit a view's model grid, or its run is shorter than one window of a view;
* its first window or its last frame cannot be decoded;
* ``depth="full"``: some frame cannot be decoded, or the stored data no longer hash to ``content_sha256``.

``depth="auto"`` (the default) is ``"full"`` when the selected files total at most :data:`FULL_CHECK_BYTES`
(the synthetic cohorts, small real ones: a full read is cheap) and ``"quick"`` otherwise; ``$NEUROX_VERIFY``
(``quick`` / ``full`` / ``off``) overrides it.

A *view* is what one run reads: a dict of :class:`data.datasets.WindowedDataset` arguments (``split``,
``sequence_length``, ``stride_within``, ``grid``, ``target``, ``cohorts``, ``max_subjects``, ``target_tr``).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from data.manifest import Manifest, stable_fraction
from data.subject_file import SubjectFileError, SubjectReader
from data.transforms import grid_placement

#: ``depth="auto"`` reads every frame (and checks the content hash) up to this many bytes of subject files
FULL_CHECK_BYTES = 512 * 2 ** 20
DEPTHS = ("auto", "quick", "full", "off")
ENV = "NEUROX_VERIFY"


@dataclass(frozen=True)
class Problem:
    """One bad subject file: its absolute path and what is wrong with it (without the path)."""

    path: str
    what: str
    #: ``True`` when the file is sound but does not suit a view (brain box larger than the grid, run shorter than a
    #: window): a configuration mismatch more often than a bad file, and no run can skip it
    structural: bool = False


@dataclass
class Report:
    """Result of :func:`verify`."""

    manifest: str
    files: int = 0
    bytes: int = 0
    depth: str = "quick"
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    #: files each view selects, in the order of the views given (0: the view reads nothing, e.g. no ``val`` split)
    view_files: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _strip(path: str, msg: str) -> str:
    for prefix in (f"{path}: ", f"{Path(path).name}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def select_rows(manifest: Manifest, view: Mapping[str, Any]):
    """The manifest rows a :class:`~data.datasets.WindowedDataset` with these arguments reads (same rules)."""
    split = view.get("split", "train")
    splits = [split] if isinstance(split, str) else list(split)
    df = manifest.df[manifest.df["split"].isin(splits)]
    target = view.get("target")
    if target is not None and target in df.columns:
        df = df[df[target].notna()]
    cohorts = view.get("cohorts")
    if cohorts:
        names = [k for k, w in cohorts.items() if float(w) > 0] if isinstance(cohorts, Mapping) else list(cohorts)
        df = df[df["cohort"].isin(names)]
    n = view.get("max_subjects")
    if n is not None:
        keys = df["cohort"].astype(str) + "/" + df["subject"].astype(str)
        seed = int(view.get("subject_seed", 0))
        uniq = sorted(set(keys), key=lambda k: (stable_fraction(k, seed), k))
        df = df[keys.isin(set(uniq[:n]))]
    return df


def _content_hash(r: SubjectReader) -> str:
    """``content_sha256`` recomputed from the stored data (the recipe of :func:`data.subject_file.write_subject`)."""
    i = r.info
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(r.read_frames(0, i.n_frames)).tobytes())
    h.update(np.packbits(r.mask).tobytes())
    h.update(repr((float(i.tr), tuple(i.crop_offset), tuple(i.crop_shape), i.value_offset, i.value_scale)).encode())
    return h.hexdigest()


def _check_file(path: str, row, views: Sequence[Mapping[str, Any]], full: bool) -> list[Problem]:
    try:
        r = SubjectReader(path)
    except SubjectFileError as e:
        return [Problem(path, _strip(path, str(e)))]
    try:
        i = r.info
        if i.n_frames != int(row["n_frames"]):
            return [Problem(path, f"has {i.n_frames} frames but the manifest says {int(row['n_frames'])}")]
        if not math.isclose(i.tr, float(row["tr"]), rel_tol=1e-4):
            return [Problem(path, f"TR {i.tr} s disagrees with the manifest's {float(row['tr'])} s")]
        out = []
        for v in views:
            grid = v.get("grid")
            if grid is not None:
                try:
                    grid_placement(i.crop_shape, grid, path)
                except ValueError as e:
                    out.append(Problem(path, _strip(path, str(e)), structural=True))
                    continue
            L, sw, ttr = int(v.get("sequence_length", 20)), int(v.get("stride_within", 1)), v.get("target_tr")
            span = (L - 1) * sw + 1 if ttr is None else math.floor((L - 1) * sw * ttr / i.tr) + 1
            if span > i.n_frames:
                out.append(Problem(path, f"run of {i.n_frames} frames (TR {i.tr} s) is shorter than one window "
                                         f"(sequence_length={L}, stride_within={sw}"
                                         + (f", target_tr={ttr}" if ttr else "") + ")", structural=True))
        if out:
            return out[:1]
        if full:
            if _content_hash(r) != i.content_sha256:
                return [Problem(path, "stored data do not match the file's content_sha256 (corrupt or modified)")]
        else:
            span = min(i.n_frames, max((int(v.get("sequence_length", 20)) - 1) * int(v.get("stride_within", 1)) + 1
                                       for v in views) if views else 1)
            r.read_frames(0, span)
            r.read_frames(i.n_frames - 1, i.n_frames)
            _ = r.mask
    except SubjectFileError as e:
        return [Problem(path, _strip(path, str(e)))]
    except (OSError, RuntimeError, KeyError) as e:
        return [Problem(path, f"cannot read ({type(e).__name__}: {e})")]
    finally:
        r.close()
    return []


def verify(manifest: str | os.PathLike | Manifest, views: Iterable[Mapping[str, Any]] = ({"split": ("train", "val",
           "test")},), *, depth: str = "auto") -> Report:
    """Check every subject file that ``views`` select from ``manifest``; never raises for a bad subject file.

    Parameters
    ----------
    manifest : path or Manifest
        The cohort manifest (a bad manifest raises ``ValueError`` naming it, as :meth:`Manifest.load` does).
    views : iterable of dict
        What each run reads (``WindowedDataset`` arguments); files are opened once whatever the number of views.
    depth : {"auto", "quick", "full", "off"}
        See the module docstring; ``$NEUROX_VERIFY`` overrides ``"auto"``.

    Returns
    -------
    Report
        ``problems`` lists one :class:`Problem` per bad file, in manifest order.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth={depth!r}; allowed values: {list(DEPTHS)}")
    if depth == "auto" and os.environ.get(ENV):
        depth = os.environ[ENV]
        if depth not in DEPTHS:
            raise ValueError(f"${ENV}={depth!r}; allowed values: {list(DEPTHS)}")
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    report = Report(manifest=str(m.path) if m.path is not None else "<manifest>")
    views = [dict(v) for v in views]
    if depth == "off":
        report.depth = "off"
        report.view_files = [len(select_rows(m, v)) for v in views]
        return report
    t0 = time.perf_counter()
    per_path: dict[str, tuple[Any, list[dict]]] = {}
    for v in views:
        rows = select_rows(m, v)
        report.view_files.append(len(rows))
        for row in rows.itertuples(index=False):
            p = str(m.resolve(row.path))
            per_path.setdefault(p, (row._asdict(), []))[1].append(v)
    sizes = {p: (os.path.getsize(p) if os.path.exists(p) else 0) for p in per_path}
    report.files, report.bytes = len(per_path), sum(sizes.values())
    if depth == "auto":
        depth = "full" if report.bytes <= FULL_CHECK_BYTES else "quick"
    report.depth = depth
    for p, (row, vs) in per_path.items():
        uniq = list({repr(sorted(v.items(), key=str)): v for v in vs}.values())
        report.problems += _check_file(p, row, uniq, depth == "full")
    report.seconds = time.perf_counter() - t0
    return report
