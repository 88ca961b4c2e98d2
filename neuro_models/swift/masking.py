"""SimMIM mask generator for 4D token grids.

A *mask cell* is ``mask_patch_size / patch_size`` tokens per axis (e.g. 12x12x12x2 voxels on
6x6x6x2 patches = 2x2x2x1 tokens). Exactly ``round(mask_ratio * n_cells)`` cells are masked per
sample, so the ratio is hit exactly (up to the cell granularity):

* ``random``: cells drawn independently over (x, y, z, t);
* ``tube``: one 3D cell mask repeated over all frames;
* ``temporal``: whole time cells masked (every spatial cell of the chosen frames).

Masks are drawn sample by sample from one ``torch.Generator`` on the CPU, so
``make_mask(2, g)`` equals ``cat(make_mask(1, g), make_mask(1, g))`` and the training engine can
seed a generator per sample.

Every mask of a config masks the same number of tokens per sample (:func:`masked_tokens_per_sample`), so the
masked and the visible tokens have static counts: :func:`token_selection` lists them, and the SimMIM model
embeds only the visible tokens (the masked ones are replaced by the mask token anyway).
"""
from __future__ import annotations

import math

import torch

from .config import SwiftConfig


def _cells(cfg: SwiftConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    cell = tuple(m // p for m, p in zip(cfg.mask_patch_size, cfg.patch_size))
    counts = tuple(g // c for g, c in zip(cfg.grid, cell))
    return cell, counts


def num_masked_cells(n_cells: int, ratio: float) -> int:
    """Cells masked per sample: ``round(ratio * n_cells)``, at least 1 and at most ``n_cells - 1``."""
    return min(max(int(round(ratio * n_cells)), 1), max(n_cells - 1, 1))


def masked_tokens_per_sample(cfg: SwiftConfig) -> int:
    """Tokens every mask of :func:`make_mask` masks in one sample (the same for all three masking types)."""
    cell, (cx, cy, cz, ct) = _cells(cfg)
    vol = math.prod(cell)
    if cfg.masking_type == "random":
        return num_masked_cells(cx * cy * cz * ct, cfg.mask_ratio) * vol
    if cfg.masking_type == "tube":
        return num_masked_cells(cx * cy * cz, cfg.mask_ratio) * ct * vol
    return num_masked_cells(ct, cfg.mask_ratio) * cx * cy * cz * vol


def token_selection(mask_BXYZT: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices (into the ``X'*Y'*Z'*T'`` grid, row-major) of each sample's visible and masked tokens:
    ``(visible [B, N - num_masked], masked [B, num_masked])``, each ascending.

    Exact only if every sample masks exactly ``num_masked`` tokens (true of :func:`make_mask`'s masks; the caller
    checks other masks). One stable sort on the mask's device, no host synchronisation.
    """
    B = mask_BXYZT.shape[0]
    flat = mask_BXYZT.reshape(B, -1)
    N = flat.shape[1]
    if not 0 < num_masked < N:
        raise ValueError(f"num_masked={num_masked}; allowed: 1 .. {N - 1} (tokens per sample: {N})")
    order = torch.argsort(flat.to(torch.uint8), dim=1, stable=True)
    return order[:, : N - num_masked], order[:, N - num_masked:]


def make_mask(cfg: SwiftConfig, batch_size: int, *, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean token mask ``[B, X', Y', Z', T']`` (True = masked) for ``cfg``.

    Parameters
    ----------
    cfg : SwiftConfig
        Gives the token grid, ``mask_patch_size``, ``mask_ratio`` and ``masking_type``.
    batch_size : int
        Number of samples.
    generator : torch.Generator, optional
        CPU generator; the masks are a deterministic function of its state.
    device : torch.device, optional
        Where the result is placed.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; allowed: positive ints")
    cell, (cx, cy, cz, ct) = _cells(cfg)
    masks = []
    for _ in range(batch_size):
        if cfg.masking_type == "random":
            n = cx * cy * cz * ct
            idx = torch.randperm(n, generator=generator)[: num_masked_cells(n, cfg.mask_ratio)]
            m = torch.zeros(n, dtype=torch.bool)
            m[idx] = True
            m = m.view(cx, cy, cz, ct)
        elif cfg.masking_type == "tube":
            n = cx * cy * cz
            idx = torch.randperm(n, generator=generator)[: num_masked_cells(n, cfg.mask_ratio)]
            m = torch.zeros(n, dtype=torch.bool)
            m[idx] = True
            m = m.view(cx, cy, cz, 1).expand(cx, cy, cz, ct)
        else:  # temporal
            idx = torch.randperm(ct, generator=generator)[: num_masked_cells(ct, cfg.mask_ratio)]
            m = torch.zeros(ct, dtype=torch.bool)
            m[idx] = True
            m = m.view(1, 1, 1, ct).expand(cx, cy, cz, ct)
        masks.append(m)
    mask = torch.stack(masks)  # [B, cx, cy, cz, ct]
    # each cell to its (a, b, c, d) tokens: repeat_interleave along every axis, as one broadcast copy (four
    # repeat_interleave calls on a bool tensor were most of a loader worker's mask time)
    (a, b, c, d), B = cell, mask.shape[0]
    mask = (mask[:, :, None, :, None, :, None, :, None].expand(B, cx, a, cy, b, cz, c, ct, d)
            .reshape(B, cx * a, cy * b, cz * c, ct * d))
    return mask.to(device) if device is not None else mask
