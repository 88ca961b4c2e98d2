"""Converters to the subject-file format: NIfTI files, BIDS/fMRIPrep derivatives, legacy SwiFT ``.pt`` frames.

Every converter runs in parallel over subjects, writes each file atomically (temporary name,
``os.replace``), skips subjects whose output is complete and whose source fingerprint (paths, sizes,
mtimes, options) is unchanged, writes a manifest of every subject that converted, prints a summary
of failures and returns a non-zero exit status from the CLI if any subject failed::

    python -m data.convert nifti  --out OUT  a.nii.gz b.nii.gz [--tr 2.0] [--labels labels.csv]
    python -m data.convert bids   --out OUT  /data/derivatives/fmriprep [--space MNI152NLin2009cAsym]
    python -m data.convert legacy --out OUT  /data/legacy_root --labels labels.csv --tr 0.72

(also installed as ``neurox-convert``). Brain masks: a BIDS ``*_desc-brain_mask`` next to the BOLD
file when present; otherwise ``mean(t) > 0.2 * p98(mean(t))`` for NIfTI, and "differs from the
corner background value in some frame" for legacy frames (SwiFT wrote background-filled volumes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from data.manifest import MANIFEST_NAME, Manifest
from data.subject_file import CODECS, DEFAULT_CODEC, SubjectFileError, is_complete, read_info, write_subject

BIDS_PATTERN = "*_space-{space}*_desc-preproc_bold.nii*"


@dataclass
class Job:
    """One subject (run) to convert."""

    subject: str
    cohort: str
    sources: list[str]
    out: str
    kind: str                     # "nifti" | "legacy"
    tr: float | None = None
    mask: str | None = None
    labels: dict = field(default_factory=dict)


@dataclass
class ConversionResult:
    """What a conversion did: manifest path, counts, and ``(subject, error)`` failures."""

    manifest: Path | None
    converted: int
    skipped: int
    failures: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------------------- loading
def _fingerprint(sources: Sequence[str], options: dict) -> str:
    h = hashlib.sha256()
    for s in sources:
        st = os.stat(s)
        h.update(f"{os.path.abspath(s)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _auto_mask(bold_XYZT: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """``mean(t) > frac * p98(mean(t))``; voxels with NaN/Inf are kept so that validation reports them."""
    bad = ~np.all(np.isfinite(bold_XYZT), axis=3)
    mean = np.where(bad, 0.0, bold_XYZT.mean(axis=3, where=~bad[..., None]) if bad.any() else bold_XYZT.mean(axis=3))
    return (mean > frac * np.percentile(mean, 98)) | bad


def _resample(bold_XYZT: np.ndarray, mask: np.ndarray, affine: np.ndarray, shape: Sequence[int]):
    from scipy import ndimage

    zoom = [s / o for s, o in zip(shape, bold_XYZT.shape[:3])]
    out = np.stack([ndimage.zoom(bold_XYZT[..., t], zoom, order=1) for t in range(bold_XYZT.shape[3])], axis=-1)
    m = ndimage.zoom(mask.astype(np.float32), zoom, order=1) > 0.5
    # ndimage.zoom (grid_mode=False) aligns corner voxel centres: in_index = out_index * (in - 1) / (out - 1)
    step = [(o - 1) / (s - 1) if s > 1 else 1.0 for s, o in zip(shape, bold_XYZT.shape[:3])]
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] @ np.diag(step)
    return out.astype(np.float32), m, aff


#: the longest TR (seconds) a converter accepts: fMRI TRs are ~0.3-4 s; a header TR of 2000 "seconds" is milliseconds
MAX_TR_S = 100.0


def load_nifti(path: str, tr: float | None = None, mask_path: str | None = None):
    """``(bold_XYZT float32, mask_XYZ bool, affine, tr)`` from a 4-D NIfTI (errors name the file)."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:
        raise SubjectFileError(f"{path}: cannot read NIfTI: {e}") from None
    if img.ndim != 4:
        raise SubjectFileError(f"{path}: NIfTI is {img.ndim}-D with shape {img.shape}; a 4-D (X, Y, Z, T) "
                               "BOLD series is required")
    if tr is None:
        zt = float(img.header.get_zooms()[3])
        unit = img.header.get_xyzt_units()[1]
        tr = zt / 1000.0 if unit == "msec" else zt / 1e6 if unit == "usec" else zt
        if not tr > 0:
            raise SubjectFileError(f"{path}: header has no TR (pixdim[4] = {zt}); pass --tr")
        if tr > MAX_TR_S:
            raise SubjectFileError(f"{path}: header TR {zt:g} with time unit {unit!r} means {tr:g} s, implausible "
                                   f"for fMRI (> {MAX_TR_S:g} s; milliseconds labelled as seconds?); pass --tr "
                                   "in seconds")
    elif not 0 < tr <= MAX_TR_S:
        raise SubjectFileError(f"{path}: --tr {tr:g} is not a TR in seconds (0 < TR <= {MAX_TR_S:g})")
    bold = np.asarray(img.dataobj, dtype=np.float32)
    if mask_path:
        m = nib.load(mask_path)
        if m.shape[:3] != img.shape[:3]:
            raise SubjectFileError(f"{mask_path}: mask shape {m.shape} differs from BOLD {img.shape[:3]} of {path}")
        mask = np.asarray(m.dataobj).reshape(m.shape[:3]) > 0
    else:
        mask = _auto_mask(bold)
    return bold, mask, np.asarray(img.affine, dtype=np.float64), float(tr)


