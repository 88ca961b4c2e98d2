"""SwiFT v2 encoder (4D shifted-window Swin), SimMIM pre-training model and downstream model.

Shape legend: B batch, C input channels, X Y Z space, T time, D width, P patch vector
(C*px*py*pz*pt), N tokens.

Architecture (the public SwiFT v1 code, with SwiFT v2's temporal patching):
``x_BCXYZT -> linear patch embedding -> [+ learned spatial and temporal position embedding ->
stage of (shifted) 4D window-attention blocks -> patch merging over space] x stages -> LayerNorm``.
Blocks alternate regular and cyclically shifted windows (shift = window // 2) with Swin's masked
cross-region attention; windows are clipped (and not shifted) where the feature map is no larger
than the window; the last stage optionally uses full attention. Tokens stay channels-last
(``[B, X, Y, Z, T, D]``) throughout.

Prompt tuning: ``build_downstream_model(..., prompt_tokens=P)`` prepends ``P`` learnable tokens to
the flattened token sequence of the last, full-attention stage; every token attends to them in all
blocks of that stage and they are dropped before pooling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..heads import MLPHead
from ..mup_utils import attention_scale, readout_class
from .config import SwiftConfig, stage_window
from .layers import (SDPA_MAX_SEQUENCES, Attention, DropPath, Mlp, PatchEmbed, PatchMerging, can_split, flex_eligible,
                     patchify, region_block_mask, shifted_window_mask, split_window_attention, use_flex,
                     window_partition, window_reverse)
from .masking import make_mask, masked_tokens_per_sample, token_selection
from .kernels import window_attn


def _scale(cfg: SwiftConfig, head_dim: int) -> float:
    return attention_scale(head_dim, cfg.parametrization, base_head_dim=head_dim)


class WindowBlock4D(nn.Module):
    """Swin block with 4D (shifted) window attention: ``[B, X, Y, Z, T, D] -> same``.

    ``attn_impl`` (see ``SwiftConfig.attn_impl``): with the Triton kernels or FlexAttention a shifted block runs
    one call over the full windows with Swin's regions as tables or a block mask (``forward``'s ``block_mask``,
    built by :meth:`region_mask` outside compiled code); with SDPA it splits or masks per ``shift_impl``.
    """

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, dim: int, num_heads: int, window: tuple[int, ...], *, shifted: bool, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float, scale: float, shift_impl: str = "mask",
                 attn_impl: str = "auto", fused_mlp: bool = False, mlp_impl: str = "auto") -> None:
        super().__init__()
        self.window = tuple(window)
        self.shifted = shifted
        self.shift_impl = shift_impl
        self.attn_impl = attn_impl
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, scale=scale)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), fused=fused_mlp, impl=mlp_impl)

    def _windows(self, x_BXYZTD: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
        dims = tuple(x_BXYZTD.shape[1:5])
        win, shift = stage_window(dims, self.window)
        if not self.shifted:
            shift = (0, 0, 0, 0)
        seq = x_BXYZTD.shape[0] * math.prod([g // w for g, w in zip(dims, win)])
        return dims, win, shift, seq

    def _triton(self, x_BXYZTD: torch.Tensor, win: tuple[int, ...]) -> bool:
        """Whether this block's window attention runs the Triton kernels (``attn_impl`` "triton" or "auto", where
        ``window_attn.usable``: CUDA, bf16/fp16 compute, windows of <= 256 tokens, head dim 16-64)."""
        return self.attn_impl in ("triton", "auto") and window_attn.usable(x_BXYZTD, math.prod(win),
                                                                            self.attn.head_dim)

    def region_mask(self, x_BXYZTD: torch.Tensor):
        """What this shifted block's attention needs to mask Swin's regions for input ``x``, built outside
        compiled code (the stage loop passes it to ``forward``) and cached per shape: the Triton kernels'
        ``RegionTables``, FlexAttention's ``BlockMask``, or ``None`` (no shift here, or SDPA, which builds its
        own mask; also when there are too many windows for one FlexAttention call)."""
        dims, win, shift, seq = self._windows(x_BXYZTD)
        if not any(shift):
            return None
        if self._triton(x_BXYZTD, win):
            return window_attn.region_tables(dims, win, shift, x_BXYZTD.device)
        if seq > SDPA_MAX_SEQUENCES or not flex_eligible(self.attn_impl, x_BXYZTD.device):
            return None
        return region_block_mask(dims, win, shift, seq, x_BXYZTD.device)

    def forward(self, x_BXYZTD: torch.Tensor, block_mask=None) -> torch.Tensor:
        """``block_mask``: what :meth:`region_mask` returned for ``x`` (shifted blocks)."""
        dims, win, shift, seq = self._windows(x_BXYZTD)
        tables = block_mask if isinstance(block_mask, window_attn.RegionTables) else None
        triton = self._triton(x_BXYZTD, win) and (tables is not None or not any(shift))
        flex = not triton and use_flex(self.attn_impl, x_BXYZTD.device) and (
            (block_mask is not None and tables is None) or not any(shift))
        h = self.norm1(x_BXYZTD)
        if any(shift):
            h = torch.roll(h, shifts=tuple(-s for s in shift), dims=(1, 2, 3, 4))
        if triton:
            o = window_reverse(self.attn(window_partition(h, win), tables=tables, triton=True), win, dims)
        elif flex:
            o = window_reverse(self.attn(window_partition(h, win), flex=True, block_mask=block_mask), win, dims)
        elif any(shift) and self.shift_impl == "split" and can_split(win, shift):
            o = split_window_attention(self.attn, h, win, shift)
        else:
            mask = shifted_window_mask(dims, win, shift, device=h.device)
            o = window_reverse(self.attn(window_partition(h, win), mask=mask), win, dims)
        if any(shift):
            o = torch.roll(o, shifts=shift, dims=(1, 2, 3, 4))
        x = x_BXYZTD + self.drop_path(o)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FullBlock(nn.Module):
    """Transformer block with full attention over a flat sequence ``[B, N, D]``."""

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 scale: float, fused_mlp: bool = False, mlp_impl: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, scale=scale)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), fused=fused_mlp, impl=mlp_impl)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x = x_BND + self.drop_path(self.attn(self.norm1(x_BND)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def residual_dtype(x: torch.Tensor, bf16_residual: bool) -> torch.Tensor:
    """``x`` in the autocast dtype when ``bf16_residual`` and autocast is on (see ``SwiftConfig.bf16_residual``)."""
    if bf16_residual and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class PositionEmbedding(nn.Module):
    """Learned absolute position embedding: spatial ``[X, Y, Z, D]`` plus temporal ``[T, D]``.

    ``bf16_residual``: return the sum in the autocast dtype (the residual stream's dtype from here on).
    """

    compile_region = True  # see neuro_models.layers.compile_regions (two adds and a cast in one kernel)

    def __init__(self, dim: int, grid: tuple[int, int, int, int], bf16_residual: bool = False) -> None:
        super().__init__()
        X, Y, Z, T = grid
        self.bf16_residual = bf16_residual
        self.pos_embed = nn.Parameter(torch.zeros(1, X, Y, Z, 1, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, 1, 1, 1, T, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.time_embed, std=0.02)

    def forward(self, x_BXYZTD: torch.Tensor) -> torch.Tensor:
        T = x_BXYZTD.shape[4]
        if T > self.time_embed.shape[4]:
            raise ValueError(f"input has {T} time tokens, more than the configured {self.time_embed.shape[4]} "
                             "(img_size[3] / patch_size[3])")
        return residual_dtype(x_BXYZTD + self.pos_embed + self.time_embed[:, :, :, :, :T], self.bf16_residual)


class Stage(nn.Module):
    """Blocks of one stage, run with optional activation checkpointing."""

    def __init__(self, blocks: list[nn.Module], use_checkpoint: bool, full: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.use_checkpoint = use_checkpoint
        self.full = full

    def forward(self, x: torch.Tensor, prompts_PD: torch.Tensor | None = None) -> torch.Tensor:
        if self.full:  # flatten to a sequence, optionally with prompt tokens in front
            shape = x.shape
            x = x.reshape(shape[0], -1, shape[-1])
            P = 0
            if prompts_PD is not None and prompts_PD.numel():
                P = prompts_PD.shape[0]
                x = torch.cat([prompts_PD.to(x.dtype).unsqueeze(0).expand(shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            # a shifted block's region mask is built here, outside the (compiled) blocks, and cached per shape
            extra = ()
            if hasattr(blk, "region_mask"):
                bm = blk.region_mask(x)
                extra = () if bm is None else (bm,)
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, *extra, use_reentrant=False)
            else:
                x = blk(x, *extra)
        if self.full:
            x = x[:, P:].reshape(shape)
        return x


def drop_path_rates(cfg: SwiftConfig) -> list[float]:
    n = sum(cfg.depths)
    return [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]


class SwiftEncoder(nn.Module):
    """The SwiFT v2 encoder: ``x_BCXYZT -> features [B, X', Y', Z', T', D_last]`` (LayerNorm-ed)."""

    def __init__(self, cfg: SwiftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims, grids = cfg.stage_dims(), cfg.stage_grids()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embeds = nn.ModuleList(PositionEmbedding(d, g, cfg.bf16_residual) for d, g in zip(dims, grids))
        dpr = iter(drop_path_rates(cfg))
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for s, (d, h, depth) in enumerate(zip(dims, cfg.num_heads, cfg.depths)):
            full = cfg.last_layer_full_attention and s == cfg.num_stages - 1
            kw = dict(mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, scale=_scale(cfg, d // h),
                      fused_mlp=cfg.fused_mlp, mlp_impl=cfg.mlp_impl)
            if full:
                blocks = [FullBlock(d, h, drop_path=next(dpr), **kw) for _ in range(depth)]
            else:
                blocks = [WindowBlock4D(d, h, cfg.window_size, shifted=bool(i % 2), drop_path=next(dpr),
                                        shift_impl=cfg.shift_impl, attn_impl=cfg.attn_impl, **kw)
                          for i in range(depth)]
            self.stages.append(Stage(blocks, cfg.use_checkpoint, full))
            if s < cfg.num_stages - 1:
                self.merges.append(PatchMerging(d))
        self.norm = nn.LayerNorm(dims[-1])
        self.num_features = dims[-1]

    def embed(self, x_BCXYZT: torch.Tensor, mask_BXYZT: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None, visible_BK: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding with masked tokens replaced by ``mask_token`` (SimMIM); ``visible_BK``: see
        ``PatchEmbed.forward``."""
        if x_BCXYZT.ndim != 6:
            raise ValueError(f"expected input [B, C, X, Y, Z, T], got shape {tuple(x_BCXYZT.shape)}")
        return self.patch_embed(x_BCXYZT, mask_BXYZT, mask_token, visible_BK)

    def forward(self, x_BCXYZT: torch.Tensor, mask_BXYZT: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None, prompts_PD: torch.Tensor | None = None,
                visible_BK: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x_BCXYZT, mask_BXYZT, mask_token, visible_BK)
        for s, stage in enumerate(self.stages):
            x = self.pos_embeds[s](x)
            x = stage(x, prompts_PD if s == len(self.stages) - 1 else None)
            if s < len(self.merges):
                x = self.merges[s](x)
        return self.norm(x)

    def last_block(self) -> nn.Module:
        return self.stages[-1].blocks[-1]


class PixelShuffleDecoder(nn.Module):
    """Light SimMIM decoder: last-stage features -> voxel patches ``[B, X', Y', Z', T', P]``.

    One linear layer expands every last-stage token to ``r^3`` first-stage tokens of
    ``decoder_dim`` channels (r = spatial downsampling, a 3D pixel shuffle), then GELU and a linear
    layer to the ``P`` voxels of each patch. The first layer maps width to a fixed size and is a
    ``MuReadout`` under muP.
    """

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, in_dim: int, r: int, decoder_dim: int, patch_numel: int, readout: type) -> None:
        super().__init__()
        self.r = r
        self.decoder_dim = decoder_dim
        self.expand = readout(in_dim, r ** 3 * decoder_dim)
        self.act = nn.GELU()
        self.out = nn.Linear(decoder_dim, patch_numel)

    def forward(self, f_BXYZTD: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        """Voxel patches of every first-stage token; ``hidden_only``: the first-stage hidden state before GELU,
        ``[B, X', Y', Z', T', decoder_dim]`` (for the fused head)."""
        B, X, Y, Z, T, _ = f_BXYZTD.shape
        r, c = self.r, self.decoder_dim
        h = self.expand(f_BXYZTD).reshape(B, X, Y, Z, T, r, r, r, c)
        h = h.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(B, X * r, Y * r, Z * r, T, c)
        if hidden_only:
            return h
        return self.out(self.act(h))


def reconstruction_loss(cfg: SwiftConfig, pred_BXYZTP: torch.Tensor, x_BCXYZT: torch.Tensor,
                        mask_BXYZT: torch.Tensor, brain_mask_BXYZ: torch.Tensor | None) -> torch.Tensor:
    """Mean L1/L2/Huber error over masked voxels (and brain voxels when ``brain_only_loss``).

    Unmasked tokens get zero weight, so they receive no gradient through the loss. Computed in float32 (float64
    stays float64).
    """
    acc = torch.promote_types(pred_BXYZTP.dtype, torch.float32)
    target = patchify(x_BCXYZT, cfg.patch_size).to(acc)
    pred = pred_BXYZTP.to(acc)
    if cfg.loss_type == "l1":
        err = (pred - target).abs()
    elif cfg.loss_type == "l2":
        err = (pred - target).square()
    else:
        err = F.huber_loss(pred, target, reduction="none", delta=cfg.huber_delta)
    B, X, Y, Z, T, _ = err.shape
    px, py, pz, pt = cfg.patch_size
    err = err.reshape(B, X, Y, Z, T, cfg.in_chans, px * py * pz, pt)
    w = mask_BXYZT.to(acc).reshape(B, X, Y, Z, T, 1, 1, 1)
    if brain_mask_BXYZ is not None and cfg.brain_only_loss:
        bm = patchify(brain_mask_BXYZ.to(acc)[:, None, ..., None], (px, py, pz, 1))  # [B,X,Y,Z,1,pxpypz]
        w = w * bm.reshape(B, X, Y, Z, 1, 1, px * py * pz, 1)
    w = w.expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1.0)


