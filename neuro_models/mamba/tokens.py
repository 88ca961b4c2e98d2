"""4D patch tokens, their order, Fourier positions, background removal and packing.

Shape legend: ``B`` batch, ``C`` channels, ``X Y Z`` space, ``T`` time, ``N`` tokens per sample,
``P`` voxels per patch (``C * px * py * pz * pt``), ``R`` packed rows, ``L`` packed length,
``D`` width.

Token order
-----------
Tokens follow the axes t, z, y, x (the seed's "temporal-first" order). ``time_order`` says where
time sits in that order:

- ``"slowest"`` (default): nested loops ``for t: for z: for y: for x`` -- one whole brain volume
  (6x6x6 patches in z, y, x raster order) after another, so next-token prediction inside a frame
  predicts a spatial neighbour and the state sweeps the brain once per 2-frame step. This is the
  literal t -> z -> y -> x flattening.
- ``"fastest"``: ``for z: for y: for x: for t`` -- all time patches of one spatial patch in a row,
  so the next token is mostly the same place one time step later.

Background removal and packing
------------------------------
A token is *background* when its 6x6x6 spatial block holds no brain voxel of the subject's mask
(the mask is static in time, so a spatial patch is kept or dropped in every frame). Dropped tokens
never reach the backbone; the kept ones keep their original coordinates, from which the Fourier
encoding is computed, so positions survive the removal.

Samples then have different lengths. We *pack* them into one row, each sample preceded by
``gap = d_conv - 1`` zero tokens, and give the scan a ``starts`` flag at each sample's first token.
The causal depthwise convolution then sees zeros (its usual left padding) before every sample and
the scan resets its state there, so nothing leaks between samples, with no padding waste beyond
the few gap tokens and the round-up of the row to a multiple of the scan chunk. (The Mamba-1 CUDA
kernel of ``mamba-ssm`` has no boundary input, so packed rows always use our boundary-aware
scan; without removal, every sample is its own row of equal length, and the kernel can be used.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIME_ORDERS = ("slowest", "fastest")


def grid_shape(img_size, patch_size) -> tuple[int, int, int, int]:
    """Patch grid ``(gx, gy, gz, gt)``; ``ValueError`` when ``img_size`` is not divisible by ``patch_size``."""
    if len(img_size) != 4 or len(patch_size) != 4:
        raise ValueError(f"img_size and patch_size must have 4 entries (X, Y, Z, T), got {img_size}, {patch_size}")
    bad = [(i, p) for i, p in zip(img_size, patch_size) if p <= 0 or i % p]
    if bad:
        raise ValueError(f"img_size={tuple(img_size)} must be divisible by patch_size={tuple(patch_size)}")
    return tuple(i // p for i, p in zip(img_size, patch_size))  # type: ignore[return-value]


def _perm(time_order: str) -> tuple[int, ...]:
    # source axes after reshape: 0 B, 1 C, 2 gx, 3 px, 4 gy, 5 py, 6 gz, 7 pz, 8 gt, 9 pt
    if time_order == "slowest":
        return (0, 8, 6, 4, 2, 1, 3, 5, 7, 9)  # B, gt, gz, gy, gx | C, px, py, pz, pt
    if time_order == "fastest":
        return (0, 6, 4, 2, 8, 1, 3, 5, 7, 9)  # B, gz, gy, gx, gt | C, px, py, pz, pt
    raise ValueError(f"time_order={time_order!r}; allowed: {TIME_ORDERS}")


def patchify(x_BCXYZT: torch.Tensor, patch_size, time_order: str = "slowest") -> torch.Tensor:
    """Cut a 4D volume into patch tokens in sequence order: ``[B, N, P]``.

    Inside a patch the voxels are laid out as (C, px, py, pz, pt).
    """
    B, C, X, Y, Z, T = x_BCXYZT.shape
    gx, gy, gz, gt = grid_shape((X, Y, Z, T), patch_size)
    px, py, pz, pt = patch_size
    v = x_BCXYZT.reshape(B, C, gx, px, gy, py, gz, pz, gt, pt).permute(*_perm(time_order))
    return v.reshape(B, gx * gy * gz * gt, C * px * py * pz * pt)


def unpatchify(tokens_BNP: torch.Tensor, img_size, patch_size, in_chans: int,
               time_order: str = "slowest") -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, P] -> [B, C, X, Y, Z, T]``."""
    gx, gy, gz, gt = grid_shape(img_size, patch_size)
    px, py, pz, pt = patch_size
    B = tokens_BNP.shape[0]
    perm = _perm(time_order)
    shape_src = (B, in_chans, gx, px, gy, py, gz, pz, gt, pt)
    v = tokens_BNP.reshape(*[shape_src[p] for p in perm])
    inv = [perm.index(i) for i in range(10)]
    return v.permute(*inv).reshape(B, in_chans, *img_size)