_FRAME_RE = re.compile(r"frame_(\d+)\.pt$")


def legacy_frames(subject_dir: str | os.PathLike) -> list[str]:
    """Sorted ``frame_<t>.pt`` paths of a legacy subject folder (numeric order)."""
    files = [(int(m.group(1)), str(p)) for p in Path(subject_dir).iterdir() if (m := _FRAME_RE.search(p.name))]
    return [p for _, p in sorted(files)]


def load_legacy(frames: Sequence[str]):
    """``(bold_XYZT float32, mask_XYZ bool)`` from legacy per-frame ``.pt`` files."""
    import torch

    vols = []
    for f in frames:
        try:
            v = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SubjectFileError(f"{f}: cannot load legacy frame: {e}") from None
        v = v.squeeze()
        if v.ndim != 3:
            raise SubjectFileError(f"{f}: legacy frame has shape {tuple(v.shape)}, expected a 3-D volume")
        if vols and tuple(v.shape) != vols[0].shape:
            raise SubjectFileError(f"{f}: frame shape {tuple(v.shape)} differs from {vols[0].shape}")
        vols.append(v.to(torch.float32).numpy())
    if not vols:
        raise SubjectFileError("no frame_<t>.pt files")
    bold = np.stack(vols, axis=-1)
    bg = bold[0, 0, 0, 0]
    mask = np.any(bold != bg, axis=3)
    bold = np.where(mask[..., None], bold, 0.0).astype(np.float32)
    return bold, mask


def _run_job(args: tuple) -> tuple[str, str, dict | None, str | None]:
    job, opts = args
    try:
        fp = _fingerprint(job.sources + ([job.mask] if job.mask else []), dict(opts, tr=job.tr, kind=job.kind))
        if is_complete(job.out, fp):
            info = read_info(job.out)
            status = "skipped"
        else:
            if job.kind == "nifti":
                bold, mask, affine, tr = load_nifti(job.sources[0], job.tr, job.mask)
            else:
                if job.tr is None:
                    raise SubjectFileError(f"{job.subject}: legacy frames carry no TR; pass --tr")
                bold, mask = load_legacy(job.sources)
                affine, tr = np.eye(4), job.tr
            if opts.get("resample_to"):
                bold, mask, affine = _resample(bold, mask, affine, opts["resample_to"])
            info = write_subject(job.out, bold, mask, tr=tr, affine=affine, subject=job.subject, cohort=job.cohort,
                                 codec=opts["codec"], source_fingerprint=fp, extra_attrs=job.labels,
                                 source_name=job.sources[0] if job.kind == "nifti" else job.subject)
            status = "converted"
        rec = dict(subject=job.subject, cohort=job.cohort, path=job.out, n_frames=info.n_frames, tr=info.tr,
                   content_sha256=info.content_sha256, **job.labels)
        return job.subject, status, rec, None
    except Exception as e:  # one subject's failure must not stop the others
        msg = str(e) if isinstance(e, (SubjectFileError, ValueError)) else "".join(
            traceback.format_exception_only(type(e), e)).strip()
        return job.subject, "failed", None, msg


