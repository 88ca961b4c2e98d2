"""Patch tokens, their order, Fourier positions, background removal and packing."""
from __future__ import annotations

import pytest
import torch

from neuro_models.mamba.tokens import (FourierPositions, grid_shape, keep_tokens, pack_kept, pack_rows, patchify,
                                       token_coords, unpatchify, voxel_weights)

IMG = (12, 18, 24, 6)   # distinct sizes: a swapped axis fails
PATCH = (6, 6, 6, 2)    # grid (2, 3, 4, 3)


def _coded_volume(C=2):
    """Every voxel holds a code of its patch (ix, iy, iz, it) and channel."""
    gx, gy, gz, gt = grid_shape(IMG, PATCH)
    x = torch.zeros(1, C, *IMG, dtype=torch.float64)
    for c in range(C):
        for ix in range(gx):
            for iy in range(gy):
                for iz in range(gz):
                    for it in range(gt):
                        x[0, c, ix * 6:(ix + 1) * 6, iy * 6:(iy + 1) * 6, iz * 6:(iz + 1) * 6, it * 2:(it + 1) * 2] = (
                            1000 * c + 100 * ix + 10 * iy + iz + 0.01 * it)
    return x


@pytest.mark.parametrize("time_order", ["slowest", "fastest"])
def test_token_order(time_order):
    gx, gy, gz, gt = grid_shape(IMG, PATCH)
    assert (gx, gy, gz, gt) == (2, 3, 4, 3)
    tok = patchify(_coded_volume(), PATCH, time_order)
    assert tok.shape == (1, gx * gy * gz * gt, 2 * 6 * 6 * 6 * 2)
    k = 0
    if time_order == "slowest":   # for t: for z: for y: for x
        order = [(ix, iy, iz, it) for it in range(gt) for iz in range(gz) for iy in range(gy) for ix in range(gx)]
    else:                         # for z: for y: for x: for t
        order = [(ix, iy, iz, it) for iz in range(gz) for iy in range(gy) for ix in range(gx) for it in range(gt)]
    for k, (ix, iy, iz, it) in enumerate(order):
        half = tok.shape[2] // 2  # channel 0 voxels first, then channel 1
        code = 100 * ix + 10 * iy + iz + 0.01 * it
        assert torch.all(tok[0, k, :half] == code), (k, ix, iy, iz, it)
        assert torch.all(tok[0, k, half:] == 1000 + code)
    # coordinates follow the same order
    coords = token_coords(IMG, PATCH, time_order)
    expect = torch.tensor([[(ix + .5) / gx, (iy + .5) / gy, (iz + .5) / gz, (it + .5) / gt] for ix, iy, iz, it in order])
    assert torch.allclose(coords, expect.float())


@pytest.mark.parametrize("time_order", ["slowest", "fastest"])
def test_unpatchify_roundtrip(time_order):
    x = torch.randn(2, 2, *IMG)
    tok = patchify(x, PATCH, time_order)
    assert torch.equal(unpatchify(tok, IMG, PATCH, 2, time_order), x)


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="divisible"):
        grid_shape((13, 18, 24, 6), PATCH)
    with pytest.raises(ValueError, match="time_order"):
        patchify(torch.zeros(1, 1, *IMG), PATCH, "sideways")


def _mask():
    m = torch.zeros(2, *IMG[:3], dtype=torch.bool)
    m[0, 7, 2, 13] = True            # one voxel in spatial patch (1, 0, 2)
    m[0, 0:2, 17, 23] = True         # patch (0, 2, 3)
    m[1, 3:9, 8:14, 5:8] = True      # spans x patches 0-1, y patches 1-2, z patches 0-1
    return m


@pytest.mark.parametrize("time_order", ["slowest", "fastest"])
def test_keep_drops_exactly_all_background_patches(time_order):
    m = _mask()
    keep = keep_tokens(m, IMG, PATCH, time_order)
    # brute force: a token is kept iff its patch of the (time-repeated) mask has a brain voxel
    vw = voxel_weights(m, IMG, PATCH, 1, time_order)
    assert torch.equal(keep, vw.any(-1))
    assert keep[0].sum() == 2 * 3 and keep[1].sum() == 8 * 3


@pytest.mark.parametrize("time_order", ["slowest", "fastest"])
def test_pack_kept_keeps_values_positions_and_boundaries(time_order):
    m = _mask()
    x = torch.randn(2, 1, *IMG)
    vals = patchify(x, PATCH, time_order)
    coords = token_coords(IMG, PATCH, time_order)
    keep = keep_tokens(m, IMG, PATCH, time_order)
    p = pack_kept(vals, None, coords, keep, gap=3, multiple=16)
    assert p.values_RLP.shape[0] == 1 and p.values_RLP.shape[1] % 16 == 0
    assert p.lengths_B.tolist() == [6, 24] and p.num_tokens == 30
    # layout: 3 gaps, sample 0 (6 tokens), 3 gaps, sample 1 (24 tokens), padding
    assert p.valid_RL[0].nonzero().flatten().tolist() == list(range(3, 9)) + list(range(12, 36))
    assert p.starts_RL[0].nonzero().flatten().tolist() == [3, 12]
    for b, first in ((0, 3), (1, 12)):
        idx = keep[b].nonzero().flatten()  # original order preserved
        n = len(idx)
        assert torch.equal(p.values_RLP[0, first:first + n], vals[b, idx])
        assert torch.equal(p.coords_RL4[0, first:first + n], coords[idx])
        assert (p.sample_RL[0, first:first + n] == b).all()
    assert (p.values_RLP[0][~p.valid_RL[0]] == 0).all()
    assert (p.sample_RL[0][~p.valid_RL[0]] == -1).all()


def test_pack_kept_all_background_sample_raises():
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[0, 1] = True
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        pack_kept(torch.zeros(2, 5, 3), None, torch.zeros(5, 4), keep, gap=3)


def test_pack_rows_pads_to_multiple():
    p = pack_rows(torch.ones(3, 10, 4), None, torch.zeros(10, 4), multiple=8)
    assert p.values_RLP.shape == (3, 16, 4)
    assert p.valid_RL.sum(1).tolist() == [10, 10, 10]
    assert p.starts_RL[:, 0].all() and not p.starts_RL[:, 1:].any()
    assert p.sample_RL[:, 0].tolist() == [0, 1, 2]


def test_fourier_positions_are_distinct_and_bounded():
    grid = grid_shape(IMG, PATCH)
    enc = FourierPositions(32, grid)
    coords = token_coords(IMG, PATCH)
    f = enc(coords)
    assert f.shape == (coords.shape[0], 32)
    assert f.abs().max() <= 1.0
    # each axis gets 4 frequencies x (sin, cos); the lowest angular frequency is pi
    assert torch.allclose(f[:, 0], torch.sin(torch.pi * coords[:, 0]))
    # every token has its own encoding (positions identifiable after removal)
    d = torch.cdist(f, f) + torch.eye(len(f)) * 10
    assert d.min() > 1e-2
    with pytest.raises(ValueError, match="multiple of 8"):
        FourierPositions(36, grid)
