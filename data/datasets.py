"""Windowed PyTorch datasets over subject files.

Shape legend: B batch, C channels (1), X Y Z space, T time (frames).

:class:`WindowedDataset` turns a manifest into windows of ``sequence_length`` frames:

* ``stride_within``: frame step inside a window (1 = consecutive frames);
* ``stride_between``: distance between window starts as a fraction of the window's span
  (1 = no overlap, 0.5 = 50% overlap);
* ``scaling``: applied from the subject file's stored statistics (:mod:`data.transforms`);
* ``grid``: the model grid; the stored brain box is placed centred in it. ``grid=None`` returns
  the crop itself (with ``crop_offset``), e.g. for models that drop background tokens;
* ``defer=True`` leaves decoding/scaling/background fill to :func:`data.transforms.finish_on_device`
  after the host-to-device copy: the loader then only reads float16 and pads (contiguous copies), which
  is what keeps a loader ahead of the GPU. A deferred ``x`` keeps the stored frame order, ``[1, T, X, Y, Z]``
  (the transpose to the model's T-last layout is a strided copy of every voxel: on the device it is free,
  in a worker it was a large part of a window's CPU time). ``defer=False`` (default) returns finished
  float32 ``[1, X, Y, Z, T]`` tensors, computed on the CPU in the loader workers.

TR handling: by default each item carries its subject's ``tr`` (seconds) and windows are counted in
the subject's own frames. With ``target_tr`` set, windows are defined in time at that TR and frames
are linearly interpolated from the source series (cohorts with different TRs then give windows of
equal duration).

File handles: each process (loader worker) opens files lazily and keeps at most ``max_open_files``
open in an LRU cache; handles are never shared across ``fork`` and are dropped when pickled. Window
indices are a fixed list (mixture resampling is deterministic), so the dataset is a plain map-style
dataset and works unchanged under ``DistributedSampler`` and Ray Train's ``prepare_data_loader``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch

from data.manifest import PRETRAIN_SPLITS, SPLITS, LeakageError, Manifest, stable_fraction
from data.subject_file import SubjectFileError, SubjectReader
from data.transforms import SCALINGS, all_finite, grid_placement, scaling_coefficients


class WindowedDataset(torch.utils.data.Dataset):
    """Windows of ``sequence_length`` frames over the subjects of a manifest split.

    Parameters
    ----------
    manifest : Manifest
        Cohort manifest.
    split : str or sequence of str
        ``train``, ``val`` or ``test`` (or several). Mixing ``test`` with a pre-training split
        raises :class:`data.manifest.LeakageError`.
    sequence_length : int
        Frames per window (T).
    stride_within : int
        Frame step inside a window.
    stride_between : float
        Step between window starts as a fraction of the window span (``(T-1)*stride_within+1``).
    scaling : {"minmax", "znorm_zeroback", "znorm_minback", "robust", "none"}
        Input scaling from the stored per-subject statistics.
    grid : (X, Y, Z) or None
        Model grid; None returns the brain-box crop.
    cohorts : sequence of names or mapping name -> weight, optional
        Restrict to these cohorts; a mapping also resamples windows so that cohort ``c`` supplies a
        fraction ``weight_c / sum(weights)`` of the windows (deterministic, seeded by ``mixture_seed``).
    max_subjects : int, optional
        Use only the first ``max_subjects`` subjects of a seeded, nested order (N=100 is a subset of
        N=200): the data axis of a scaling study.
    target : str, optional
        Manifest column returned as ``y`` (float32 scalar); rows where it is missing are dropped.
    max_open_files : int
        Per-process cap on open HDF5 handles (LRU).
    target_tr : float, optional
        Resample windows in time to this TR (linear interpolation); default: native frames.
    defer : bool
        Return float16 stored values plus ``scale_coef`` and finish on the device (see module doc).
    short_runs : {"error", "skip"}
        What to do with a run shorter than one window.
    mixture_seed, subject_seed : int
        Seeds of the mixture resampling and of the ``max_subjects`` order.
    """

    def __init__(self, manifest: Manifest, split: str | Sequence[str] = "train", sequence_length: int = 20,
                 stride_within: int = 1, stride_between: float = 1.0, scaling: str = "znorm_zeroback",
                 grid: Sequence[int] | None = (96, 96, 96), cohorts: Sequence[str] | Mapping[str, float] | None = None,
                 max_subjects: int | None = None, target: str | None = None, max_open_files: int = 64,
                 target_tr: float | None = None, defer: bool = False, short_runs: str = "error",
                 mixture_seed: int = 0, subject_seed: int = 0):
        splits = [split] if isinstance(split, str) else list(split)
        bad = [s for s in splits if s not in SPLITS]
        if bad or not splits:
            raise ValueError(f"split={split!r}: allowed values are {list(SPLITS)} (or a list of them)")
        if "test" in splits and any(s in PRETRAIN_SPLITS for s in splits):
            raise LeakageError(f"split={splits}: the downstream test split cannot be mixed with pre-training "
                               f"splits {list(PRETRAIN_SPLITS)}")
        if sequence_length < 1:
            raise ValueError(f"sequence_length={sequence_length} must be >= 1")
        if stride_within < 1:
            raise ValueError(f"stride_within={stride_within} must be >= 1")
        if not (stride_between > 0):
            raise ValueError(f"stride_between={stride_between} must be > 0 (1 = no overlap, 0.5 = 50% overlap)")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r} is not supported; allowed values: {', '.join(SCALINGS)}")
        if short_runs not in ("error", "skip"):
            raise ValueError(f"short_runs={short_runs!r}; allowed values: 'error', 'skip'")
        if max_open_files < 1:
            raise ValueError(f"max_open_files={max_open_files} must be >= 1")
        if target_tr is not None and not target_tr > 0:
            raise ValueError(f"target_tr={target_tr} must be a positive number of seconds or None")
        if grid is not None:
            grid = tuple(int(g) for g in grid)
            if len(grid) != 3 or min(grid) < 1:
                raise ValueError(f"grid={grid} must be three positive sizes or None")
        manifest.check_leakage()
        self.manifest = manifest
        self.splits = splits
        self.sequence_length = int(sequence_length)
        self.stride_within = int(stride_within)
        self.stride_between = float(stride_between)
        self.scaling = scaling
        self.grid = grid
        self.target = target
        self.max_open_files = int(max_open_files)
        self.target_tr = target_tr
        self.defer = bool(defer)

        df = manifest.df[manifest.df["split"].isin(splits)].copy()
        if target is not None:
            labels = [c for c in manifest.df.columns if c not in ("subject", "cohort", "path", "n_frames", "tr",
                                                                  "split", "content_sha256")]
            if target not in manifest.df.columns:
                raise ValueError(f"target={target!r} is not a manifest column; label columns: {labels}")
            df = df[df[target].notna()]
        all_cohorts = manifest.cohorts()
        weights: dict[str, float] | None = None
        if cohorts is not None:
            names = list(cohorts.keys()) if isinstance(cohorts, Mapping) else list(cohorts)
            unknown = [c for c in names if c not in all_cohorts]
            if unknown:
                raise ValueError(f"cohorts: unknown cohort(s) {unknown}; allowed values: {all_cohorts}")
            if isinstance(cohorts, Mapping):
                weights = {str(k): float(v) for k, v in cohorts.items()}
                if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                    raise ValueError(f"cohorts: weights {weights} must be non-negative with a positive sum")
                weights = {k: v for k, v in weights.items() if v > 0}
            df = df[df["cohort"].isin(list(weights) if weights is not None else names)]
        if max_subjects is not None:
            keys = (df["cohort"].astype(str) + "/" + df["subject"].astype(str))
            uniq = sorted(set(keys), key=lambda k: (stable_fraction(k, subject_seed), k))
            if max_subjects < 1 or max_subjects > len(uniq):
                raise ValueError(f"max_subjects={max_subjects} must be in [1, {len(uniq)}] (subjects available in "
                                 f"split {splits} after cohort filtering)")
            df = df[keys.isin(set(uniq[:max_subjects]))]
        self.df = df.reset_index(drop=True)

        # Window index: (row, start position in source frames, source step per output frame).
        rows, starts, steps = [], [], []
        span = (self.sequence_length - 1) * self.stride_within + 1
        between = max(1, int(round(self.stride_between * span)))
        for r, (path, n, tr) in enumerate(zip(self.df["path"], self.df["n_frames"], self.df["tr"])):
            n, tr = int(n), float(tr)
            if target_tr is None:
                step, last = float(self.stride_within), n - span
                starts_r = np.arange(0, last + 1, between, dtype=np.float64) if last >= 0 else np.empty(0)
            else:
                step = self.stride_within * target_tr / tr
                dur = (self.sequence_length - 1) * step
                last = (n - 1) - dur
                starts_r = (np.arange(0, last + 1e-9, between * target_tr / tr, dtype=np.float64)
                            if last >= -1e-9 else np.empty(0))
            if len(starts_r) == 0:
                if short_runs == "error":
                    raise SubjectFileError(
                        f"{manifest.resolve(path)}: run of {n} frames (TR {tr} s) is shorter than one window "
                        f"(sequence_length={self.sequence_length}, stride_within={self.stride_within}"
                        + (f", target_tr={target_tr}" if target_tr else "") + "); use short_runs='skip' to drop it")
                continue
            rows.append(np.full(len(starts_r), r))
            starts.append(starts_r)
            steps.append(np.full(len(starts_r), step))
        kept = [int(r_[0]) for r_ in rows]
        if len(kept) != len(self.df):  # drop skipped short runs from the subject table too
            self.df = self.df.iloc[kept].reset_index(drop=True)
            rows = [np.full(len(r_), j) for j, r_ in enumerate(rows)]
        rows_a = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        starts_a = np.concatenate(starts) if starts else np.empty(0)
        steps_a = np.concatenate(steps) if steps else np.empty(0)
        if weights is not None and len(rows_a):
            rows_a, starts_a, steps_a = self._mix(rows_a, starts_a, steps_a, weights, mixture_seed)
        self._rows = rows_a.astype(np.int64)
        self._starts = starts_a
        self._steps = steps_a
        self._paths = [str(manifest.resolve(p)) for p in self.df["path"]]
        self._handles: OrderedDict[int, SubjectReader] = OrderedDict()
        self._pid = os.getpid()
        self._inherited: list = []
        self.opens = 0  # files opened by this process (benchmarks report opens per window)

    # ------------------------------------------------------------------ index construction
    def _mix(self, rows, starts, steps, weights, seed):
        cohort_of_row = self.df["cohort"].astype(str).to_numpy()
        total = len(rows)
        wsum = sum(weights.values())
        rng = np.random.default_rng([seed, 31337])
        keep = []
        for c in sorted(weights):
            idx = np.nonzero(cohort_of_row[rows] == c)[0]
            if len(idx) == 0:
                continue
            n_c = int(round(total * weights[c] / wsum))
            reps, rem = divmod(n_c, len(idx))
            keep.append(np.concatenate([np.tile(idx, reps), np.sort(rng.choice(idx, rem, replace=False))]))
        sel = np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=np.int64)
        return rows[sel], starts[sel], steps[sel]

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def subject_keys(self) -> list[str]:
        """``cohort/subject`` keys of the subjects this dataset draws from."""
        return sorted(set((self.df["cohort"].astype(str) + "/" + self.df["subject"].astype(str)).tolist()))

    def window_cohorts(self) -> np.ndarray:
        """Cohort of every window (length ``len(self)``)."""
        return self.df["cohort"].astype(str).to_numpy()[self._rows]

    def window(self, i: int) -> tuple[str, float, float]:
        """``(file path, start frame, source frames per output frame)`` of window ``i``."""
        return self._paths[self._rows[i]], float(self._starts[i]), float(self._steps[i])

    # ------------------------------------------------------------------ file handles
    def _reader(self, r: int) -> SubjectReader:
        if self._pid != os.getpid():  # forked worker: never touch the parent's handles
            self._inherited.append(self._handles)
            self._handles = OrderedDict()
            self._pid = os.getpid()
            self.opens = 0
        h = self._handles.get(r)
        if h is not None:
            self._handles.move_to_end(r)
            return h
        h = SubjectReader(self._paths[r])
        self.opens += 1
        row = self.df.iloc[r]
        if h.info.n_frames != int(row["n_frames"]):
            h.close()
            raise SubjectFileError(f"{self._paths[r]}: has {h.info.n_frames} frames but the manifest says "
                                   f"{int(row['n_frames'])}")
        if not math.isclose(h.info.tr, float(row["tr"]), rel_tol=1e-4):
            h.close()
            raise SubjectFileError(f"{self._paths[r]}: TR {h.info.tr} s disagrees with the manifest's "
                                   f"{float(row['tr'])} s")
        if self.grid is not None:
            try:
                grid_placement(h.info.crop_shape, self.grid, self._paths[r])
            except ValueError:
                h.close()
                raise
        self._handles[r] = h
        while len(self._handles) > self.max_open_files:
            _, old = self._handles.popitem(last=False)
            old.close()
        return h

    def open_files(self) -> int:
        """Handles currently open in this process."""
        return len(self._handles) if self._pid == os.getpid() else 0

    def close(self) -> None:
        """Close this process's handles."""
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_inherited"] = []
        return state

    # ------------------------------------------------------------------ items
    def read_window(self, i: int) -> np.ndarray:
        """Stored float16 frames of window ``i`` as ``(T, Xc, Yc, Zc)`` (interpolated when ``target_tr``)."""
        r = int(self._rows[i])
        h = self._reader(r)
        start, step = float(self._starts[i]), float(self._steps[i])
        T = self.sequence_length
        if self.target_tr is None:
            s, k = int(start), int(step)
            frames = h.read_frames(s, s + (T - 1) * k + 1)
            return frames[::k] if k > 1 else frames
        pos = start + step * np.arange(T)
        lo = int(math.floor(pos[0]))
        hi = min(int(math.ceil(pos[-1])) + 1, h.info.n_frames)
        src = h.read_frames(lo, hi).astype(np.float32)
        i0 = np.clip(np.floor(pos).astype(int) - lo, 0, hi - lo - 1)
        i1 = np.clip(i0 + 1, 0, hi - lo - 1)
        w = (pos - np.floor(pos)).astype(np.float32)[:, None, None, None]
        return ((1 - w) * src[i0] + w * src[i1]).astype(np.float16)

    def _finish_cpu(self, out_XYZT: torch.Tensor, frames_TXYZ: torch.Tensor, h: SubjectReader, mul: float,
                    add: float, bg: float) -> None:
        """``out = where(mask, stored * mul + add, bg)`` with T last: one transposing copy + one fused pass."""
        # per-voxel coefficients (built per item: caching them per handle would cost 8 bytes/voxel x open files)
        m = torch.from_numpy(h.mask)[..., None]
        mul_v = torch.where(m, torch.tensor(mul, dtype=torch.float32), torch.tensor(0.0))
        add_v = torch.where(m, torch.tensor(add, dtype=torch.float32), torch.tensor(bg, dtype=torch.float32))
        out_XYZT.copy_(frames_TXYZ.permute(1, 2, 3, 0))
        out_XYZT.mul_(mul_v).add_(add_v)

    # ------------------------------------------------------------------ crop batches (deferred, on a grid)
    @property
    def batches_crops(self) -> bool:
        """Whether :meth:`read_crop_into` serves this dataset: deferred windows on a grid, native frames, frame step 1.
        A loader then decodes each window's brain-box crop straight into its micro-batch's buffer (shared memory in a
        worker) and :func:`data.transforms.finish_on_device` pads on the device: no padded copy, no stacking copy."""
        return self.defer and self.grid is not None and self.target_tr is None and self.stride_within == 1

    def crop_shape(self, i: int) -> tuple[int, int, int]:
        """Brain-box shape ``(Xc, Yc, Zc)`` of window ``i``'s file (opens it; checks that it fits the grid)."""
        return self._reader(int(self._rows[i])).info.crop_shape

    def read_crop_into(self, i: int, out_TXYZ: np.ndarray) -> dict:
        """Window ``i``'s stored float16 crop decoded into ``out_TXYZ[:, :Xc, :Yc, :Zc]`` (a C-contiguous, zero-filled
        ``(T, bx, by, bz)`` slot of a crop batch, each ``b >=`` the crop's size), and its item without ``x``:
        ``crop_shape``, ``grid_offset`` (where the crop goes in the grid), ``finite`` (checked on the crop: the rest
        of the slot is zeros) and the keys of a deferred :meth:`__getitem__` item (same ``brain_mask`` and
        ``scale_coef``). :func:`data.transforms.finish_on_device` of such a batch equals that of the padded items."""
        if not self.batches_crops:
            raise ValueError(f"{self!r}: read_crop_into needs defer=True, a grid, native frames and stride_within=1")
        r = int(self._rows[i])
        h = self._reader(r)
        info = h.info
        s, T = int(self._starts[i]), self.sequence_length
        Xc, Yc, Zc = info.crop_shape
        full = tuple(out_TXYZ.shape[1:]) == tuple(info.crop_shape)
        h.read_frames(s, s + T, out=out_TXYZ, out_sel=None if full else np.s_[:, :Xc, :Yc, :Zc])
        crop = torch.from_numpy(out_TXYZ)
        item = self._item_meta(i, r, h)
        item["finite"] = all_finite(crop if full else crop[:, :Xc, :Yc, :Zc])
        item["crop_shape"] = torch.tensor(info.crop_shape)
        item["grid_offset"] = torch.tensor(grid_placement(info.crop_shape, self.grid, self._paths[r]))
        return item

    def _item_meta(self, i: int, r: int, h: SubjectReader) -> dict:
        """The keys of a deferred grid item other than ``x`` (``brain_mask`` in the grid, ``scale_coef``, labels)."""
        info = h.info
        mul, add, bg = scaling_coefficients(self.scaling, info.stats, info.value_offset, info.value_scale)
        row = self.df.iloc[r]
        item: dict = dict(subject=str(row["subject"]), cohort=str(row["cohort"]), start=int(self._starts[i]),
                          tr=float(self.target_tr or info.tr))
        px, py, pz = grid_placement(info.crop_shape, self.grid, self._paths[r])
        Xc, Yc, Zc = info.crop_shape
        mask = torch.zeros(self.grid, dtype=torch.bool)
        mask[px:px + Xc, py:py + Yc, pz:pz + Zc] = torch.from_numpy(h.mask)
        item["brain_mask"] = mask
        item["scale_coef"] = torch.tensor([mul, add, bg], dtype=torch.float32)
        if self.target is not None:
            item["y"] = torch.tensor(float(row[self.target]), dtype=torch.float32)
        return item

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        r = int(self._rows[i])
        frames_TXYZ = torch.from_numpy(np.ascontiguousarray(self.read_window(i)))
        h = self._handles[r]
        info = h.info
        mul, add, bg = scaling_coefficients(self.scaling, info.stats, info.value_offset, info.value_scale)
        mask_c = torch.from_numpy(h.mask)
        row = self.df.iloc[r]
        item: dict = dict(subject=str(row["subject"]), cohort=str(row["cohort"]), start=int(self._starts[i]),
                          tr=float(self.target_tr or info.tr))
        if self.grid is None:
            item["crop_offset"] = torch.tensor(info.crop_offset)
            if self.defer:
                x = frames_TXYZ.unsqueeze(0)  # stored order [1, T, X, Y, Z]; finish_on_device transposes
                item["scale_coef"] = torch.tensor([mul, add, bg], dtype=torch.float32)
            else:
                x = torch.empty((1, *info.crop_shape, frames_TXYZ.shape[0]), dtype=torch.float32)
                self._finish_cpu(x[0], frames_TXYZ, h, mul, add, bg)
            item["x"], item["brain_mask"] = x, mask_c
        else:
            px, py, pz = grid_placement(info.crop_shape, self.grid, self._paths[r])
            Xc, Yc, Zc = info.crop_shape
            sl = (slice(px, px + Xc), slice(py, py + Yc), slice(pz, pz + Zc))
            mask = torch.zeros(self.grid, dtype=torch.bool)
            mask[sl] = mask_c
            T = frames_TXYZ.shape[0]
            if self.defer:
                x = torch.zeros((1, T, *self.grid), dtype=torch.float16)  # stored order, see the module doc
                x[(0, slice(None), *sl)] = frames_TXYZ
                item["scale_coef"] = torch.tensor([mul, add, bg], dtype=torch.float32)
            else:
                x = torch.full((1, *self.grid, T), bg, dtype=torch.float32)
                self._finish_cpu(x[(0, *sl)], frames_TXYZ, h, mul, add, bg)
            item["x"], item["brain_mask"] = x, mask
        if self.target is not None:
            item["y"] = torch.tensor(float(row[self.target]), dtype=torch.float32)
        return item

    def __repr__(self) -> str:
        return (f"WindowedDataset({len(self)} windows, {len(self.df)} files, split={self.splits}, "
                f"T={self.sequence_length}, scaling={self.scaling}, grid={self.grid}, defer={self.defer})")