def run_jobs(jobs: Sequence[Job], out_dir: str | os.PathLike, *, codec: str = DEFAULT_CODEC, workers: int = 1,
             resample_to: Sequence[int] | None = None, seed: int = 0,
             fractions: Sequence[float] = (0.8, 0.1, 0.1), progress: bool = True,
             log: Callable[[str], None] = print) -> ConversionResult:
    """Convert ``jobs`` in parallel and write ``<out_dir>/manifest.parquet`` for those that succeeded."""
    from tqdm.auto import tqdm

    if codec not in CODECS:
        raise ValueError(f"codec={codec!r} is not supported; allowed values: {', '.join(CODECS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = dict(codec=codec, resample_to=tuple(resample_to) if resample_to else None)
    results = []
    bar = tqdm(total=len(jobs), desc="convert", unit="subj", disable=not progress)
    if workers <= 1:
        for j in jobs:
            results.append(_run_job((j, opts)))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as ex:
            for r in ex.map(_run_job, [(j, opts) for j in jobs]):
                results.append(r)
                bar.update()
    bar.close()
    records = [rec for _, st, rec, _ in results if rec is not None]
    failures = [(s, err) for s, st, _, err in results if st == "failed"]
    converted = sum(st == "converted" for _, st, _, _ in results)
    skipped = sum(st == "skipped" for _, st, _, _ in results)
    manifest_path = None
    if records:
        for r in records:
            r["path"] = os.path.relpath(r["path"], out_dir)
        manifest_path = Manifest.from_records(records, path=out_dir / MANIFEST_NAME, fractions=fractions,
                                              seed=seed).save()
    log(f"converted {converted}, skipped {skipped} (complete and unchanged), failed {len(failures)}")
    for s, err in failures:
        log(f"  FAILED {s}: {err}")
    return ConversionResult(manifest_path, converted, skipped, failures)


def _read_labels(path: str | None, id_col: str | None = None) -> dict[str, dict]:
    if not path:
        return {}
    sep = "\t" if str(path).endswith(".tsv") else ","
    head = pd.read_csv(path, sep=sep, nrows=0).columns
    col = id_col or ("participant_id" if "participant_id" in head else "subject" if "subject" in head else head[0])
    if col not in head:
        raise ValueError(f"{path}: id column {col!r} not found; columns: {list(head)}")
    df = pd.read_csv(path, sep=sep, dtype={col: str})
    df[col] = df[col].astype(str)
    out = {}
    for rec in df.to_dict("records"):
        key = rec.pop(col)
        out[key] = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()
                    if isinstance(v, (int, float, str, np.integer, np.floating))}
    return out


def _labels_for(labels: dict[str, dict], subject: str) -> dict:
    bare = subject[4:] if subject.startswith("sub-") else subject
    return labels.get(subject) or labels.get(bare) or labels.get(f"sub-{bare}") or {}


# ---------------------------------------------------------------------------------------- converters
def convert_nifti(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, cohort: str = "nifti",
                  tr: float | None = None, mask: str | None = None, labels: str | None = None,
                  **kw) -> ConversionResult:
    """Convert 4-D NIfTI files (subject id = file name without extension).

    Parameters
    ----------
    inputs : paths
        4-D NIfTI files (``.nii`` or ``.nii.gz``).
    out_dir : path
        Output folder (``<out_dir>/<cohort>/<subject>.h5`` and the manifest).
    cohort : str
        Cohort name.
    tr : float, optional
        TR override in seconds (default: the header's pixdim[4]).
    mask : path, optional
        A 3-D brain-mask NIfTI used for every input (default: automatic, see module doc).
    labels : path, optional
        CSV/TSV of phenotypes keyed by ``participant_id``/``subject``/first column.
    **kw
        Passed to :func:`run_jobs` (``codec``, ``workers``, ``resample_to``, ``seed``, ``progress``...).
    """
    lab = _read_labels(labels)
    jobs = []
    for p in inputs:
        name = Path(p).name
        subject = re.sub(r"\.nii(\.gz)?$", "", name)
        jobs.append(Job(subject=subject, cohort=cohort, sources=[str(p)], kind="nifti", tr=tr, mask=mask,
                        out=str(Path(out_dir) / cohort / f"{subject}.h5"), labels=_labels_for(lab, subject)))
    return run_jobs(jobs, out_dir, **kw)


