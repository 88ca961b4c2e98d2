"""The per-subject HDF5 file: writer, reader and validation (schema in ``data/README.md``).

One file holds one subject's (one run's) BOLD series, cropped to the brain's bounding box and
stored as float16, frame-major ``bold_TXYZ`` so that a window of T frames is a contiguous slab of
a few chunks (each chunk = the full crop x ``chunk_frames`` frames). The brain mask, TR, affine,
original shape, crop offsets and per-subject scaling statistics live beside it, so every input
scaling method is applied at load time from attributes alone.

Shape legend: T time (frames), X Y Z space (crop unless stated).
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import h5py
import hdf5plugin  # noqa: F401  (registers the LZ4 / Blosc / Zstd filters for readers too)
import numpy as np

SCHEMA = "neurox-subject"
SCHEMA_VERSION = 1
FP16_MAX = 60000.0  # keep a margin below float16's 65504

#: Compression codecs for ``bold``. ``lz4`` is the default (fast decode, see benchmarks/results/data.md);
#: ``gzip`` needs no plugin and stays readable everywhere, but decodes several times slower.
CODECS = ("lz4", "blosc-lz4", "zstd", "gzip", "none")
DEFAULT_CODEC = "lz4"
DEFAULT_CHUNK_FRAMES = 4

STAT_NAMES = ("mean", "std", "min", "max", "median", "q25", "q75", "iqr")


class SubjectFileError(ValueError):
    """A subject file (or its source) is unusable; the message names the file and the problem."""


def _codec_kwargs(codec: str) -> dict:
    if codec == "lz4":
        return dict(hdf5plugin.LZ4())
    if codec == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if codec == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    if codec == "gzip":
        return dict(compression="gzip", compression_opts=4)
    if codec == "none":
        return {}
    raise ValueError(f"codec={codec!r} is not supported; allowed values: {', '.join(CODECS)}")


@dataclass(frozen=True)
class SubjectInfo:
    """Metadata of one subject file (everything except the BOLD voxels)."""

    path: Path
    subject: str
    cohort: str
    n_frames: int
    tr: float
    orig_shape: tuple[int, int, int]
    crop_offset: tuple[int, int, int]
    crop_shape: tuple[int, int, int]
    affine: np.ndarray
    stats: Mapping[str, float]
    value_offset: float
    value_scale: float
    codec: str
    content_sha256: str


def brain_bbox(mask_XYZ: np.ndarray, margin: int = 0) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box of a boolean mask: ``(offset, shape)``, optionally grown by ``margin`` voxels."""
    idx = np.nonzero(mask_XYZ)
    if len(idx[0]) == 0:
        raise ValueError("empty mask: no brain voxel")
    lo = [max(int(i.min()) - margin, 0) for i in idx]
    hi = [min(int(i.max()) + 1 + margin, s) for i, s in zip(idx, mask_XYZ.shape)]
    return tuple(lo), tuple(h - lo_ for h, lo_ in zip(hi, lo))


