"""Functional-connectivity features of subject files: parcel time series and connectivity vectors.

The inputs of the functional-connectivity (FC) baseline (:mod:`analysis.fc`)::

    labels_XYZ = load_parcellation(manifest)              # atlas over the cohort's original grid
    series_TP  = parcel_series(subject_path, labels_XYZ)  # mean raw signal per parcel, (T, P)
    X_NF, keep = subject_features(manifest, labels_XYZ)   # Fisher-z correlations, upper triangle

Shapes: ``T`` frames, ``P`` parcels, ``N`` subjects (rows of the manifest), ``F = P (P - 1) / 2`` edges.

Atlases (``atlas=``):

* ``"auto"`` (default): ``parcellation.npz`` next to the manifest when present (put a cohort's atlas there),
  else ``"blocks"``;
* ``"blocks"`` / ``"blocks:<edge>"``: a geometric atlas of cubes of ``edge`` voxels (default: 1/6 of the
  smallest grid side, 78 parcels at 24^3) cut from the brain mask, knowing nothing of the data;
* ``"networks"``: ``network_atlas.npz`` next to the manifest, which the synthetic generator writes: its 8 planted
  network maps as an atlas (:func:`data.synthetic.network_parcellation`, voxel -> strongest network);
* a path to an ``.npz`` (key ``labels``, int ``(X, Y, Z)`` over the original grid, 0 = background) or to a
  NIfTI labels volume already on the cohort's grid.

This module imports neither ``study`` nor ``ray``; NumPy/h5py only (nibabel for a NIfTI atlas).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from data.manifest import Manifest
from data.subject_file import SubjectReader, read_info

PARCELLATION_NAME = "parcellation.npz"
NETWORK_ATLAS_NAME = "network_atlas.npz"


def block_parcellation(mask_XYZ: np.ndarray, edge: int | None = None, min_voxels: int = 4) -> np.ndarray:
    """Cubes of ``edge`` voxels over ``mask_XYZ`` as labels ``(X, Y, Z)`` int32 (0 = background, 1..P).

    Cubes with fewer than ``min_voxels`` brain voxels are dropped; labels are consecutive.
    """
    mask = np.asarray(mask_XYZ, dtype=bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError(f"mask must be a non-empty 3-D boolean volume, got shape {mask.shape}")
    edge = int(edge) if edge is not None else max(2, min(mask.shape) // 6)
    if edge < 1:
        raise ValueError(f"edge={edge} must be >= 1")
    idx = np.indices(mask.shape) // edge
    n_b = [(-(-s // edge)) for s in mask.shape]
    block = (idx[0] * n_b[1] + idx[1]) * n_b[2] + idx[2]
    labels = np.zeros(mask.shape, dtype=np.int32)
    counts = np.bincount(block[mask], minlength=int(np.prod(n_b)))
    keep = np.flatnonzero(counts >= min_voxels)
    lut = np.zeros(len(counts), dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    labels[mask] = lut[block[mask]]
    return labels


def _first_subject(manifest: Manifest) -> Path:
    if not len(manifest):
        raise ValueError(f"{manifest.path}: the manifest has no subjects")
    return manifest.resolve(str(manifest.df["path"].iloc[0]))


def load_parcellation(manifest: Manifest | str | os.PathLike, atlas: str = "auto") -> tuple[np.ndarray, str]:
    """Labels volume ``(X, Y, Z)`` over the cohort's original grid and a short name of the atlas.

    See the module docstring for ``atlas``. Raises ``ValueError`` naming the file when an atlas does not
    fit the grid of the cohort's subject files.
    """
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    first = _first_subject(m)
    info = read_info(first)
    grid = tuple(int(g) for g in info.orig_shape)
    if atlas == "auto":
        p = m.root / PARCELLATION_NAME
        atlas = str(p) if p.is_file() else "blocks"
    elif atlas == "networks":
        atlas = str(m.root / NETWORK_ATLAS_NAME)
        if not Path(atlas).is_file():
            raise ValueError(f"atlas 'networks': {atlas} does not exist (written by data.synthetic.generate_cohort)")
    if atlas == "blocks" or atlas.startswith("blocks:"):
        edge = int(atlas.split(":", 1)[1]) if ":" in atlas else None
        with SubjectReader(first) as r:
            mask_c = r.mask
        mask = np.zeros(grid, dtype=bool)
        mask[tuple(slice(o, o + s) for o, s in zip(info.crop_offset, info.crop_shape))] = mask_c
        return block_parcellation(mask, edge), atlas
    path = Path(atlas)
    if not path.is_file():
        raise ValueError(f"atlas {atlas!r} is neither 'auto', 'blocks[:edge]', 'networks' nor an existing "
                         ".npz/NIfTI file")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "labels" not in z:
                raise ValueError(f"{path}: an atlas .npz needs the key 'labels' (int volume, 0 = background)")
            labels = np.asarray(z["labels"])
    else:
        import nibabel as nib

        labels = np.asarray(nib.load(str(path)).dataobj)
    labels = np.rint(labels).astype(np.int32)
    if labels.shape != grid:
        raise ValueError(f"{path}: atlas shape {labels.shape} differs from the cohort's grid {grid} ({first})")
    if labels.max() < 2:
        raise ValueError(f"{path}: the atlas has fewer than 2 parcels")
    name = {PARCELLATION_NAME: "cohort", NETWORK_ATLAS_NAME: "networks"}.get(path.name, path.name)
    return labels, name


def parcel_series(path: str | os.PathLike, labels_XYZ: np.ndarray) -> np.ndarray:
    """Mean raw signal of every parcel ``(T, P)`` float64 (brain voxels only; an empty parcel is all zeros).

    ``labels_XYZ`` is over the original grid (``orig_shape`` of the file); parcels are ``1..labels.max()``.
    """
    with SubjectReader(path) as r:
        info = r.info
        if tuple(labels_XYZ.shape) != tuple(info.orig_shape):
            raise ValueError(f"{path}: grid {info.orig_shape} differs from the atlas {labels_XYZ.shape}")
        sl = tuple(slice(o, o + s) for o, s in zip(info.crop_offset, info.crop_shape))
        lab = labels_XYZ[sl]
        sel = r.mask & (lab > 0)
        x_TV = r.read_raw()[:, sel].astype(np.float64)
    lab_V = lab[sel] - 1
    P = int(labels_XYZ.max())
    counts = np.bincount(lab_V, minlength=P).astype(np.float64)
    out = np.zeros((x_TV.shape[0], P))
    np.add.at(out.T, lab_V, x_TV.T)  # out[t, p] = sum over voxels of parcel p
    nz = counts > 0
    out[:, nz] /= counts[nz]
    return out


def correlation_vector(series_TP: np.ndarray) -> np.ndarray:
    """Fisher-z (``arctanh``) Pearson correlations of the parcel series, upper triangle ``(P (P-1) / 2,)``.

    Constant parcels (empty, or one frame) give 0.
    """
    x = np.asarray(series_TP, dtype=np.float64)
    x = x - x.mean(axis=0)
    sd = np.sqrt((x * x).sum(axis=0))
    x = np.divide(x, sd, out=np.zeros_like(x), where=sd > 0)
    c = np.clip(x.T @ x, -0.999999, 0.999999)
    iu = np.triu_indices(c.shape[0], k=1)
    return np.arctanh(c[iu])


def subject_features(manifest: Manifest | str | os.PathLike, labels_XYZ: np.ndarray, *, kind: str = "correlation"
                     ) -> tuple[np.ndarray, list[str]]:
    """Per-subject FC features ``(N, F)`` of every manifest row and its ``cohort/subject`` key.

    ``kind="correlation"``: Fisher-z correlation vectors; ``kind="series"``: the parcel series themselves
    as an object array of ``(T, P)`` (for a connectivity estimator fitted on training subjects only, such as
    the tangent space). A subject with several runs gets one row per run (average them downstream).
    """
    if kind not in ("correlation", "series"):
        raise ValueError(f"kind={kind!r}; allowed: ['correlation', 'series']")
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    keys, feats = [], []
    for row in m.df.itertuples(index=False):
        s = parcel_series(m.resolve(str(row.path)), labels_XYZ)
        feats.append(correlation_vector(s) if kind == "correlation" else s)
        keys.append(f"{row.cohort}/{row.subject}")
    if kind == "series":
        arr = np.empty(len(feats), dtype=object)
        arr[:] = feats
        return arr, keys
    return np.stack(feats), keys


def split_keys(manifest: Manifest, splits: Sequence[str]) -> list[str]:
    """``cohort/subject`` keys of manifest rows in ``splits`` (row order)."""
    df = manifest.df
    sel = df["split"].isin(list(splits))
    return (df.loc[sel, "cohort"].astype(str) + "/" + df.loc[sel, "subject"].astype(str)).tolist()