_ENT = re.compile(r"(sub|ses|task|acq|run)-([A-Za-z0-9]+)")


def find_bids_runs(root: str | os.PathLike, space: str = "MNI152NLin2009cAsym") -> list[tuple[str, str, str | None, str]]:
    """``(subject, bold path, brain-mask path or None, run key)`` of fMRIPrep preprocessed runs under ``root``."""
    root = Path(root)
    out = []
    for bold in sorted(root.glob(f"sub-*/**/func/{BIDS_PATTERN.format(space=space)}")):
        ents = dict(_ENT.findall(bold.name))
        if "sub" not in ents:
            continue
        mask = None
        for ext in (".nii.gz", ".nii"):
            cand = bold.with_name(re.sub(r"_desc-preproc_bold\.nii(\.gz)?$", f"_desc-brain_mask{ext}", bold.name))
            if cand.exists():
                mask = str(cand)
                break
        run_key = "_".join(f"{k}-{ents[k]}" for k in ("ses", "task", "acq", "run") if k in ents)
        out.append((f"sub-{ents['sub']}", str(bold), mask, run_key))
    return out


def convert_bids(root: str | os.PathLike, out_dir: str | os.PathLike, *, cohort: str | None = None,
                 space: str = "MNI152NLin2009cAsym", participants: str | None = None, tr: float | None = None,
                 **kw) -> ConversionResult:
    """Convert an fMRIPrep derivatives tree (``sub-*/[ses-*/]func/*_space-<space>*_desc-preproc_bold.nii.gz``).

    Phenotypes come from ``participants.tsv`` (in ``root`` or its parent BIDS dataset, or
    ``participants``). TR is read from the sidecar JSON's ``RepetitionTime`` when present, else
    from the NIfTI header. All runs of one subject share the subject's split.
    """
    root = Path(root)
    cohort = cohort or root.name
    if participants is None:
        for cand in (root / "participants.tsv", root.parent / "participants.tsv", root.parent.parent / "participants.tsv"):
            if cand.exists():
                participants = str(cand)
                break
    lab = _read_labels(participants, "participant_id") if participants else {}
    runs = find_bids_runs(root, space)
    if not runs:
        raise ValueError(f"{root}: no runs match sub-*/[ses-*/]func/{BIDS_PATTERN.format(space=space)}")
    jobs = []
    for subject, bold, mask, run_key in runs:
        sidecar = Path(re.sub(r"\.nii(\.gz)?$", ".json", bold))
        run_tr = tr
        if run_tr is None and sidecar.exists():
            run_tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        name = f"{subject}_{run_key}" if run_key else subject
        jobs.append(Job(subject=subject, cohort=cohort, sources=[bold], kind="nifti", tr=run_tr, mask=mask,
                        out=str(Path(out_dir) / cohort / f"{name}.h5"), labels=_labels_for(lab, subject)))
    return run_jobs(jobs, out_dir, **kw)


