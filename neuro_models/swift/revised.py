"""Revised SwiFT v2: factorized temporal (1D RoPE) then spatial (3D RoPE) shifted-window attention.

Shape legend: B batch, C channels, X Y Z space, T time, D width, N tokens per window, H heads,
E head dim.

Block (channels-last ``[B, X, Y, Z, T, D]``)::

    x = x + drop_path(gamma_t * TemporalWindowAttn(LN(x)))   # windows of w_t frames per voxel, 1D RoPE
    x = x + drop_path(gamma_s * SpatialWindowAttn(LN(x)))    # w_x*w_y*w_z windows per frame, 3D RoPE
    x = x + drop_path(gamma_m * MLP(LN(x)))

Odd blocks shift both windows cyclically by half a window (Swin's masked cross-region attention).
No absolute position embeddings: RoPE rotates q and k by their coordinates inside the window, so
attention depends only on relative positions. Attention cost per token is ``w_t + w_x w_y w_z``
instead of ``w_x w_y w_z w_t``, which is what lets longer sequences fit. The decoder is a
factorized pixel shuffle: a temporal expansion (``pt`` frames per token) then a spatial one (all
voxels of the ``r^3`` first-stage patches under each last-stage token).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import SwiftConfig, stage_window
from .layers import (Attention, DropPath, Mlp, PatchEmbed, PatchMerging, can_split, rope_rotate,
                     shifted_window_mask, split_window_attention, window_partition, window_reverse)
from .model import Stage, _scale, drop_path_rates, residual_dtype


def rope_tables(pos_NA: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[N, E]`` for multi-axis RoPE.

    The ``E/2`` rotation pairs ``(i, i + E/2)`` are dealt round-robin to the ``A`` axes of
    ``pos_NA``; the ``k``-th pair of an axis with ``n`` pairs turns at frequency
    ``theta ** (-k / n)``.
    """
    N, A = pos_NA.shape
    half = head_dim // 2
    pair = torch.arange(half, device=pos_NA.device)
    axis = pair % A
    k = pair // A
    n_per_axis = torch.div(half - axis + A - 1, A, rounding_mode="floor")  # pairs dealt to each pair's axis
    freq = theta ** (-k.double() / n_per_axis.double())
    ang = pos_NA.double()[:, axis] * freq  # [N, half]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x_SHNE: torch.Tensor, cos_NE: torch.Tensor, sin_NE: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., N, E]``) by the tables: ``x * cos + rotate_half(x) * sin``."""
    return rope_rotate(x_SHNE, cos_NE.to(x_SHNE.dtype), sin_NE.to(x_SHNE.dtype))