def brain_stats(values: np.ndarray, max_quantile_samples: int = 4_000_000) -> dict[str, float]:
    """Scaling statistics over brain voxel values (1-D, any dtype), computed in float64.

    Quantiles (median, q25, q75) use an evenly strided subsample when there are more than
    ``max_quantile_samples`` values (exact otherwise); mean/std/min/max always use every value.
    """
    v = np.asarray(values).ravel()
    v64 = v.astype(np.float64)
    q_src = v64 if v64.size <= max_quantile_samples else v64[:: -(-v64.size // max_quantile_samples)]
    q25, med, q75 = np.percentile(q_src, [25, 50, 75])
    return dict(mean=float(v64.mean()), std=float(v64.std()), min=float(v64.min()), max=float(v64.max()),
                median=float(med), q25=float(q25), q75=float(q75), iqr=float(q75 - q25))


def _atomic_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_subject(path: str | os.PathLike, bold_XYZT: np.ndarray, mask_XYZ: np.ndarray | None = None, *,
                  tr: float, affine: np.ndarray | None = None, subject: str, cohort: str = "default",
                  codec: str = DEFAULT_CODEC, chunk_frames: int = DEFAULT_CHUNK_FRAMES, margin: int = 0,
                  source_fingerprint: str = "", extra_attrs: Mapping[str, object] | None = None,
                  source_name: str | None = None) -> SubjectInfo:
    """Write one subject file atomically (temporary name, then ``os.replace``).

    Parameters
    ----------
    path : path-like
        Output ``.h5`` path; parent directories are created.
    bold_XYZT : ndarray, shape (X, Y, Z, T)
        BOLD series in raw units (any float dtype). Must be finite inside the brain mask.
    mask_XYZ : ndarray of bool, shape (X, Y, Z), optional
        Brain mask; default: voxels that are non-zero in any frame.
    tr : float
        Repetition time in seconds (> 0).
    affine : ndarray (4, 4), optional
        Voxel-to-world affine of the *original* grid (identity if omitted).
    subject, cohort : str
        Identifiers stored as attributes.
    codec : {"lz4", "blosc-lz4", "zstd", "gzip", "none"}
        Compression of ``bold``.
    chunk_frames : int
        Frames per chunk (each chunk spans the whole crop).
    margin : int
        Voxels of background kept around the brain bounding box.
    source_fingerprint : str
        Opaque fingerprint of the source (converters use it to skip unchanged subjects).
    extra_attrs : mapping, optional
        Extra scalar/string attributes (e.g. phenotypes), stored under ``/meta``.
    source_name : str, optional
        Name used in error messages (defaults to ``path``).

    Returns
    -------
    SubjectInfo
        Metadata of the written file.
    """
    path = Path(path)
    name = source_name or str(path)
    _codec_kwargs(codec)  # validate early
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames} must be >= 1")
    if not (np.isfinite(tr) and tr > 0):
        raise SubjectFileError(f"{name}: TR must be a positive number of seconds, got {tr!r}")
    bold = np.asarray(bold_XYZT)
    if bold.ndim != 4:
        raise SubjectFileError(f"{name}: BOLD must be 4-D (X, Y, Z, T), got shape {bold.shape}")
    if bold.shape[3] < 1:
        raise SubjectFileError(f"{name}: BOLD has no frames (shape {bold.shape})")
    if mask_XYZ is None:
        mask_XYZ = np.any(bold != 0, axis=3)
    mask = np.asarray(mask_XYZ).astype(bool)
    if mask.shape != bold.shape[:3]:
        raise SubjectFileError(f"{name}: mask shape {mask.shape} does not match BOLD spatial shape {bold.shape[:3]}")
    if not mask.any():
        raise SubjectFileError(f"{name}: empty brain mask (no voxel selected)")
    offset, shape = brain_bbox(mask, margin)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    crop = bold[sl]                      # (Xc, Yc, Zc, T) view
    mask_c = mask[sl]
    brain_TV = crop[mask_c].T            # (T, V) brain voxels, raw units
    if not np.all(np.isfinite(brain_TV)):
        n_bad = int(np.size(brain_TV) - np.count_nonzero(np.isfinite(brain_TV)))
        raise SubjectFileError(f"{name}: {n_bad} NaN/Inf values inside the brain mask")
    brain64 = brain_TV.astype(np.float64, copy=False)
    value_offset = float(np.float32(brain64.mean()))
    dev = float(np.abs(brain64 - value_offset).max()) if brain64.size else 0.0
    value_scale = 1.0
    while dev * value_scale > FP16_MAX:
        value_scale /= 2.0
    # Stored units: (raw - value_offset) * value_scale, float16; background stored as 0.
    stored_TXYZ = np.zeros((bold.shape[3],) + tuple(shape), dtype=np.float16)
    enc = ((brain64 - value_offset) * value_scale).astype(np.float16)
    stored_TXYZ[:, mask_c] = enc
    # Statistics in raw units, from the values a reader will decode (after float16 rounding).
    decoded = enc.astype(np.float64) / value_scale + value_offset
    stats = brain_stats(decoded)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(stored_TXYZ).tobytes())
    h.update(np.packbits(mask_c).tobytes())
    h.update(repr((float(tr), offset, shape, value_offset, value_scale)).encode())
    content = h.hexdigest()
    if affine is None:
        affine = np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SubjectFileError(f"{name}: affine must be 4x4, got {affine.shape}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_tmp(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = SCHEMA
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["subject"] = str(subject)
            f.attrs["cohort"] = str(cohort)
            f.attrs["tr"] = float(tr)
            f.attrs["n_frames"] = int(bold.shape[3])
            f.attrs["orig_shape"] = np.asarray(bold.shape[:3], dtype=np.int64)
            f.attrs["crop_offset"] = np.asarray(offset, dtype=np.int64)
            f.attrs["crop_shape"] = np.asarray(shape, dtype=np.int64)
            f.attrs["affine"] = affine
            f.attrs["value_offset"] = value_offset
            f.attrs["value_scale"] = value_scale
            f.attrs["codec"] = codec
            f.attrs["content_sha256"] = content
            f.attrs["source_fingerprint"] = str(source_fingerprint)
            f.attrs["n_brain_voxels"] = int(mask_c.sum())
            for k in STAT_NAMES:
                f.attrs[f"stat_{k}"] = stats[k]
            chunks = (min(chunk_frames, bold.shape[3]),) + tuple(shape)
            f.create_dataset("bold", data=stored_TXYZ, chunks=chunks, **_codec_kwargs(codec))
            f.create_dataset("mask", data=mask_c, compression="gzip", compression_opts=1)
            if extra_attrs:
                g = f.create_group("meta")
                for k, v in extra_attrs.items():
                    if v is None or (isinstance(v, float) and not np.isfinite(v)):
                        continue
                    g.attrs[str(k)] = v
            f.attrs["complete"] = True
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return read_info(path)


def _open(path: Path, rdcc_nbytes: int | None = None) -> h5py.File:
    if not path.exists():
        raise SubjectFileError(f"{path}: subject file does not exist")
    kw = {} if rdcc_nbytes is None else dict(rdcc_nbytes=rdcc_nbytes)
    try:
        return h5py.File(path, "r", **kw)
    except OSError as e:
        raise SubjectFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None


def _info_from(f: h5py.File, path: Path) -> SubjectInfo:
    a = f.attrs
    if a.get("schema") != SCHEMA or "schema_version" not in a:
        raise SubjectFileError(f"{path}: not a NeuroX subject file (schema attribute {a.get('schema')!r}, "
                               f"expected {SCHEMA!r})")
    if int(a["schema_version"]) != SCHEMA_VERSION:
        raise SubjectFileError(f"{path}: unsupported schema_version {int(a['schema_version'])} "
                               f"(this reader supports {SCHEMA_VERSION})")
    if not a.get("complete", False) or "bold" not in f or "mask" not in f:
        raise SubjectFileError(f"{path}: incomplete subject file (missing 'bold', 'mask' or completion flag)")
    n_frames = int(a["n_frames"])
    crop_shape = tuple(int(v) for v in a["crop_shape"])
    if f["bold"].shape != (n_frames,) + crop_shape or f["bold"].dtype != np.float16:
        raise SubjectFileError(f"{path}: 'bold' has shape {f['bold'].shape} dtype {f['bold'].dtype}, expected "
                               f"{(n_frames,) + crop_shape} float16")
    return SubjectInfo(
        path=path, subject=str(a["subject"]), cohort=str(a["cohort"]), n_frames=n_frames, tr=float(a["tr"]),
        orig_shape=tuple(int(v) for v in a["orig_shape"]), crop_offset=tuple(int(v) for v in a["crop_offset"]),
        crop_shape=crop_shape, affine=np.asarray(a["affine"]),
        stats={k: float(a[f"stat_{k}"]) for k in STAT_NAMES}, value_offset=float(a["value_offset"]),
        value_scale=float(a["value_scale"]), codec=str(a["codec"]), content_sha256=str(a["content_sha256"]))


def read_info(path: str | os.PathLike) -> SubjectInfo:
    """Validate a subject file's schema and return its metadata (raises :class:`SubjectFileError`)."""
    path = Path(path)
    with _open(path) as f:
        return _info_from(f, path)


class SubjectReader:
    """An open subject file: metadata plus windowed reads of stored float16 frames.

    Parameters
    ----------
    path : path-like
        Subject file.
    rdcc_nbytes : int, optional
        HDF5 chunk-cache size for this handle (default: 4 chunks, so overlapping windows
        re-use decoded chunks instead of decompressing them again).
    """

    def __init__(self, path: str | os.PathLike, rdcc_nbytes: int | None = None):
        self.path = Path(path)
        self._f = _open(self.path)  # one open per subject (parallel filesystems pay per open)
        try:
            self.info = _info_from(self._f, self.path)
            bold = self._f["bold"]
            chunk_frames = bold.chunks[0] if bold.chunks else 1
            if rdcc_nbytes is None:
                rdcc_nbytes = 4 * chunk_frames * int(np.prod(self.info.crop_shape)) * 2 + (1 << 20)
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_chunk_cache(521, int(rdcc_nbytes), 1.0)
            self._bold = h5py.Dataset(h5py.h5d.open(self._f.id, b"bold", dapl))
        except BaseException:
            self._f.close()
            raise
        self._mask: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        """Brain mask over the crop, bool ``(Xc, Yc, Zc)``."""
        if self._mask is None:
            self._mask = self._f["mask"][()].astype(bool)
        return self._mask

    def read_frames(self, start: int, stop: int, step: int = 1, out: np.ndarray | None = None,
                    out_sel: tuple | None = None) -> np.ndarray:
        """Stored float16 frames ``[start:stop:step]`` as ``(T, Xc, Yc, Zc)`` (stored units).

        With ``out`` (a C-contiguous float16 array; ``step`` 1) the frames are decoded straight into
        ``out[out_sel]`` (default: all of ``out``), with no intermediate array, and ``out`` is returned.
        Raises :class:`SubjectFileError` naming the file when the range exceeds the run or the
        data cannot be decoded.
        """
        n = self.info.n_frames
        if start < 0 or stop > n or start >= stop:
            raise SubjectFileError(f"{self.path}: frames [{start}:{stop}] outside the run of {n} frames")
        try:
            if step == 1 and out is not None:
                self._bold.read_direct(out, np.s_[start:stop], out_sel)
                return out
            return self._bold[start:stop:step]
        except (OSError, RuntimeError) as e:
            raise SubjectFileError(f"{self.path}: cannot decode frames [{start}:{stop}] (corrupt data?): {e}") from None

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames decoded to raw units, float32 ``(T, Xc, Yc, Zc)``, background 0."""
        stop = self.info.n_frames if stop is None else stop
        x = self.read_frames(start, stop).astype(np.float32)
        x = x / np.float32(self.info.value_scale) + np.float32(self.info.value_offset)
        x[:, ~self.mask] = 0
        return x

    def close(self) -> None:
        """Close the HDF5 handle (idempotent)."""
        try:
            self._f.close()
        except Exception:  # pragma: no cover - closing a dead handle
            pass

    def __enter__(self) -> "SubjectReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_subject_full(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, SubjectInfo]:
    """Whole series rebuilt at the original grid: ``(bold_XYZT float32 raw units, mask_XYZ bool, info)``."""
    with SubjectReader(path) as r:
        info = r.info
        crop_TXYZ = r.read_raw()
        mask_c = r.mask
    bold = np.zeros(info.orig_shape + (info.n_frames,), dtype=np.float32)
    mask = np.zeros(info.orig_shape, dtype=bool)
    sl = tuple(slice(o, o + s) for o, s in zip(info.crop_offset, info.crop_shape))
    bold[sl] = np.moveaxis(crop_TXYZ, 0, -1)
    mask[sl] = mask_c
    return bold, mask, info


def is_complete(path: str | os.PathLike, source_fingerprint: str | None = None) -> bool:
    """True when ``path`` is a valid subject file (and, if given, made from ``source_fingerprint``)."""
    try:
        with _open(Path(path)) as f:
            _info_from(f, Path(path))
            return source_fingerprint is None or str(f.attrs.get("source_fingerprint", "")) == source_fingerprint
    except SubjectFileError:
        return False


def transcode(src: str | os.PathLike, dst: str | os.PathLike, codec: str,
              chunk_frames: int | None = None) -> SubjectInfo:
    """Rewrite a subject file with another codec / chunking (same stored values, same content hash).

    Parameters
    ----------
    src, dst : path-like
        Existing subject file and output path (written atomically).
    codec : str
        One of :data:`CODECS`.
    chunk_frames : int, optional
        Frames per chunk (default: keep the source's).
    """
    src, dst = Path(src), Path(dst)
    kw = _codec_kwargs(codec)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_tmp(dst)
    try:
        with _open(src) as f:
            _info_from(f, src)
            bold = f["bold"]
            cf = chunk_frames or (bold.chunks[0] if bold.chunks else DEFAULT_CHUNK_FRAMES)
            with h5py.File(tmp, "w") as g:
                for k, v in f.attrs.items():
                    if k != "complete":
                        g.attrs[k] = v
                g.attrs["codec"] = codec
                d = g.create_dataset("bold", shape=bold.shape, dtype=bold.dtype,
                                     chunks=(min(cf, bold.shape[0]),) + bold.shape[1:], **kw)
                for t in range(0, bold.shape[0], cf):
                    d[t:t + cf] = bold[t:t + cf]
                f.copy(f["mask"], g, "mask")
                if "meta" in f:
                    f.copy(f["meta"], g, "meta")
                g.attrs["complete"] = True
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return read_info(dst)