def convert_legacy(root: str | os.PathLike, out_dir: str | os.PathLike, *, tr: float, cohort: str = "legacy",
                   labels: str | None = None, **kw) -> ConversionResult:
    """Convert the legacy SwiFT layout ``<root>/img/<subject>/frame_<t>.pt`` (+ a labels CSV).

    Parameters
    ----------
    root : path
        Folder holding ``img/``.
    out_dir : path
        Output folder.
    tr : float
        TR in seconds (the legacy layout does not record it).
    cohort : str
        Cohort name.
    labels : path, optional
        CSV with a ``subject`` (or first) column and phenotype columns.
    """
    img = Path(root) / "img"
    if not img.is_dir():
        raise ValueError(f"{root}: no 'img/' folder (expected <root>/img/<subject>/frame_<t>.pt)")
    lab = _read_labels(labels)
    jobs = []
    for d in sorted(p for p in img.iterdir() if p.is_dir()):
        frames = legacy_frames(d)
        jobs.append(Job(subject=d.name, cohort=cohort, sources=frames or [str(d)], kind="legacy", tr=tr,
                        out=str(Path(out_dir) / cohort / f"{d.name}.h5"), labels=_labels_for(lab, d.name)))
    return run_jobs(jobs, out_dir, **kw)


# ---------------------------------------------------------------------------------------- CLI
def _names_default(help_text: str | None) -> bool:
    """The help text already says its default (``... (default: X)``, ``default: X``)."""
    return any(k in (help_text or "") for k in ("(default", "default:"))


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written and every option's default (none shown for None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or _names_default(action.help):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``neurox-convert`` / ``python -m data.convert`` argument parser."""
    p = argparse.ArgumentParser(prog="neurox-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help)
    sub = p.add_subparsers(dest="kind", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="output folder (subject files + manifest.parquet)")
        sp.add_argument("--codec", default=DEFAULT_CODEC, choices=CODECS, help="compression of the BOLD data")
        sp.add_argument("--workers", type=int, default=1, help="parallel processes (subjects)")
        sp.add_argument("--resample-to", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="resample volumes to this grid before cropping")
        sp.add_argument("--seed", type=int, default=0, help="split seed")
        sp.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="subject-level split fractions (train, val, test), summing to 1")
        sp.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    s = sub.add_parser("nifti", help="4-D NIfTI files", formatter_class=_Help)
    s.add_argument("inputs", nargs="+", help="4-D NIfTI files (.nii, .nii.gz), one subject run each")
    s.add_argument("--cohort", default="nifti", help="cohort name written to the manifest")
    s.add_argument("--tr", type=float, default=None,
                   help="repetition time in seconds (default: from each file's header)")
    s.add_argument("--mask", default=None, help="3-D brain mask NIfTI for all inputs")
    s.add_argument("--labels", default=None, help="CSV/TSV of phenotypes")
    common(s)
    s = sub.add_parser("bids", help="fMRIPrep derivatives tree", formatter_class=_Help)
    s.add_argument("root", help="root of the fMRIPrep derivatives (sub-*/func/*_desc-preproc_bold.nii.gz)")
    s.add_argument("--cohort", default=None,
                   help="cohort name written to the manifest (default: the root's name)")
    s.add_argument("--space", default="MNI152NLin2009cAsym", help="template space of the runs to convert")
    s.add_argument("--participants", default=None, help="participants.tsv (default: found near root)")
    common(s)
    s = sub.add_parser("legacy", help="legacy SwiFT <root>/img/<subject>/frame_<t>.pt", formatter_class=_Help)
    s.add_argument("root", help="folder holding img/<subject>/frame_<t>.pt")
    s.add_argument("--tr", type=float, required=True,
                   help="repetition time in seconds (the frames do not store it)")
    s.add_argument("--cohort", default="legacy", help="cohort name written to the manifest")
    s.add_argument("--labels", default=None, help="CSV of phenotypes")
    common(s)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 if every subject converted (or was already complete), 1 otherwise."""
    a = build_parser().parse_args(argv)
    kw = dict(codec=a.codec, workers=a.workers, resample_to=a.resample_to, seed=a.seed, fractions=tuple(a.fractions),
              progress=not a.no_progress)
    try:
        if a.kind == "nifti":
            res = convert_nifti(a.inputs, a.out, cohort=a.cohort, tr=a.tr, mask=a.mask, labels=a.labels, **kw)
        elif a.kind == "bids":
            res = convert_bids(a.root, a.out, cohort=a.cohort, space=a.space, participants=a.participants, **kw)
        else:
            res = convert_legacy(a.root, a.out, tr=a.tr, cohort=a.cohort, labels=a.labels, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res.manifest:
        print(f"manifest: {res.manifest}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
