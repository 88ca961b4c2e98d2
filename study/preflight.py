"""Pre-flight check of a study's data, run by every study entry point before any trial starts.

A corrupt subject file met inside a study used to fail every trial that read it (48 tracebacks, "rerun the
same command"); :func:`study.runner.check_plan` / :func:`check_specs` open every subject file the runs will read
(:func:`data.verify.verify`) and stop the study with one line per bad file, naming it and what to do::

    error: /data/cohort/sub-07.h5: not a readable HDF5 file (truncated or corrupt?): ...; fix or remove it from
    /data/cohort/manifest.parquet

When every run has ``bad_data="skip"`` (``--bad-data skip``) a bad file is a one-line warning instead, and
:func:`study.runner.run_plan` records it in the study's quarantine list (:mod:`data.quarantine`), so every run skips
its windows from the start (:func:`quarantine_found`). A file that is sound but does not suit the runs (brain box
larger than the grid, run shorter than a window) always stops the study: no run could skip it.

The entry points call :func:`study.runner.check_plan` before ``study.runner.run_plan`` (the manifest is resolved there; the study's
store, where the quarantine list lives, is known only inside ``run_plan``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Sequence

#: bad files named one per line before "... and N more"
MAX_LINES = 10

#: what the last check of each manifest (absolute path) found under the skip policy: recorded in the study's
#: quarantine list by :func:`quarantine_found` once ``run_plan`` knows the study's store
_SKIPPED: dict[str, list] = {}

SKIP_HINT = "or rerun with --bad-data skip to quarantine it and train without it"


class BadDataFiles(ValueError):
    """Subject files the study would read are unusable; ``str()`` is the message, one file per line."""


def views_of(specs: Iterable[Any]) -> list[dict]:
    """What the runs read, as :class:`data.datasets.WindowedDataset` arguments (the rules of
    ``study.train.build_datasets`` and ``study.finetune_engine``), one dict per distinct view."""
    out: dict[str, dict] = {}
    for s in specs:
        common = dict(sequence_length=s.sequence_length, stride_within=s.stride_within, grid=tuple(s.grid),
                      target=s.target)
        cohorts = dict(s.cohorts) or None
        views = [dict(split="train", cohorts=cohorts, max_subjects=s.n_subjects, **common)]
        if s.task == "finetune":
            views += [dict(split=sp, cohorts=cohorts, **common) for sp in ("val", "test")]
        else:
            views += [dict(split="val", cohorts=None, **common)]
        for v in views:
            out.setdefault(repr(sorted(v.items(), key=str)), v)
    return list(out.values())


def _split_name(view: dict) -> str:
    sp = view.get("split")
    return repr(sp) if isinstance(sp, str) else repr("+".join(sp))


def format_problems(problems: Sequence[Any], manifest: str) -> str:
    """One line per bad file (at most :data:`MAX_LINES`); files that do not suit the runs grouped by problem."""
    lines = []
    bad = [p for p in problems if not p.structural]
    for p in bad[:MAX_LINES]:
        lines.append(f"{p.path}: {p.what}; fix or remove it from {manifest}, {SKIP_HINT}")
    if len(bad) > MAX_LINES:
        lines.append(f"... and {len(bad) - MAX_LINES} more unusable subject file(s) listed in {manifest}")
    groups: dict[str, list] = {}
    for p in problems:
        if p.structural:
            groups.setdefault(p.what.split(";")[0].split("(")[0], []).append(p)
    for ps in groups.values():
        more = f" (and {len(ps) - 1} other file(s) of {manifest})" if len(ps) > 1 else ""
        lines.append(f"{ps[0].path}: {ps[0].what}{more}; change the runs' settings or remove it from {manifest}")
    return "\nerror: ".join(lines)


def check_specs(specs: Sequence[Any], manifest: str, *, out=None) -> None:
    """Verify every subject file ``specs`` read from ``manifest``; raise :class:`BadDataFiles` naming them.

    ``ValueError`` (a :class:`BadDataFiles` or a bad manifest) is what the entry points turn into
    ``error: ...`` and exit code 2.
    """
    from data.verify import verify

    views = views_of(specs)
    report = verify(manifest, views)
    empty = sorted({_split_name(v) for v, n in zip(views, report.view_files) if n == 0})
    if empty:  # trains to "finished" with val_loss NaN (or fine-tunes with no test subjects) otherwise
        raise BadDataFiles(f"{report.manifest}: the runs read the {' and '.join(empty)} split(s), which select no "
                           "subject file (after the runs' cohort and label filters); give the manifest subjects in "
                           "them (data.convert --fractions TRAIN VAL TEST) or use another manifest")
    if report.depth == "off":
        return
    print(f"data: {report.files} subject file(s) checked ({report.depth}) in {report.seconds:.1f} s",
          file=out or sys.stdout,
          flush=True)
    if report.ok:
        return
    skip = bool(specs) and all(getattr(s, "bad_data", "stop") == "skip" for s in specs)
    if skip and not any(p.structural for p in report.problems):
        for p in report.problems:
            print(f"warning: {p.path}: {p.what}; quarantined: the runs skip its windows (bad_data='skip')",
                  file=sys.stderr)
        _SKIPPED[_key(manifest)] = list(report.problems)
        return
    raise BadDataFiles(format_problems(report.problems, report.manifest))


def _key(manifest) -> str:
    return os.path.abspath(str(manifest))


def quarantine_found(quarantine, manifest) -> int:
    """Record in ``quarantine`` (:class:`data.quarantine.Quarantine`) the bad files the last skip-policy check of
    ``manifest`` found and the list does not already hold unchanged; returns how many were recorded."""
    held = quarantine.skipped_paths()
    n = 0
    for p in _SKIPPED.pop(_key(manifest), []):
        if os.path.abspath(p.path) not in held:
            quarantine.record(p.path, p.what, found_by="preflight", policy="skip")
            n += 1
    return n
