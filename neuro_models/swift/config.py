"""Configs and the named size ladder of the SwiFT v2 family (original 4D and revised factorized).

Counting convention (``param_counts``)
-------------------------------------
* ``encoder``: everything of the encoder (patch embedding, learned position embeddings, blocks,
  patch merging, final norm; LayerScale for the revised variant). This is the number the SwiFT v2
  ladder names (50.9M / 202.2M / 806.2M / 3219M at patch 6x6x6x2, input 96^3 x 20, depths
  2-2-18-2, heads 6-12-24-48; width 1536 gives ~12.9B). Position embeddings depend on the input
  grid, so the encoder count depends on ``img_size`` by a little (0.5M at 96^3 x 20, width 96).
* ``decoder``: the SimMIM mask token and reconstruction decoder (pre-training only).
* ``total``: encoder + decoder (the pre-training model).
* ``non_embedding``: ``total`` minus the patch embedding, the position embeddings and the mask
  token (what scaling-law fits in the style of Kaplan et al. use).

Sizes are named after the seed's nominal labels; ``EXPECTED_ENCODER_PARAMS`` records the documented
encoder count that ``tests/models/test_swift_sizes.py`` checks within 1%.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..mup_utils import check_parametrization

MASKING_TYPES = ("random", "tube", "temporal")
LOSS_TYPES = ("l1", "l2", "huber")
SHIFT_IMPLS = ("mask", "split")
ATTN_IMPLS = ("sdpa", "flex", "triton", "auto")  # chosen per block call (neuro_models.swift.model.WindowBlock4D)
MLP_IMPLS = ("torch", "epilogue", "auto")  # chosen per MLP call (neuro_models.swift.layers.Mlp)


def _tuple(v: Any, n: int, name: str) -> tuple[int, ...]:
    t = tuple(int(x) for x in v)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries, got {v!r}")
    return t


@dataclass(frozen=True, kw_only=True)
class SwiftConfig:
    """Config of the original SwiFT v2 (4D shifted-window Swin + SimMIM)."""

    family: str = "swift_v2"
    """Registry family name: "swift_v2" (4D windows) or "swift_v2_revised" (factorized + RoPE)."""
    size: str = "custom"
    """Nominal size label (for run ids and tables only)."""
    img_size: tuple[int, int, int, int] = (96, 96, 96, 20)
    """Input grid (X, Y, Z, T) in voxels and frames; divisible by ``patch_size``."""
    in_chans: int = 1
    """Input channels (1 for BOLD)."""
    patch_size: tuple[int, int, int, int] = (6, 6, 6, 2)
    """Patch size (px, py, pz, pt); v1 used 6x6x6x1, v2 6x6x6x2."""
    embed_dim: int = 96
    """Width of the first stage; stage i has width ``embed_dim * 2**i``."""
    depths: tuple[int, ...] = (2, 2, 18, 2)
    """Blocks per stage."""
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    """Attention heads per stage (scaled with width by ``with_width``: head dim stays fixed)."""
    window_size: tuple[int, int, int, int] = (4, 4, 4, 2)
    """Attention window (wx, wy, wz, wt) in tokens. Clipped to the feature map in later stages
    (and then not shifted there); must not exceed the first stage's grid. The default covers
    4x4x4 patches and 4 frames (2 tokens of 2 frames), as v1's 4x4x4x4 window at patch 6x6x6x1."""
    mlp_ratio: float = 4.0
    """MLP hidden width / width."""
    qkv_bias: bool = True
    """Bias in the qkv projection."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate (linearly increasing over blocks)."""
    last_layer_full_attention: bool = True
    """Full (global) attention in the last stage instead of windows (SwiFT v1 default)."""
    shift_impl: str = "split"
    """How shifted windows are computed (identical math): "split" (mask-free: boundary windows are
    split into half windows so SDPA can use flash kernels; falls back to "mask" when a shifted
    axis's shift is not half its window) or "mask" (Swin's region mask as an SDPA bias)."""
    attn_impl: str = "auto"
    """Window-attention kernel of the 4D family (identical math; the revised family always uses SDPA):
    "sdpa" (fused scaled_dot_product_attention, shifted windows per ``shift_impl``), "flex"
    (FlexAttention: Triton kernels generated for the head dim, and a shifted block is one call with Swin's
    regions as a block mask; needs ``torch.compile``d blocks to be fast and, in torch 2.13, a GPU for the
    backward pass), "triton" (``swift.kernels.window_attn``: a forward and a backward kernel written for
    short windows and small heads, one program per window and head, Swin's regions as two small tables; eager
    or compiled, on CUDA under bf16/fp16 autocast, for windows of <= 256 tokens and head dims 16-64 (a power of
    two); SDPA elsewhere) or "auto": "triton" where it can run (on H100 it beat FlexAttention on every window
    block of the 51M, and the whole model 235 -> 249 samples/s; BENCHMARKS.md, session 9), else FlexAttention
    inside compiled blocks on CUDA (float32), else SDPA, so CPU and XPU runs are unchanged."""
    bf16_residual: bool = False
    """Under bf16 autocast, keep the encoder's residual stream (block inputs and outputs, from the position
    embedding on) in bf16 instead of float32. Norms still compute in float32 and weights stay float32
    (Megatron-LM's default, ``fp32_residual_connection=False``). Halves the bytes of the residual adds and
    norm reads, which dominate the memory-bound first stages. No effect without autocast. Off by default: on
    one H100 (session 15) it made the v1-configuration `train()` step 12% faster, but a paired 260-step run
    ended 1.9% higher in train loss and 1.5% in validation (BENCHMARKS.md)."""
    fused_head: bool = True
    """4D family: on CUDA with Triton, compute the decoder's tail (GELU, linear to voxels) and the reconstruction
    loss in one fused kernel (``swift.kernels.fused_head``: same loss, float32, the input read once instead of
    a transposed read in both passes). Elsewhere (CPU, XPU, the revised family, decoder_dim not a power of two
    >= 16, DeepSpeed ZeRO-3 partitioned weights) and inside a whole-model ``torch.compile`` trace, the PyTorch
    path runs."""
    fused_mlp: bool = False
    """4D family: on CUDA with Triton, under bf16/fp16 autocast, run the MLPs of widths <= 256 (the first two
    stages of the v2 ladder's 51M) as fused Triton kernels that keep the 4x wider hidden activation on chip
    (``swift.kernels.fused_mlp``; same math, the hidden activation recomputed in the backward). A memory
    option: on H100 the 51M's peak at batch 16 drops 18.3 -> 14.9 GiB for 1.4% less throughput (BENCHMARKS.md,
    session 8). Elsewhere (CPU, XPU, float32, wider MLPs, ZeRO-3 partitioned weights) the PyTorch path runs."""
    mlp_impl: str = "auto"
    """4D family, MLP kernels (same math): "torch" (``nn.Linear``, ``nn.GELU``: cuBLAS plus Inductor's pointwise
    kernels), "epilogue" (``swift.kernels.gelu_mlp``: GELU and GELU' in the epilogue of fc1's matmul, fc1's input
    gradient times GELU' with both bias gradients in the epilogue of fc2's input-gradient matmul; Triton, on CUDA
    under bf16/fp16 autocast, for widths that are multiples of 32 up to ``gelu_mlp.MAX_DIM`` = 256, the first two
    stages of the 51M; the PyTorch path elsewhere) or "auto": "epilogue" where it can run (on H100 a stage-1 block
    13.10 -> 12.33 ms and the whole model 256.0 -> 262.9 samples/s on one host; BENCHMARKS.md, session 10), so CPU
    and XPU runs are unchanged. ``fused_mlp`` takes precedence where it runs."""
    use_checkpoint: bool = False
    """Activation checkpointing of every block (saves memory, ~30% more compute)."""
    parametrization: str = "sp"
    """"sp" (standard) or "mup" (maximal update, via the ``mup`` package)."""
    mup_base_width: int = 32
    """Base width of muP (muP equals SP at this width); the delta model has twice this width."""
    mask_ratio: float = 0.6
    """Fraction of mask cells masked for SimMIM."""
    mask_patch_size: tuple[int, int, int, int] = (12, 12, 12, 2)
    """Mask cell in voxels/frames; a multiple of ``patch_size``."""
    masking_type: str = "random"
    """"random" (independent cells), "tube" (one 3D mask for all frames), "temporal" (whole frames)."""
    loss_type: str = "l1"
    """Reconstruction loss on masked voxels: "l1", "l2" or "huber"."""
    huber_delta: float = 1.0
    """Huber threshold (``loss_type="huber"``)."""
    brain_only_loss: bool = True
    """Restrict the loss to brain voxels when a ``brain_mask`` is given."""
    decoder_dim: int = 16
    """Channels per voxel group of the light pixel-shuffle decoder."""
    # revised-variant fields (ignored by the original family)
    layer_scale_init: float = 1e-1
    """Revised only: initial LayerScale value on every residual branch."""
    rope_theta: float = 100.0
    """Revised only: RoPE base frequency (positions are small window coordinates)."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def grid(self) -> tuple[int, int, int, int]:
        """Token grid of the first stage (X', Y', Z', T')."""
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(self.num_stages)]

    def stage_grids(self) -> list[tuple[int, int, int, int]]:
        gx, gy, gz, gt = self.grid
        return [(gx >> i, gy >> i, gz >> i, gt) for i in range(self.num_stages)]

    def replace(self, **kw: Any) -> "SwiftConfig":
        return dataclasses.replace(self, **kw)


def stage_window(grid: tuple[int, ...], window: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window and shift used on a feature map ``grid``: clipped where the map is not larger than the
    window (and no shift there), else the window with shift ``window // 2`` (Swin's rule)."""
    win, shift = [], []
    for g, w in zip(grid, window):
        if g <= w:
            win.append(g)
            shift.append(0)
        else:
            win.append(w)
            shift.append(w // 2)
    return tuple(win), tuple(shift)


def validate(cfg: SwiftConfig) -> None:
    """Raise ``ValueError`` naming the field and the allowed values for a bad config."""
    if cfg.family not in ("swift_v2", "swift_v2_revised"):
        raise ValueError(f"family={cfg.family!r}; allowed: 'swift_v2', 'swift_v2_revised'")
    check_parametrization(cfg.parametrization)
    for name in ("img_size", "patch_size", "window_size", "mask_patch_size"):
        object.__setattr__(cfg, name, _tuple(getattr(cfg, name), 4, name))
    object.__setattr__(cfg, "depths", tuple(int(d) for d in cfg.depths))
    object.__setattr__(cfg, "num_heads", tuple(int(h) for h in cfg.num_heads))
    if any(v <= 0 for v in (*cfg.img_size, *cfg.patch_size, *cfg.window_size, cfg.in_chans, cfg.embed_dim)):
        raise ValueError("img_size, patch_size, window_size, in_chans and embed_dim must be positive")
    for i, p, axis in zip(cfg.img_size, cfg.patch_size, "XYZT"):
        if i % p:
            raise ValueError(f"patch_size={cfg.patch_size} must divide img_size={cfg.img_size} "
                             f"(axis {axis}: {i} % {p} = {i % p}); allowed: divisors of {i}")
    if not cfg.depths or any(d <= 0 for d in cfg.depths):
        raise ValueError(f"depths={cfg.depths} must be a non-empty tuple of positive ints")
    if len(cfg.num_heads) != len(cfg.depths):
        raise ValueError(f"num_heads={cfg.num_heads} must have one entry per stage (depths={cfg.depths})")
    for i, (d, h) in enumerate(zip(cfg.stage_dims(), cfg.num_heads)):
        if h <= 0 or d % h:
            raise ValueError(f"num_heads[{i}]={h} must divide the stage width {d}; allowed: divisors of {d}")
        if cfg.family == "swift_v2_revised" and (d // h) % 2:
            raise ValueError(f"num_heads[{i}]={h} gives odd head dim {d // h}; RoPE needs an even head dim")
    grid = cfg.grid
    down = 2 ** (cfg.num_stages - 1)
    for g, axis in zip(grid[:3], "XYZ"):
        if g % down:
            raise ValueError(f"img_size/patch_size gives {g} tokens on axis {axis}, not divisible by "
                             f"2**(len(depths)-1)={down} (patch merging); allowed: multiples of {down}")
    for i, (g, w, axis) in enumerate(zip(grid, cfg.window_size, "XYZT")):
        if w > g:
            raise ValueError(f"window_size={cfg.window_size} is larger than the first-stage feature map "
                             f"{grid} on axis {axis}; allowed: 1..{g}")
    for s, sg in enumerate(cfg.stage_grids()):
        if cfg.last_layer_full_attention and s == cfg.num_stages - 1 and cfg.family == "swift_v2":
            continue
        win, _ = stage_window(sg, cfg.window_size)
        for g, w, axis in zip(sg, win, "XYZT"):
            if g % w:
                raise ValueError(f"window_size={cfg.window_size} does not tile stage {s} feature map {sg} "
                                 f"on axis {axis} ({g} % {w} != 0); allowed: divisors of {g}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={cfg.drop_path_rate}; allowed: [0, 1)")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={cfg.mask_ratio}; allowed: (0, 1)")
    for m, p, i, axis in zip(cfg.mask_patch_size, cfg.patch_size, cfg.img_size, "XYZT"):
        if m % p or i % m:
            raise ValueError(f"mask_patch_size={cfg.mask_patch_size} must be a multiple of patch_size="
                             f"{cfg.patch_size} and divide img_size={cfg.img_size} (axis {axis})")
    if cfg.masking_type not in MASKING_TYPES:
        raise ValueError(f"masking_type={cfg.masking_type!r}; allowed: {MASKING_TYPES}")
    if cfg.shift_impl not in SHIFT_IMPLS:
        raise ValueError(f"shift_impl={cfg.shift_impl!r}; allowed: {SHIFT_IMPLS}")
    if cfg.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={cfg.attn_impl!r}; allowed: {ATTN_IMPLS}")
    if cfg.mlp_impl not in MLP_IMPLS:
        raise ValueError(f"mlp_impl={cfg.mlp_impl!r}; allowed: {MLP_IMPLS}")
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={cfg.loss_type!r}; allowed: {LOSS_TYPES}")
    if cfg.mup_base_width <= 0:
        raise ValueError(f"mup_base_width={cfg.mup_base_width}; allowed: positive ints")
    if cfg.decoder_dim <= 0:
        raise ValueError(f"decoder_dim={cfg.decoder_dim}; allowed: positive ints")


# --------------------------------------------------------------------------------------------------
# size ladder (width-only, SwiFT v2): depths 2-2-18-2, heads 6-12-24-48 at width 96 (head dim 16)
# --------------------------------------------------------------------------------------------------
_LADDER = {"51M": 96, "202M": 192, "806M": 384, "3B": 768, "13.4B": 1536}

#: documented encoder parameter counts at patch 6x6x6x2, input 96^3 x 20 (SwiFT v2 ladder; the last
#: is our count for the exploratory width 1536, "about 12.9B")
EXPECTED_ENCODER_PARAMS = {"51M": 50.9e6, "202M": 202.2e6, "806M": 806.2e6, "3B": 3219e6, "13.4B": 12.9e9}


def _ladder_config(width: int, **kw: Any) -> dict[str, Any]:
    heads = tuple(width * 2**i // 16 for i in range(4))
    return dict(embed_dim=width, depths=(2, 2, 18, 2), num_heads=heads, **kw)


def size_kwargs(size: str) -> dict[str, Any]:
    """Field values of a named size (before family-specific defaults and overrides)."""
    if size == "debug":
        return dict(size="debug", img_size=(24, 24, 24, 4), patch_size=(6, 6, 6, 1), embed_dim=16,
                    depths=(2, 2), num_heads=(1, 2), window_size=(2, 2, 2, 2), mask_patch_size=(12, 12, 12, 2),
                    mup_base_width=16, decoder_dim=8, drop_path_rate=0.0)
    if size in _LADDER:
        return dict(size=size, **_ladder_config(_LADDER[size]))
    raise ValueError(f"size={size!r}; allowed: {['debug', *_LADDER]}")


SIZE_NAMES = ("debug", *_LADDER)


def with_width(cfg: SwiftConfig, width: int) -> SwiftConfig:
    """The same config at another first-stage width; heads scale so the head dim stays fixed."""
    if width <= 0:
        raise ValueError(f"width={width}; allowed: positive ints")
    heads = []
    for i, (d, h) in enumerate(zip(cfg.stage_dims(), cfg.num_heads)):
        head_dim = d // h
        new_d = width * 2**i
        if new_d % head_dim:
            raise ValueError(f"width={width} gives stage {i} width {new_d}, not a multiple of the head dim "
                             f"{head_dim}; allowed: multiples of {head_dim}")
        heads.append(new_d // head_dim)
    return cfg.replace(embed_dim=width, num_heads=tuple(heads), size=f"w{width}")