def window_coords(window: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Coordinates ``[N, len(window)]`` of the tokens of a window in partition order."""
    grids = torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


class FactorizedBlock(nn.Module):
    """Temporal-then-spatial window attention block with RoPE and LayerScale."""

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, dim: int, num_heads: int, window: tuple[int, ...], *, shifted: bool, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float, scale: float, layer_scale_init: float, rope_theta: float,
                 shift_impl: str = "mask") -> None:
        super().__init__()
        self.window = tuple(window)
        self.shifted = shifted
        self.shift_impl = shift_impl
        self.rope_theta = rope_theta
        self.norm_t = nn.LayerNorm(dim)
        self.attn_t = Attention(dim, num_heads, qkv_bias=qkv_bias, scale=scale)
        self.norm_s = nn.LayerNorm(dim)
        self.attn_s = Attention(dim, num_heads, qkv_bias=qkv_bias, scale=scale)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_t = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma_s = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma_m = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def _window_attn(self, attn: Attention, h: torch.Tensor, win: tuple[int, ...], shift: tuple[int, ...],
                     rope_axes: list[int]) -> torch.Tensor:
        dims = tuple(h.shape[1:5])
        if any(shift):
            h = torch.roll(h, shifts=tuple(-s for s in shift), dims=(1, 2, 3, 4))
        def rope_for(w: tuple[int, ...]):
            dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
            return rope_tables(window_coords(w, h.device)[:, rope_axes], attn.head_dim, self.rope_theta, dtype)

        if any(shift) and self.shift_impl == "split" and can_split(win, shift):
            o = split_window_attention(attn, h, win, shift, rope_for=rope_for)
        else:
            mask = shifted_window_mask(dims, win, shift, device=h.device)
            o = window_reverse(attn(window_partition(h, win), mask=mask, rope=rope_for(win)), win, dims)
        if any(shift):
            o = torch.roll(o, shifts=shift, dims=(1, 2, 3, 4))
        return o

    def forward(self, x_BXYZTD: torch.Tensor) -> torch.Tensor:
        dims = tuple(x_BXYZTD.shape[1:5])
        (wt,), (st,) = stage_window(dims[3:], self.window[3:])
        ws, ss = stage_window(dims[:3], self.window[:3])
        if not self.shifted:
            st, ss = 0, (0, 0, 0)
        o = self._window_attn(self.attn_t, self.norm_t(x_BXYZTD), (1, 1, 1, wt), (0, 0, 0, st), [3])
        x = x_BXYZTD + self.drop_path(self.gamma_t * o)
        o = self._window_attn(self.attn_s, self.norm_s(x), (*ws, 1), (*ss, 0), [0, 1, 2])
        x = x + self.drop_path(self.gamma_s * o)
        return x + self.drop_path(self.gamma_m * self.mlp(self.norm_m(x)))


class RevisedEncoder(nn.Module):
    """Revised SwiFT v2 encoder: ``x_BCXYZT -> features [B, X', Y', Z', T', D_last]``."""

    supports_prompts = False

    def __init__(self, cfg: SwiftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = cfg.stage_dims()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        dpr = iter(drop_path_rates(cfg))
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for s, (d, h, depth) in enumerate(zip(dims, cfg.num_heads, cfg.depths)):
            blocks = [FactorizedBlock(d, h, cfg.window_size, shifted=bool(i % 2), mlp_ratio=cfg.mlp_ratio,
                                      qkv_bias=cfg.qkv_bias, drop_path=next(dpr), scale=_scale(cfg, d // h),
                                      layer_scale_init=cfg.layer_scale_init, rope_theta=cfg.rope_theta,
                                      shift_impl=cfg.shift_impl)
                      for i in range(depth)]
            self.stages.append(Stage(blocks, cfg.use_checkpoint, full=False))
            if s < cfg.num_stages - 1:
                self.merges.append(PatchMerging(d))
        self.norm = nn.LayerNorm(dims[-1])
        self.num_features = dims[-1]

    def forward(self, x_BCXYZT: torch.Tensor, mask_BXYZT: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None, prompts_PD: torch.Tensor | None = None,
                visible_BK: torch.Tensor | None = None) -> torch.Tensor:
        if x_BCXYZT.ndim != 6:
            raise ValueError(f"expected input [B, C, X, Y, Z, T], got shape {tuple(x_BCXYZT.shape)}")
        x = residual_dtype(self.patch_embed(x_BCXYZT, mask_BXYZT, mask_token, visible_BK), self.cfg.bf16_residual)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < len(self.merges):
                x = residual_dtype(self.merges[s](x), self.cfg.bf16_residual)
        return self.norm(x)

    def last_block(self) -> nn.Module:
        return self.stages[-1].blocks[-1]


class FactorizedPixelShuffleDecoder(nn.Module):
    """Temporal then spatial pixel-shuffle decoder -> voxel patches ``[B, X', Y', Z', T', P]``.

    Temporal expansion: one linear layer (``MuReadout`` under muP) maps each last-stage token to
    ``pt`` frames x ``r^3`` sub-tokens x ``decoder_dim`` channels and the frames are shuffled into
    time. Spatial expansion: the ``r^3`` sub-tokens are shuffled into space (first-stage grid), then
    GELU and a linear layer give the ``px*py*pz`` voxels of every frame.
    """

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, in_dim: int, r: int, decoder_dim: int, patch_size: tuple[int, ...], in_chans: int,
                 readout: type) -> None:
        super().__init__()
        self.r, self.c, self.patch_size, self.in_chans = r, decoder_dim, tuple(patch_size), in_chans
        px, py, pz, pt = patch_size
        self.temporal = readout(in_dim, pt * r ** 3 * decoder_dim)
        self.act = nn.GELU()
        self.spatial = nn.Linear(decoder_dim, px * py * pz * in_chans)

    def forward(self, f_BXYZTD: torch.Tensor) -> torch.Tensor:
        B, X, Y, Z, T, _ = f_BXYZTD.shape
        r, c, C = self.r, self.c, self.in_chans
        px, py, pz, pt = self.patch_size
        h = self.temporal(f_BXYZTD).reshape(B, X, Y, Z, T, pt, r, r, r, c)        # temporal expansion
        h = h.permute(0, 1, 6, 2, 7, 3, 8, 4, 5, 9)                                 # [B, X, r, Y, r, Z, r, T, pt, c]
        v = self.spatial(self.act(h)).reshape(B, X, r, Y, r, Z, r, T, pt, C, px, py, pz)  # spatial expansion
        v = v.permute(0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 8)                     # -> patch layout
        return v.reshape(B, X * r, Y * r, Z * r, T, C * px * py * pz * pt)