def token_coords(img_size, patch_size, time_order: str = "slowest", device=None) -> torch.Tensor:
    """Continuous patch-centre coordinates ``[N, 4]`` as (x, y, z, t), each scaled to [0, 1) by the grid."""
    gx, gy, gz, gt = grid_shape(img_size, patch_size)
    axes = [(torch.arange(g, device=device, dtype=torch.float32) + 0.5) / g for g in (gx, gy, gz, gt)]
    cx, cy, cz, ct = torch.meshgrid(*axes, indexing="ij")  # [gx, gy, gz, gt]
    c = torch.stack([cx, cy, cz, ct], dim=-1)
    if time_order == "slowest":
        c = c.permute(3, 2, 1, 0, 4)  # gt, gz, gy, gx
    elif time_order == "fastest":
        c = c.permute(2, 1, 0, 3, 4)  # gz, gy, gx, gt
    else:
        raise ValueError(f"time_order={time_order!r}; allowed: {TIME_ORDERS}")
    return c.reshape(-1, 4)


class FourierPositions(torch.nn.Module):
    """Fixed (parameter-free) Fourier features of continuous 4D coordinates, width ``dim``.

    For each axis ``a`` with ``g_a`` patches, ``F = dim / 8`` angular frequencies geometrically
    spaced from ``pi`` to ``pi * g_a`` (the patch-spacing Nyquist rate), and features
    ``sin(w p), cos(w p)``: 4 axes x F x 2 = ``dim``.
    """

    def __init__(self, dim: int, grid) -> None:
        super().__init__()
        if dim % 8:
            raise ValueError(f"embed_dim={dim} must be a multiple of 8 for the 4D Fourier positions")
        f = dim // 8
        k = torch.arange(f, dtype=torch.float64) / max(f - 1, 1)
        freqs = torch.stack([math.pi * float(max(g, 1)) ** k for g in grid])  # [4, F]
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, coords_L4: torch.Tensor) -> torch.Tensor:
        ang = coords_L4.unsqueeze(-1).float() * self.freqs  # [..., 4, F]
        return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


def keep_tokens(brain_mask_BXYZ: torch.Tensor, img_size, patch_size, time_order: str = "slowest") -> torch.Tensor:
    """Boolean ``[B, N]``: True where the token's spatial patch holds at least one brain voxel."""
    B = brain_mask_BXYZ.shape[0]
    gx, gy, gz, gt = grid_shape(img_size, patch_size)
    px, py, pz, _ = patch_size
    sp = brain_mask_BXYZ.reshape(B, gx, px, gy, py, gz, pz).any(dim=6).any(dim=4).any(dim=2)  # [B, gx, gy, gz]
    sp = sp.permute(0, 3, 2, 1)  # B, gz, gy, gx
    if time_order == "slowest":
        k = sp.unsqueeze(1).expand(B, gt, gz, gy, gx)
    elif time_order == "fastest":
        k = sp.unsqueeze(-1).expand(B, gz, gy, gx, gt)
    else:
        raise ValueError(f"time_order={time_order!r}; allowed: {TIME_ORDERS}")
    return k.reshape(B, -1)


def voxel_weights(brain_mask_BXYZ: torch.Tensor, img_size, patch_size, in_chans: int,
                  time_order: str = "slowest") -> torch.Tensor:
    """Per-voxel brain indicator laid out like :func:`patchify`'s tokens: ``[B, N, P]`` (bool)."""
    B, X, Y, Z = brain_mask_BXYZ.shape
    T = img_size[3]
    m = brain_mask_BXYZ[:, None, :, :, :, None].expand(B, in_chans, X, Y, Z, T)
    return patchify(m, patch_size, time_order)


