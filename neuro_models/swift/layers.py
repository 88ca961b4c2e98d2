"""Building blocks of the SwiFT encoders: patch embedding, window partition, shifted-window attention
with fused SDPA, patch merging, stochastic depth.

Shape legend: B batch, C channels, X Y Z space, T time (input voxels/frames or tokens),
D width, N tokens per window, W windows per sample, H heads, E head dim.

Layout: tokens stay channels-last, ``x_BXYZTD``, through the whole encoder, so norms and linear
layers act on the last (contiguous) axis and no permute is needed between blocks. A window
partition is one ``view -> permute -> reshape`` copy (fused with the cyclic shift by
``torch.compile``), and attention runs as one fused ``scaled_dot_product_attention`` call over all
windows of the batch.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath  # noqa: F401  (re-exported: the blocks import it from here)
from .kernels import gelu_mlp, window_attn


# --------------------------------------------------------------------------------------------------
# window partition
# --------------------------------------------------------------------------------------------------
def window_partition(x_BXYZTD: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """Split a channels-last map into windows: ``[B, X, Y, Z, T, D] -> [B*W, N, D]``.

    Windows are ordered (x, y, z, t) row-major inside each sample; tokens inside a window likewise.
    The spatial rank is ``len(window)`` (4 for 4D windows, 3 for space, 1 for time on the last axis).
    """
    B, *dims, D = x_BXYZTD.shape
    if len(dims) != len(window):
        raise ValueError(f"window {window} has rank {len(window)}, tensor has {len(dims)} map axes")
    shape = [B]
    for g, w in zip(dims, window):
        shape += [g // w, w]
    x = x_BXYZTD.reshape(*shape, D)
    k = len(window)
    perm = [0] + [1 + 2 * i for i in range(k)] + [2 + 2 * i for i in range(k)] + [1 + 2 * k]
    n = math.prod(window)
    return x.permute(*perm).reshape(-1, n, D)


def window_reverse(windows_WND: torch.Tensor, window: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B*W, N, D] -> [B, *dims, D]``."""
    D = windows_WND.shape[-1]
    k = len(window)
    counts = [g // w for g, w in zip(dims, window)]
    x = windows_WND.reshape(-1, *counts, *window, D)
    perm = [0]
    for i in range(k):
        perm += [1 + i, 1 + k + i]
    perm += [1 + 2 * k]
    return x.permute(*perm).reshape(-1, *dims, D)


def shifted_window_mask(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                        device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean ``[W, N, N]`` mask (True = may attend) of Swin's cyclic-shift attention, or ``None``.

    After rolling the map by ``-shift``, windows at the end of an axis hold tokens from both ends
    of the map; a token may only attend to tokens of its own region (Swin's slices
    ``[0, g-w)``, ``[g-w, g-s)``, ``[g-s, g)`` per shifted axis).
    """
    if not any(shift):
        return None
    region = torch.zeros(dims, dtype=torch.int64, device=device)
    mult = 1
    for ax, (g, w, s) in enumerate(zip(dims, window, shift)):
        if s == 0:
            continue
        pos = torch.arange(g, device=device)
        rid = (pos >= g - w).long() + (pos >= g - s).long()
        shape = [1] * len(dims)
        shape[ax] = g
        region = region + rid.view(shape) * mult
        mult *= 3
    rw = window_partition(region[None, ..., None], window)[..., 0]  # [W, N]
    return rw[:, :, None] == rw[:, None, :]


def can_split(window: tuple[int, ...], shift: tuple[int, ...]) -> bool:
    """Whether :func:`split_window_attention` applies: every shifted axis has ``shift == window / 2``."""
    return all(s == 0 or 2 * s == w for w, s in zip(window, shift))


def split_window_attention(attn: "Attention", h_rolled: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...],
                           rope_for=None) -> torch.Tensor:
    """Shifted-window attention without a mask: exact equivalent of Swin's masked cyclic shift.

    With ``shift = window / 2``, the masked last window along a shifted axis of the rolled map
    holds two regions of ``window / 2`` tokens that never attend to each other, i.e. it is two
    half-size windows. So the rolled map splits, per shifted axis, into an interior part
    ``[0, g - w)`` tiled by windows of ``w`` and a boundary part ``[g - w, g)`` tiled by windows of
    ``w / 2``; every one of the ``2^k`` boxes runs mask-free fused attention (flash kernels) over its
    windows. ``rope_for(window) -> (cos, sin)`` gives RoPE tables per window shape.
    ``h_rolled``: ``[B, *dims, D]`` (already rolled by ``-shift``); returns the same layout.
    """
    B, *dims, D = h_rolled.shape
    segments = []
    for g, w, s in zip(dims, window, shift):
        segments.append([(0, g, w)] if s == 0 else [(0, g - w, w), (g - w, g, w // 2)])
    out = h_rolled.new_empty(h_rolled.shape[:-1] + (attn.proj.out_features,))
    for combo in itertools.product(*segments):
        sl = (slice(None),) + tuple(slice(a, b) for a, b, _ in combo)
        win = tuple(w for _, _, w in combo)
        box = h_rolled[sl]
        if box.numel() == 0:
            continue
        o = attn(window_partition(box, win), rope=rope_for(win) if rope_for is not None else None)
        out[sl] = window_reverse(o, win, tuple(b - a for a, b, _ in combo))
    return out


def mask_to_bias(mask_WNN: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float bias ``[B*W, 1, N, N]`` for SDPA (0 where allowed, -inf where masked).

    A float bias in the query dtype lets SDPA pick the fused memory-efficient kernel (a boolean mask
    is converted on every call); the batch copy is needed because SDPA broadcasts only size-1 dims.
    """
    bias = torch.zeros(mask_WNN.shape, dtype=dtype, device=mask_WNN.device).masked_fill(~mask_WNN, float("-inf"))
    W, N, _ = mask_WNN.shape
    return bias.unsqueeze(0).expand(batch, W, N, N).reshape(batch * W, 1, N, N)


# --------------------------------------------------------------------------------------------------
# FlexAttention over windows (Triton kernels generated for the head dim; Swin's regions as a block mask)
# --------------------------------------------------------------------------------------------------
# Which implementation runs is ``SwiftConfig.attn_impl`` (values: ``config.ATTN_IMPLS``); see :func:`use_flex`.


def region_mask_mod(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                    device: torch.device | None = None):
    """FlexAttention ``mask_mod`` of Swin's shifted-window regions (same rule as :func:`shifted_window_mask`).

    Sequence ``b`` is window ``b % W`` of the rolled map (windows in :func:`window_partition` order), so one
    function serves any number of samples. Along a shifted axis only the last window holds two regions
    (offsets ``< w - s`` and ``>= w - s``); two tokens may attend iff they share the region on every axis.
    The test runs on two small tables (bit ``j`` = shifted axis ``j``): per token of a window, the axes on
    which it lies past the cut; per window, the axes on which it is the last window. Two tokens conflict
    iff they differ on a bit the window has. (Index arithmetic per axis instead was 1.34x slower for the
    whole shifted stage-1 block on H100: 22.7 vs 16.9 ms, BENCHMARKS.md.)
    """
    tok, win = window_attn.region_bits(dims, window, shift, device)
    W = win.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return ((tok[q_idx] ^ tok[kv_idx]) & win[b % W]) == 0

    return mask_mod


@functools.lru_cache(maxsize=32)
def region_block_mask(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], num_seq: int,
                      device: torch.device):
    """Cached FlexAttention ``BlockMask`` of :func:`region_mask_mod` for ``num_seq`` windows (a multiple of
    the windows per sample ``W``): built for ``W`` windows and tiled, so it never evaluates the mask over
    the whole batch. Build it outside compiled code (the encoder's stage loop does) and pass it in."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    W = math.prod(g // w for g, w in zip(dims, window))
    if num_seq % W:
        raise ValueError(f"num_seq={num_seq} is not a multiple of the {W} windows per sample")
    N = math.prod(window)
    mm = region_mask_mod(dims, window, shift, device)
    base = create_block_mask(mm, B=W, H=None, Q_LEN=N, KV_LEN=N, device=device)
    reps = num_seq // W

    def tile(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat(reps, *([1] * (t.ndim - 1)))

    return BlockMask.from_kv_blocks(tile(base.kv_num_blocks), tile(base.kv_indices), tile(base.full_kv_num_blocks),
                                    tile(base.full_kv_indices), BLOCK_SIZE=base.BLOCK_SIZE, mask_mod=mm,
                                    seq_lengths=(N, N))


#: ``kernel_options`` for every FlexAttention call (block sizes, warps, stages; see
#: ``torch.nn.attention.flex_attention.FlexKernelOptions``); None: :func:`flex_kernel_options`'s defaults, ``{}``:
#: PyTorch's. Read when a block is traced, so a change needs a fresh compile. ``benchmarks/swift_blocks.py`` sweeps it.
FLEX_KERNEL_OPTIONS: dict | None = None

#: Backward blocks for small head dims on CUDA: 32-query x 128-key tiles (dK/dV loop) and 128 x 32 (dQ loop), 4
#: warps, 3 stages. H100, head dim 16, 256-token windows, fwd + bwd of a compiled block (swift_blocks.py sweep,
#: BENCHMARKS.md): attention backward 2.83 -> 2.38 ms at stage 1 and 0.182 -> 0.159 ms at stage 3, against PyTorch's
#: default and three other backward tilings; none of three forward tilings beat the default.
SMALL_HEAD_BWD_OPTIONS = dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32, bwd_num_warps=4,
                              bwd_num_stages=3)


def flex_kernel_options(head_dim: int, device: torch.device) -> dict:
    """The ``kernel_options`` of a FlexAttention call (``FLEX_KERNEL_OPTIONS`` if set)."""
    if FLEX_KERNEL_OPTIONS is not None:
        return dict(FLEX_KERNEL_OPTIONS)
    return dict(SMALL_HEAD_BWD_OPTIONS) if device.type == "cuda" and head_dim <= 32 else {}


def flex_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """``flex_attention`` over ``[S, H, N, E]``; without a block mask in chunks of ``SDPA_MAX_SEQUENCES``
    (the batch is a grid axis of the kernels too). With a block mask ``S`` must fit one call."""
    from torch.nn.attention.flex_attention import flex_attention

    S = q.shape[0]
    opts = flex_kernel_options(q.shape[-1], q.device)
    kw = {"kernel_options": opts} if opts else {}
    if S <= SDPA_MAX_SEQUENCES:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, **kw)
    if block_mask is not None:
        raise ValueError(f"{S} sequences with a block mask; at most {SDPA_MAX_SEQUENCES} per call")
    return torch.cat([flex_attention(q[i:i + SDPA_MAX_SEQUENCES], k[i:i + SDPA_MAX_SEQUENCES],
                                     v[i:i + SDPA_MAX_SEQUENCES], scale=scale, **kw)
                      for i in range(0, S, SDPA_MAX_SEQUENCES)])


def flex_eligible(attn_impl: str, device: torch.device) -> bool:
    """Whether ``attn_impl`` may run FlexAttention on ``device`` at all ("flex" anywhere, "auto" on CUDA):
    what the uncompiled stage loop can know when it decides to build a block mask."""
    return attn_impl == "flex" or (attn_impl == "auto" and device.type == "cuda")


def use_flex(attn_impl: str, device: torch.device) -> bool:
    """Whether window attention runs FlexAttention (``SwiftConfig.attn_impl``). "auto" takes it only inside
    ``torch.compile`` on CUDA: there it was faster than every SDPA kernel for every window block of the 51M
    (fwd + bwd GPU time on H100, BENCHMARKS.md); eager FlexAttention materialises the scores."""
    return flex_eligible(attn_impl, device) and (attn_impl == "flex" or torch.compiler.is_compiling())


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """Two-layer GELU MLP on the last axis. With ``fused``, the Triton kernels of
    ``swift.kernels.fused_mlp`` run it where they can (``fused_mlp.usable``: CUDA, bf16/fp16 compute, width
    <= 256), keeping the hidden activations on chip; else with ``impl`` "epilogue" or "auto" those of
    ``swift.kernels.gelu_mlp`` (``gelu_mlp.usable``: CUDA, bf16/fp16 compute, width a multiple of 32 up to 256), the
    GELU and the bias gradients in the matmuls' epilogues (``SwiftConfig.mlp_impl``); the PyTorch path runs
    everywhere else."""

    def __init__(self, dim: int, hidden: int, fused: bool = False, impl: str = "torch") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.fused = fused
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from .kernels import fused_mlp

            if fused_mlp.usable(x, self.fc1, self.fc2):
                return fused_mlp.fused_mlp(x, self.fc1, self.fc2)
        if self.impl != "torch" and gelu_mlp.usable(x, self.fc1, self.fc2):
            return gelu_mlp.gelu_mlp(x, self.fc1, self.fc2)
        return self.fc2(self.act(self.fc1(x)))


def _avoid_cudnn_sdpa() -> None:
    """Keep SDPA off the cuDNN backend (process-wide; flash / memory-efficient stay on).

    On H100 with torch 2.11, SDPA picks cuDNN attention for some of our shapes and it fails for
    the very large numbers of short windows we batch ("mha_graph.execute ... is_good()"); flash and
    memory-efficient kernels handle them. The switch is a no-op without CUDA and is set outside any
    compiled region, so ``torch.compile`` is unaffected.
    """
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


class Attention(nn.Module):
    """Multi-head self-attention over independent sequences ``[S, N, D]`` with fused SDPA.

    ``mask`` is a boolean ``[W, N, N]`` (True = may attend) shared by every group of ``W``
    consecutive sequences (the windows of one sample) or ``None``; ``rope`` optional RoPE tables
    ``(cos_NE, sin_NE)`` that rotate q and k (``[S, H, N, E]``).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, scale: float | None = None) -> None:
        super().__init__()
        _avoid_cudnn_sdpa()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_SND: torch.Tensor, mask: torch.Tensor | None = None, rope=None, *, flex: bool = False,
                block_mask=None, triton: bool = False, tables=None) -> torch.Tensor:
        """``flex=True`` runs FlexAttention with the optional ``block_mask`` instead of SDPA with ``mask``;
        ``triton=True`` the kernels of ``window_attn`` with the optional region ``tables`` (no ``rope``)."""
        S, N, D = x_SND.shape
        if triton:
            return self.proj(window_attn.window_attention(self.qkv(x_SND), self.num_heads, self.scale, tables))
        qkv = self.qkv(x_SND).reshape(S, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [S, H, N, E]
        if rope is not None:
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        if flex:
            o = flex_attention_chunked(q, k, v, block_mask, self.scale)
        else:
            bias = None if mask is None else mask_to_bias(mask, S // mask.shape[0], q.dtype)
            o = sdpa_chunked(q, k, v, bias, self.scale)
        return self.proj(o.transpose(1, 2).reshape(S, N, D))


#: Most sequences one fused SDPA call takes. The flash and memory-efficient CUDA kernels put the batch of
#: sequences in a grid dimension limited to 65535 blocks; the revised variant's temporal windows reach
#: 65536 sequences already at batch 8, T = 20 (8 x 16^3 windows x 2) and failed with "CUDA error:
#: invalid argument" (H100, torch 2.11). Larger batches run in chunks of this many sequences.
SDPA_MAX_SEQUENCES = 32768


def sdpa_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``[S, H, N, E]``, in chunks of ``SDPA_MAX_SEQUENCES`` along ``S``."""
    S = q.shape[0]
    if S <= SDPA_MAX_SEQUENCES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    outs = []
    for i in range(0, S, SDPA_MAX_SEQUENCES):
        sl = slice(i, i + SDPA_MAX_SEQUENCES)
        outs.append(F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=None if bias is None else bias[sl],
                                                   scale=scale))
    return torch.cat(outs)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE rotation ``x * cos + rotate_half(x) * sin`` on the last axis (pairs ``(i, i + E/2)``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class PatchEmbed(nn.Module):
    """Linear patch embedding: ``x_BCXYZT -> tokens [B, X', Y', Z', T', D]``."""

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, patch_size: tuple[int, int, int, int], in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_chans * math.prod(patch_size), dim)

    def forward(self, x_BCXYZT: torch.Tensor, mask_BXYZT: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None, visible_BK: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens, with the masked ones replaced by ``mask_token`` (SimMIM) when ``mask_BXYZT`` is given
        (inside the compiled region, so the replacement fuses with the layout copy).

        ``visible_BK`` (flat indices of each sample's unmasked tokens, ``masking.token_selection``): project only
        those patches and fill every other token with ``mask_token``. Same result; reads and projects only the
        visible part of the input (40% at SimMIM's mask ratio 0.6).
        """
        patches = patchify(x_BCXYZT, self.patch_size)
        if visible_BK is None:
            tok = self.proj(patches)
            if mask_BXYZT is not None:
                tok = torch.where(mask_BXYZT.unsqueeze(-1), mask_token.to(tok.dtype), tok)
            return tok
        if mask_token is None:
            raise ValueError("visible_BK needs mask_token (the value of every other token)")
        B, *grid, _ = patches.shape
        rows = torch.arange(B, device=visible_BK.device)[:, None]
        tok_vis = self.proj(gather_tokens(patches, visible_BK))  # [B, K, D]
        # a materialised fill, not an expanded view: Inductor (torch 2.11/2.13) miscompiles index_put into the
        # expand of a dtype cast (wrong tokens under bf16 autocast; tests/models/test_swift_select.py)
        full = mask_token.to(tok_vis.dtype).expand(B, math.prod(grid), tok_vis.shape[-1]).contiguous()
        return full.index_put((rows, visible_BK), tok_vis).reshape(B, *grid, tok_vis.shape[-1])


def gather_tokens(t_BXYZTF: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """Tokens ``index_BK`` (flat, row-major over the ``X, Y, Z, T`` grid) of each sample of a token map
    ``[B, X, Y, Z, T, F]``: ``[B, K, F]``. Under ``torch.compile`` the gather fuses into its consumer."""
    B, F = t_BXYZTF.shape[0], t_BXYZTF.shape[-1]
    rows = torch.arange(B, device=index_BK.device)[:, None]
    return t_BXYZTF.reshape(B, -1, F)[rows, index_BK]


def patchify(x_BCXYZT: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """``[B, C, X, Y, Z, T] -> [B, X', Y', Z', T', C*px*py*pz*pt]`` (patch vector in (C, px, py, pz, pt) order)."""
    B, C, X, Y, Z, T = x_BCXYZT.shape
    px, py, pz, pt = patch
    x = x_BCXYZT.reshape(B, C, X // px, px, Y // py, py, Z // pz, pz, T // pt, pt)
    x = x.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
    return x.reshape(B, X // px, Y // py, Z // pz, T // pt, C * px * py * pz * pt)


def unpatchify(p_BXYZTP: torch.Tensor, patch: tuple[int, ...], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B, X, Y, Z, T, _ = p_BXYZTP.shape
    px, py, pz, pt = patch
    x = p_BXYZTP.reshape(B, X, Y, Z, T, in_chans, px, py, pz, pt)
    x = x.permute(0, 5, 1, 6, 2, 7, 3, 8, 4, 9)
    return x.reshape(B, in_chans, X * px, Y * py, Z * pz, T * pt)


class PatchMerging(nn.Module):
    """Merge 2x2x2 spatial neighbours (time untouched): ``[B, X, Y, Z, T, D] -> [B, X/2, Y/2, Z/2, T, 2D]``."""

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x_BXYZTD: torch.Tensor) -> torch.Tensor:
        B, X, Y, Z, T, D = x_BXYZTD.shape
        x = x_BXYZTD.reshape(B, X // 2, 2, Y // 2, 2, Z // 2, 2, T, D)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(B, X // 2, Y // 2, Z // 2, T, 8 * D)
        return self.reduction(self.norm(x))
