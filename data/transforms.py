"""Input scaling and padding to the model grid, as one fused affine map per subject.

Every scaling method is ``scaled = (raw - shift) * mul`` on brain voxels, with a constant
``background`` elsewhere. Subject files store ``stored = (raw - value_offset) * value_scale`` in
float16, so the whole decode + scale is one multiply-add on the stored values:
``scaled = stored * (mul / value_scale) + (value_offset - shift) * mul``. The coefficients depend
only on the file's attributes; :func:`scaling_coefficients` computes them, and both the CPU path
(:class:`data.datasets.WindowedDataset` with ``defer=False``) and the device path
(:func:`finish_on_device`) use them.

Methods (statistics over brain voxels, all frames):

=================  ==============================  ====================================
method             brain voxels                    background (outside mask, padding)
=================  ==============================  ====================================
``none``           raw                              0
``minmax``         (raw - min) / (max - min)        0
``znorm_zeroback`` (raw - mean) / std               0
``znorm_minback``  (raw - mean) / std               (min - mean) / std
``robust``         (raw - median) / IQR             0
=================  ==============================  ====================================
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

SCALINGS = ("minmax", "znorm_zeroback", "znorm_minback", "robust", "none")


def scaling_coefficients(method: str, stats: Mapping[str, float], value_offset: float = 0.0,
                         value_scale: float = 1.0) -> tuple[float, float, float]:
    """``(mul, add, background)`` so that ``scaled = stored * mul + add`` on brain voxels.

    Parameters
    ----------
    method : {"minmax", "znorm_zeroback", "znorm_minback", "robust", "none"}
        Scaling method.
    stats : mapping
        Brain-voxel statistics in raw units (``mean, std, min, max, median, iqr``).
    value_offset, value_scale : float
        The file's storage encoding (``stored = (raw - value_offset) * value_scale``).
    """
    def safe(d: float) -> float:
        return d if d > 0 and np.isfinite(d) else 1.0

    background = 0.0
    if method == "none":
        shift, mul = 0.0, 1.0
    elif method == "minmax":
        shift, mul = stats["min"], 1.0 / safe(stats["max"] - stats["min"])
    elif method in ("znorm_zeroback", "znorm_minback"):
        shift, mul = stats["mean"], 1.0 / safe(stats["std"])
        if method == "znorm_minback":
            background = (stats["min"] - stats["mean"]) * mul
    elif method == "robust":
        shift, mul = stats["median"], 1.0 / safe(stats["iqr"])
    else:
        raise ValueError(f"scaling={method!r} is not supported; allowed values: {', '.join(SCALINGS)}")
    return mul / value_scale, (value_offset - shift) * mul, background


def grid_placement(crop_shape: Sequence[int], grid: Sequence[int], name: str = "") -> tuple[int, int, int]:
    """Where a brain-box crop goes in the model grid: centred (raises if it does not fit)."""
    if any(c > g for c, g in zip(crop_shape, grid)):
        raise ValueError(f"{name}: brain box {tuple(crop_shape)} does not fit the model grid {tuple(grid)}; "
                         "resample the data (converters: --resample-to) or choose a larger grid")
    return tuple((g - c) // 2 for c, g in zip(crop_shape, grid))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of floating tensor ``t`` is finite, in one reduction pass: NaN propagates through
    ``aminmax`` and an infinity is the minimum or the maximum. On a CPU this is ~10x faster than
    ``torch.isfinite(t).all()`` for a float16 window (which has no vectorised half-precision kernel there and
    was most of a loader worker's time per 96^3 x 20 window)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def finish_on_device(batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Complete a ``defer=True`` batch on ``device``: decode + scale float16 ``x`` and zero/fill background.

    ``batch["x"]`` is float16 stored values in stored frame order ``[B, 1, T, X, Y, Z]``
    (:class:`data.datasets.WindowedDataset` with ``defer=True``), ``batch["scale_coef"]`` ``[B, 3]`` (mul, add,
    background) and ``batch["brain_mask"]`` ``[B, X, Y, Z]``. Returns a new dict with ``x`` in ``dtype``
    (float32 by default) on ``device``, in the model's layout ``[B, 1, X, Y, Z, T]`` (contiguous). The work is
    one fused multiply-add, a select and a transposing copy per voxel, cheap on a GPU.

    A crop batch (a loader's :meth:`data.datasets.WindowedDataset.read_crop_into` micro-batch) carries each window's
    brain-box crop instead: ``x`` ``[B, 1, T, bx, by, bz]`` with sample ``b``'s crop at ``[:, :, :Xc, :Yc, :Zc]``,
    ``crop_shape`` and ``grid_offset`` ``[B, 3]`` (host tensors). It is padded into the grid here first (zeros,
    as the loader's padded items hold), so the result is the same, bit for bit.
    """
    out = dict(batch)
    device = torch.device(device) if device is not None else batch["x"].device
    x = batch["x"].to(device, non_blocking=True)
    coef = batch["scale_coef"].to(device=device, dtype=torch.float32, non_blocking=True)
    mask = batch["brain_mask"].to(device, non_blocking=True)
    B = x.shape[0]
    if "crop_shape" in batch:
        x = _pad_crops(x, batch["crop_shape"].tolist(), batch["grid_offset"].tolist(), tuple(mask.shape[1:]))
        for k in ("crop_shape", "grid_offset"):
            out.pop(k)
    mul, add, bg = (coef[:, i].view(B, 1, 1, 1, 1, 1) for i in range(3))
    xf = x.to(torch.float32) * mul + add
    xf = torch.where(mask[:, None, None], xf, bg.expand_as(xf))
    out["x"] = xf.to(dtype).permute(0, 1, 3, 4, 5, 2).contiguous()
    out["brain_mask"] = mask
    for k in ("y",):
        if k in batch:
            out[k] = batch[k].to(device, non_blocking=True)
    return out


def _pad_crops(x: torch.Tensor, crops: list, offsets: list, grid: tuple) -> torch.Tensor:
    """``x`` ``[B, 1, T, bx, by, bz]`` of crops (sample ``b``'s at the box's origin) placed into zeros ``[B, 1, T, *grid]``
    at ``offsets[b]``: one copy when every sample has the same crop and offset, else one per sample."""
    out = x.new_zeros((*x.shape[:3], *grid))
    if all(c == crops[0] for c in crops) and all(o == offsets[0] for o in offsets):
        (cx, cy, cz), (ox, oy, oz) = crops[0], offsets[0]
        out[..., ox:ox + cx, oy:oy + cy, oz:oz + cz] = x[..., :cx, :cy, :cz]
        return out
    for b, ((cx, cy, cz), (ox, oy, oz)) in enumerate(zip(crops, offsets)):
        out[b, ..., ox:ox + cx, oy:oy + cy, oz:oz + cz] = x[b, ..., :cx, :cy, :cz]
    return out