@dataclass
class Packed:
    """Tokens laid out for the backbone.

    Attributes
    ----------
    values_RLP : Tensor [R, L, P]
        Patch voxels (zeros at gap/pad positions).
    weights_RLP : Tensor [R, L, P] or None
        Brain-voxel indicator of each token (None: every voxel counts).
    coords_RL4 : Tensor [R, L, 4]
        Patch coordinates.
    valid_RL, starts_RL : bool Tensor [R, L]
        Real tokens; first token of each sample.
    sample_RL : long Tensor [R, L]
        Sample index of each position (-1 at gaps and padding).
    lengths_B : long Tensor [B]
        Tokens kept per sample.
    """

    values_RLP: torch.Tensor
    weights_RLP: torch.Tensor | None
    coords_RL4: torch.Tensor
    valid_RL: torch.Tensor
    starts_RL: torch.Tensor
    sample_RL: torch.Tensor
    lengths_B: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.lengths_B.sum())


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def pack_rows(values_BNP, weights_BNP, coords_N4, multiple: int = 1) -> Packed:
    """No removal: each sample is a row of length ``N`` (rounded up to ``multiple`` with padding)."""
    B, N, P = values_BNP.shape
    L = _round_up(N, multiple)
    pad = L - N
    dev = values_BNP.device
    pad3 = (0, 0, 0, pad)
    values = torch.nn.functional.pad(values_BNP, pad3)
    weights = None if weights_BNP is None else torch.nn.functional.pad(weights_BNP, pad3)
    coords = torch.nn.functional.pad(coords_N4, (0, 0, 0, pad)).unsqueeze(0).expand(B, L, 4)
    valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    valid[:, :N] = True
    starts = torch.zeros(B, L, dtype=torch.bool, device=dev)
    starts[:, 0] = True
    sample = torch.where(valid, torch.arange(B, device=dev)[:, None], torch.full_like(valid, -1, dtype=torch.long))
    return Packed(values, weights, coords, valid, starts, sample,
                  torch.full((B,), N, dtype=torch.long, device=dev))


def pack_kept(values_BNP, weights_BNP, coords_N4, keep_BN, gap: int, multiple: int = 1) -> Packed:
    """Background removal: keep ``keep_BN`` tokens and pack all samples into one row.

    Each sample is preceded by ``gap`` zero tokens (the causal convolution's left padding); the row
    is rounded up to ``multiple``. Raises ``ValueError`` when a sample keeps no token.
    """
    B, N, P = values_BNP.shape
    dev = values_BNP.device
    lengths = keep_BN.sum(dim=1)
    if bool((lengths == 0).any()):
        bad = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"brain_mask of sample(s) {bad} has no brain voxel: every token would be removed; "
                         "pass a mask with brain voxels or brain_mask=None to keep all tokens")
    seg = lengths + gap
    first = torch.cumsum(seg, 0) - lengths  # packed index of each sample's first kept token
    L = _round_up(int(seg.sum()), multiple)
    rank = torch.cumsum(keep_BN.long(), dim=1) - 1  # rank of each kept token inside its sample
    b_idx, n_idx = torch.nonzero(keep_BN, as_tuple=True)
    dest = first[b_idx] + rank[b_idx, n_idx]
    values = values_BNP.new_zeros(L, P)
    values[dest] = values_BNP[b_idx, n_idx]
    weights = None
    if weights_BNP is not None:
        weights = weights_BNP.new_zeros(L, P)
        weights[dest] = weights_BNP[b_idx, n_idx]
    coords = coords_N4.new_zeros(L, 4)
    coords[dest] = coords_N4[n_idx]
    valid = torch.zeros(L, dtype=torch.bool, device=dev)
    valid[dest] = True
    starts = torch.zeros(L, dtype=torch.bool, device=dev)
    starts[first] = True
    sample = torch.full((L,), -1, dtype=torch.long, device=dev)
    sample[dest] = b_idx
    return Packed(values[None], None if weights is None else weights[None], coords[None], valid[None],
                  starts[None], sample[None], lengths)
