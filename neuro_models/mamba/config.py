"""NeuroMamba configuration and its named size ladder.

Sizes are named by their *encoder* parameter count (patch embedding + Mamba blocks + final norm;
the Fourier positions have no parameters; the next-token prediction head is the decoder), rounded.
The seed's models: "1.4M" (its "small", embed 128) and "3.1M" (its best, embed 192), both
12 Mamba-1 blocks with ``d_state=16, expand=2, d_conv=4``. The ladder then grows by width and
depth. ``EXPECTED_ENCODER_PARAMS`` holds the exact counts that the tests check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .scan import SCAN_IMPLS
from .tokens import TIME_ORDERS, grid_shape

LOSSES = ("l1", "mse")
MIXERS = ("mamba1", "mamba2")


@dataclass(frozen=True, kw_only=True)
class NeuroMambaConfig:
    """One NeuroMamba model."""

    family: str = "neuromamba"
    """Registry family name (fixed)."""
    img_size: tuple[int, int, int, int] = (96, 96, 96, 20)
    """Input grid (X, Y, Z, T)."""
    in_chans: int = 1
    """Input channels."""
    patch_size: tuple[int, int, int, int] = (6, 6, 6, 2)
    """Patch (px, py, pz, pt)."""
    embed_dim: int = 192
    """Model width D (the muP width); a multiple of 8 (Fourier positions)."""
    depth: int = 12
    """Number of Mamba blocks."""
    mixer: str = "mamba1"
    """Block type: "mamba1" (selective scan, the seed's) or "mamba2" (SSD, scalar decay per head)."""
    headdim: int = 32
    """Mamba-2 head dimension P (``expand * embed_dim`` must be a multiple of it); unused by Mamba-1."""
    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Causal depthwise convolution width."""
    expand: int = 2
    """Inner width E = expand * D."""
    dt_rank: int | None = None
    """Rank of the step-size projection; None means ceil(D / 16) (Mamba's default)."""
    time_order: str = "slowest"
    """Where time sits in the t, z, y, x token order: "slowest" (frame by frame, default) or "fastest"."""
    remove_background: bool = True
    """Drop all-background tokens (from the brain mask) before the backbone and pack the samples."""
    brain_token_fraction: float = 0.364
    """Kept-token fraction assumed by :func:`flops_per_sample` when removing background: measured for
    the MNI152 2 mm brain mask centred in 96^3 (1491 of 4096 spatial 6^3 patches)."""
    loss: str = "mse"
    """Next-token loss on brain voxels: "mse" or "l1"."""
    scan_impl: str = "auto"
    """Selective-scan implementation, see :mod:`neuro_models.mamba.scan`."""
    scan_chunk: int = 16
    """Chunk length of the chunked scan (packed rows are rounded up to a multiple of it)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    drop_path_rate: float = 0.0
    """Stochastic depth, linearly increasing over blocks."""
    checkpoint_blocks: bool = False
    """Recompute each block in backward (activation checkpointing) to save memory."""
    parametrization: str = "sp"
    """"sp" (standard) or "mup" (maximal update; needs ``mup.MuAdamW``)."""
    mup_base_width: int = 128
    """muP base width (base shapes from widths base and 2 * base)."""

    def __post_init__(self) -> None:
        grid_shape(self.img_size, self.patch_size)
        if self.embed_dim <= 0 or self.embed_dim % 8:
            raise ValueError(f"embed_dim={self.embed_dim}: must be a positive multiple of 8")
        for name in ("depth", "d_state", "d_conv", "expand", "in_chans", "scan_chunk", "mup_base_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r}; allowed: {MIXERS}")
        if self.mixer == "mamba2":
            if self.headdim <= 0 or self.d_inner % self.headdim:
                raise ValueError(f"headdim={self.headdim}: must divide expand * embed_dim = {self.d_inner} for mamba2")
            if self.scan_impl not in ("auto", "chunked"):
                raise ValueError(f"scan_impl={self.scan_impl!r} with mixer='mamba2'; allowed: 'auto', 'chunked'")
        if self.time_order not in TIME_ORDERS:
            raise ValueError(f"time_order={self.time_order!r}; allowed: {TIME_ORDERS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; allowed: {LOSSES}")
        if self.scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl={self.scan_impl!r}; allowed: {SCAN_IMPLS}")
        if self.parametrization not in ("sp", "mup"):
            raise ValueError(f"parametrization={self.parametrization!r}; allowed: 'sp', 'mup'")
        if not 0.0 < self.brain_token_fraction <= 1.0:
            raise ValueError(f"brain_token_fraction={self.brain_token_fraction}: must be in (0, 1]")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate}: must be in [0, 1)")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ValueError(f"dt_rank={self.dt_rank}: must be positive or None")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def patch_dim(self) -> int:
        return self.in_chans * math.prod(self.patch_size)

    @property
    def grid(self) -> tuple[int, int, int, int]:
        return grid_shape(self.img_size, self.patch_size)

    @property
    def width(self) -> int:
        return self.embed_dim


def _block2_params(D: int, N: int, K: int, E: int, H: int) -> int:
    # in_proj D*(2E+2N+H); conv (E+2N)*(K+1); dt_bias, A_log, D: 3H; gated norm E; out_proj E*D; norm D
    return D * (2 * E + 2 * N + H) + (E + 2 * N) * (K + 1) + 3 * H + E + E * D + D


def _block_params(D: int, N: int, K: int, E: int, R: int) -> int:
    # in_proj D*2E; conv E*K + E; x_proj E*(R+2N); dt_proj R*E + E; A_log E*N; D E; out_proj E*D; norm D
    return D * 2 * E + E * K + E + E * (R + 2 * N) + R * E + E + E * N + E + E * D + D


def encoder_params(cfg: NeuroMambaConfig) -> int:
    """Analytic encoder parameter count (patch embedding + blocks + final norm)."""
    D = cfg.embed_dim
    embed = cfg.patch_dim * D + D
    if cfg.mixer == "mamba2":
        block = _block2_params(D, cfg.d_state, cfg.d_conv, cfg.d_inner, cfg.d_inner // cfg.headdim)
    else:
        block = _block_params(D, cfg.d_state, cfg.d_conv, cfg.d_inner, cfg.rank)
    return embed + cfg.depth * block + D


_LADDER = {
    # name: (embed_dim, depth)
    "debug": (32, 2),
    "1.4M": (128, 12),
    "3.1M": (192, 12),
    "12M": (384, 12),
    "41M": (512, 24),
    "91M": (768, 24),
    "320M": (1024, 48),
}

SIZES: dict[str, NeuroMambaConfig] = {
    name: NeuroMambaConfig(embed_dim=d, depth=depth) for name, (d, depth) in _LADDER.items()
}

#: documented encoder parameter counts of the named sizes (patch 6x6x6x2, one channel, d_state 16,
#: expand 2, d_conv 4, dt_rank ceil(D/16)); "1.4M" is the seed's name for its small model, whose
#: Mamba blocks hold 1,399,424 parameters (1.45M with the patch embedding)
EXPECTED_ENCODER_PARAMS: dict[str, int] = {
    "debug": 33_792,
    "1.4M": 1_454_848,
    "3.1M": 3_103_872,
    "12M": 11_737_344,
    "41M": 40_907_776,
    "91M": 90_852_864,
    "320M": 320_473_088,
}