class MIMLoss(nn.Module):
    """:func:`reconstruction_loss` as a module (so it can be compiled on its own)."""

    compile_region = True  # see neuro_models.layers.compile_regions

    def __init__(self, cfg: SwiftConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, pred_BXYZTP: torch.Tensor, x_BCXYZT: torch.Tensor, mask_BXYZT: torch.Tensor,
                brain_mask_BXYZ: torch.Tensor | None = None) -> torch.Tensor:
        return reconstruction_loss(self.cfg, pred_BXYZTP, x_BCXYZT, mask_BXYZT, brain_mask_BXYZ)


class SimMIM(nn.Module):
    """SimMIM pre-training model around any SwiFT encoder.

    ``forward(x_BCXYZT, brain_mask=None, mask=None, exact_mask=None)`` returns ``dict(loss, num_tokens, mask,
    pred, hidden, token_selection)``; ``mask`` (bool ``[B, X', Y', Z', T']``, True = masked) defaults to :meth:`make_mask` drawn from
    the global torch RNG. ``pred`` is the voxel prediction ``[B, X', Y', Z', T', P]``, or None when the fused head
    ran (``SwiftConfig.fused_head``); :meth:`full_prediction` gives it in both cases (from ``hidden``, the decoder's
    state before its last layers).

    Token selection: when every sample masks exactly ``masking.masked_tokens_per_sample(cfg)`` tokens (every mask
    :meth:`make_mask` draws), the patch embedding projects only the visible tokens (the masked ones are replaced by
    the mask token anyway): the same tokens, from 40% of the input at mask ratio 0.6. ``exact_mask``: ``True`` (the
    caller vouches for the count, e.g. the training engine, whose masks come from :meth:`make_mask`), ``False``
    (never select), ``None`` (select when the mask is drawn here or is a CPU tensor with the exact count, checked
    on the host; a mask already on an accelerator is not checked, since that would wait for the device).
    (Decoding only the masked tokens too was slower on H100: the gathered target reads defeat the tiled transpose
    of the dense loss; BENCHMARKS.md.)
    """

    def __init__(self, cfg: SwiftConfig, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = decoder
        self.criterion = MIMLoss(cfg)
        self.num_masked = masked_tokens_per_sample(cfg)

    def make_mask(self, batch_size: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """Token mask ``[B, X', Y', Z', T']`` (see :mod:`neuro_models.swift.masking`)."""
        return make_mask(self.cfg, batch_size, generator=generator, device=device)

    def _exact(self, mask: torch.Tensor, exact_mask: bool | None) -> bool:
        if not 0 < self.num_masked < math.prod(self.cfg.grid):  # everything masked: nothing to select
            return False
        if exact_mask is not None:
            return bool(exact_mask)
        if mask.device.type != "cpu" or torch.compiler.is_compiling():  # no host check without a sync / in a trace
            return False
        return bool((mask.reshape(mask.shape[0], -1).sum(1) == self.num_masked).all())

    def forward(self, x_BCXYZT: torch.Tensor, brain_mask: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, exact_mask: bool | None = None) -> dict:
        B = x_BCXYZT.shape[0]
        if tuple(x_BCXYZT.shape[1:]) != (self.cfg.in_chans, *self.cfg.img_size):
            raise ValueError(f"input shape {tuple(x_BCXYZT.shape)} does not match the config: expected "
                             f"[B, in_chans={self.cfg.in_chans}, *img_size={self.cfg.img_size}]")
        if mask is None:
            g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            mask = self.make_mask(B, generator=g)
            exact_mask = exact_mask is not False
        if tuple(mask.shape) != (B, *self.cfg.grid):
            raise ValueError(f"mask shape {tuple(mask.shape)}; expected [B, *token grid] = {(B, *self.cfg.grid)}")
        exact = self._exact(mask, exact_mask)
        mask = mask.to(device=x_BCXYZT.device, dtype=torch.bool)
        visible = token_selection(mask, self.num_masked)[0] if exact else None
        feats = self.encoder(x_BCXYZT, mask, self.mask_token, visible_BK=visible)
        loss, pred, hidden = self.head(feats, x_BCXYZT, mask, brain_mask)
        return {"loss": loss, "num_tokens": int(B * math.prod(mask.shape[1:])), "mask": mask, "pred": pred,
                "hidden": hidden, "token_selection": exact}

    def uses_fused_head(self, x_BCXYZT: torch.Tensor) -> bool:
        """Whether :meth:`head` runs the fused Triton kernel for this input (``SwiftConfig.fused_head``)."""
        from .kernels import fused_head

        c = getattr(self.decoder, "decoder_dim", 0)
        # a ZeRO-3 partitioned weight (DeepSpeed marks it with ds_id) is gathered only inside its module's forward,
        # which the kernel bypasses: keep the PyTorch path there
        partitioned = isinstance(self.decoder, PixelShuffleDecoder) and hasattr(self.decoder.out.weight, "ds_id")
        return (self.cfg.fused_head and isinstance(self.decoder, PixelShuffleDecoder) and c >= 16 and not c & (c - 1)
                and not partitioned and fused_head.available(x_BCXYZT.device) and not torch.compiler.is_compiling())

    def head(self, feats: torch.Tensor, x_BCXYZT: torch.Tensor, mask: torch.Tensor, brain_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Decoder + loss: ``(loss, pred, hidden)``. The fused kernel (:meth:`uses_fused_head`) returns no ``pred``
        but the decoder's ``hidden`` state; the PyTorch path returns ``pred`` and no ``hidden``."""
        if self.uses_fused_head(x_BCXYZT):
            from .kernels.fused_head import fused_head_loss

            h = self.decoder(feats, hidden_only=True)
            bm = brain_mask if self.cfg.brain_only_loss else None
            loss = fused_head_loss(h, self.decoder.out.weight, self.decoder.out.bias, x_BCXYZT, mask, bm,
                                   self.cfg.patch_size, self.cfg.loss_type, self.cfg.huber_delta)
            return loss, None, h
        pred = self.decoder(feats)
        return self.criterion(pred, x_BCXYZT, mask, brain_mask), pred, None

    def full_prediction(self, out: dict) -> torch.Tensor:
        """The voxel prediction ``[B, X', Y', Z', T', P]`` of a :meth:`forward` output (recomputed from the
        decoder's hidden state when the fused head ran)."""
        if out["pred"] is not None:
            return out["pred"]
        h = out["hidden"]
        return self.decoder.out(self.decoder.act(h.to(self.decoder.out.weight.dtype)))


class DownstreamModel(nn.Module):
    """Encoder + pooled MLP head: ``x_BCXYZT -> [B, num_outputs]``.

    ``prompt_tokens > 0`` adds learnable prompt tokens (see the module docstring); the encoder can
    be frozen by the fine-tuning code, leaving only prompts and head trainable.
    """

    def __init__(self, cfg: SwiftConfig, encoder: nn.Module, *, task: str, num_outputs: int = 1,
                 hidden_dim: int | None = None, dropout: float = 0.0, prompt_tokens: int = 0) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task={task!r}; allowed: 'classification', 'regression'")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens={prompt_tokens}; allowed: >= 0")
        if prompt_tokens and not getattr(encoder, "supports_prompts", cfg.last_layer_full_attention):
            raise ValueError("prompt_tokens > 0 needs last_layer_full_attention=True (prompts join the "
                             "last, full-attention stage); allowed: prompt_tokens=0 otherwise")
        self.cfg = cfg
        self.task = task
        self.encoder = encoder
        self.prompts = nn.Parameter(torch.zeros(prompt_tokens, encoder.num_features)) if prompt_tokens else None
        if self.prompts is not None:
            nn.init.trunc_normal_(self.prompts, std=0.02)
        self.head = MLPHead(encoder.num_features, num_outputs, hidden_dim=hidden_dim, dropout=dropout,
                            readout=readout_class(cfg.parametrization))

    def features(self, x_BCXYZT: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder features ``[B, D_last]``."""
        f = self.encoder(x_BCXYZT, prompts_PD=self.prompts) if self.prompts is not None else self.encoder(x_BCXYZT)
        return f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)

    def forward(self, x_BCXYZT: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x_BCXYZT))

    def last_block_parameters(self):
        """Parameters of the last encoder block, the final norm, the prompts and the head."""
        params = list(self.encoder.last_block().parameters()) + list(self.encoder.norm.parameters())
        if self.prompts is not None:
            params.append(self.prompts)
        return params + list(self.head.parameters())
