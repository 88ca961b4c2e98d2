"""NeuroMamba: a Mamba-1 state-space model over 4D fMRI patch sequences.

Shape legend: ``x_BCXYZT`` input volume, ``brain_mask_BXYZ`` subject brain masks, ``B`` batch,
``N`` tokens per sample, ``P`` voxels per patch, ``R`` packed rows, ``L`` packed length,
``D`` width, ``E = expand * D`` inner width, ``K`` convolution width, ``S`` state size.

Pipeline: patchify (6x6x6x2) -> drop background tokens and pack (see :mod:`.tokens`) ->
linear embedding + Fourier positions -> ``depth`` x [RMSNorm -> Mamba mixer -> residual] ->
RMSNorm -> next-token head (pretraining) or pooled features -> MLP head (downstream).

The Mamba mixer (Gu & Dao, 2023): ``in_proj`` to (x, z); causal depthwise conv + SiLU on x;
input-dependent ``delta, B, C`` from x; selective scan; output gated by ``silu(z)``; ``out_proj``.

Next-token objective: the head reads the state after token ``i`` plus the Fourier encoding of
token ``i+1``'s position (the next kept token can be far away after background removal, so the
model is told *where* it must predict) and predicts that patch's voxels; the loss (MSE or L1)
counts brain voxels only when a brain mask is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..heads import MLPHead
from ..layers import DropPath
from .config import NeuroMambaConfig
from .counting import forward_flops_per_token
from .scan import selective_scan, ssd_impl
from .tokens import (FourierPositions, Packed, keep_tokens, pack_kept, pack_rows, patchify, token_coords,
                     voxel_weights)


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer with sequence-boundary support."""

    def __init__(self, cfg: NeuroMambaConfig, *, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        D, E, S, K, R = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.rank
        self.d_inner, self.d_state, self.rank, self.d_conv = E, S, R, K
        self.scan_impl, self.scan_chunk = cfg.scan_impl, cfg.scan_chunk
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * S, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, D, bias=False)
        # Mamba's initialisation: dt log-uniform in [dt_min, dt_max] through the bias; S4D-real A
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, S + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))

    def forward(self, x_RLD: torch.Tensor, starts_RL: torch.Tensor, valid_RL: torch.Tensor) -> torch.Tensor:
        L = x_RLD.shape[1]
        xz = self.in_proj(x_RLD)
        x_RLE, z_RLE = xz.chunk(2, dim=-1)
        x_RLE = x_RLE * valid_RL.unsqueeze(-1).to(x_RLE.dtype)  # gaps are the conv's zero padding
        xc = F.pad(x_RLE.transpose(1, 2), (self.d_conv - 1, 0))
        x_RLE = F.silu(self.conv1d(xc)[..., :L].transpose(1, 2))
        dbc = self.x_proj(x_RLE)
        dt, B_RLS, C_RLS = torch.split(dbc, [self.rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x_RLE, delta, A, B_RLS, C_RLS, self.D, z_RLE, starts_RL,
                           impl=self.scan_impl, chunk=self.scan_chunk)
        return self.out_proj(y.to(x_RLD.dtype))


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (Dao & Gu, 2024; one group): in_proj to (z, xBC, dt); causal conv + SiLU on
    xBC; chunked SSD with sequence resets; gated RMSNorm ``norm(y * silu(z))``; out_proj."""

    def __init__(self, cfg: NeuroMambaConfig, *, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        D, E, S, K = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.d_conv
        H = E // cfg.headdim
        self.d_inner, self.d_state, self.d_conv, self.nheads, self.headdim = E, S, K, H, cfg.headdim
        self.chunk = cfg.scan_chunk
        self.ssd = ssd_impl()  # the SSD form ($NEUROMAMBA_SSD), fixed at construction
        self.in_proj = nn.Linear(D, 2 * E + 2 * S + H, bias=False)
        self.conv1d = nn.Conv1d(E + 2 * S, E + 2 * S, K, groups=E + 2 * S, bias=True)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = nn.RMSNorm(E, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(E, D, bias=False)

    def forward(self, x_RLD: torch.Tensor, starts_RL: torch.Tensor, valid_RL: torch.Tensor) -> torch.Tensor:
        R, L, _ = x_RLD.shape
        E, S, H = self.d_inner, self.d_state, self.nheads
        z, xBC, dt = torch.split(self.in_proj(x_RLD), [E, E + 2 * S, H], dim=-1)
        xBC = xBC * valid_RL.unsqueeze(-1).to(xBC.dtype)
        xBC = F.silu(self.conv1d(F.pad(xBC.transpose(1, 2), (self.d_conv - 1, 0))).transpose(1, 2))
        xs, B_RLS, C_RLS = torch.split(xBC, [E, S, S], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y = self.ssd(xs.float().reshape(R, L, H, self.headdim), dt, A, B_RLS.float(), C_RLS.float(),
                        self.D.float(), starts_RL, chunk=self.chunk)
        y = self.norm(y.reshape(R, L, E) * F.silu(z.float()))
        return self.out_proj(y.to(x_RLD.dtype))


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(mixer(rmsnorm(x)))``; gap tokens kept at zero."""

    #: a region of :func:`neuro_models.layers.compile_regions` (projections, conv, norms and gating fuse around
    #: the scan, a custom op that keeps the graph whole). The packed row's length changes with every batch's brain
    #: masks, so the length becomes symbolic at its first change rather than recompiling per length.
    compile_region = True
    compile_kwargs = {"dynamic": None}

    def __init__(self, cfg: NeuroMambaConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg) if cfg.mixer == "mamba2" else MambaMixer(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_RLD, starts_RL, valid_RL):
        x_RLD = x_RLD + self.drop_path(self.mixer(self.norm(x_RLD), starts_RL, valid_RL))
        return x_RLD * valid_RL.unsqueeze(-1).to(x_RLD.dtype)


class NeuroMambaEncoder(nn.Module):
    """Patch embedding + Fourier positions + Mamba blocks + final RMSNorm."""

    def __init__(self, cfg: NeuroMambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.remove_background = cfg.remove_background
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim)
        self.pos = FourierPositions(cfg.embed_dim, cfg.grid)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MambaBlock(cfg, dpr[i]) for i in range(cfg.depth))
        self.norm_f = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        with torch.no_grad():  # GPT-2/Mamba residual rescaling of the last projection of each block
            for blk in self.blocks:
                blk.mixer.out_proj.weight.div_(math.sqrt(cfg.depth))
        coords = token_coords(cfg.img_size, cfg.patch_size, cfg.time_order)
        self.register_buffer("coords_N4", coords, persistent=False)

    def check_inputs(self, x_BCXYZT: torch.Tensor, brain_mask_BXYZ: torch.Tensor | None) -> None:
        c = self.cfg
        want = (c.in_chans, *c.img_size)
        if x_BCXYZT.dim() != 6 or tuple(x_BCXYZT.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, want))}] (B, C, X, Y, Z, T), "
                             f"got {tuple(x_BCXYZT.shape)}")
        if brain_mask_BXYZ is not None:
            wm = (x_BCXYZT.shape[0], *c.img_size[:3])
            if tuple(brain_mask_BXYZ.shape) != wm:
                raise ValueError(f"brain_mask must have shape {wm} (B, X, Y, Z), got {tuple(brain_mask_BXYZ.shape)}")

    def tokenize(self, x_BCXYZT: torch.Tensor, brain_mask_BXYZ: torch.Tensor | None) -> Packed:
        """Patchify, drop background (when a mask is given and removal is on) and pack."""
        self.check_inputs(x_BCXYZT, brain_mask_BXYZ)
        c = self.cfg
        values = patchify(x_BCXYZT, c.patch_size, c.time_order)
        weights = None
        mask = None if brain_mask_BXYZ is None else brain_mask_BXYZ != 0
        if mask is not None:
            if bool((~mask.flatten(1).any(1)).any()):
                bad = torch.nonzero(~mask.flatten(1).any(1)).flatten().tolist()
                raise ValueError(f"brain_mask of sample(s) {bad} has no brain voxel (all background); "
                                 "pass brain_mask=None to train on every voxel")
            weights = voxel_weights(mask, c.img_size, c.patch_size, c.in_chans, c.time_order).to(values.dtype)
        coords = self.coords_N4.to(values.device)
        if mask is not None and self.remove_background:
            keep = keep_tokens(mask, c.img_size, c.patch_size, c.time_order)
            return pack_kept(values, weights, coords, keep, gap=c.d_conv - 1, multiple=c.scan_chunk)
        return pack_rows(values, weights, coords, multiple=c.scan_chunk)

    def forward_packed(self, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on packed tokens; returns (normed states ``[R, L, D]``, positions ``[R, L, D]``)."""
        pos = self.pos(packed.coords_RL4)
        x = self.patch_embed(packed.values_RLP) + pos.to(packed.values_RLP.dtype)
        valid = packed.valid_RL
        x = x * valid.unsqueeze(-1).to(x.dtype)
        for blk in self.blocks:
            if self.cfg.checkpoint_blocks and self.training:
                x = checkpoint(blk, x, packed.starts_RL, valid, use_reentrant=False)
            else:
                x = blk(x, packed.starts_RL, valid)
        return self.norm_f(x), pos

    def forward(self, x_BCXYZT: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features ``[B, D]``: mean of the final states over each sample's kept tokens."""
        packed = self.tokenize(x_BCXYZT, brain_mask)
        h, _ = self.forward_packed(packed)
        B = x_BCXYZT.shape[0]
        sel = packed.valid_RL
        feats = h.new_zeros(B, h.shape[-1], dtype=torch.float32)
        feats.index_add_(0, packed.sample_RL[sel], h[sel].float())
        return (feats / packed.lengths_B.unsqueeze(1).float()).to(h.dtype)


class NeuroMambaPretrain(nn.Module):
    """Encoder + next-token head. ``forward`` returns ``dict(loss, num_tokens, num_targets, flops_forward)``."""

    def __init__(self, cfg: NeuroMambaConfig, *, readout: type = nn.Linear) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = NeuroMambaEncoder(cfg)
        self.head = readout(cfg.embed_dim, cfg.patch_dim)
        self._flops_per_token = forward_flops_per_token(cfg)["total"]

    @property
    def remove_background(self) -> bool:
        return self.encoder.remove_background

    @remove_background.setter
    def remove_background(self, value: bool) -> None:
        self.encoder.remove_background = bool(value)

    def make_mask(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> None:
        """Next-token prediction needs no mask: always ``None``."""
        return None

    def forward(self, x_BCXYZT: torch.Tensor, brain_mask: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> dict:
        if mask is not None:
            raise ValueError("mask must be None for NeuroMamba (next-token objective; make_mask returns None)")
        packed = self.encoder.tokenize(x_BCXYZT, brain_mask)
        h, pos = self.encoder.forward_packed(packed)
        # query the next token's position; predict its voxels from the state after this token
        q = h[:, :-1] + pos[:, 1:].to(h.dtype)
        pred = self.head(q).float()
        target = packed.values_RLP[:, 1:].float()
        pair = packed.valid_RL[:, :-1] & packed.valid_RL[:, 1:] & ~packed.starts_RL[:, 1:]
        w = pair.unsqueeze(-1).float()
        if packed.weights_RLP is not None:
            w = w * packed.weights_RLP[:, 1:].float()
        else:
            w = w.expand_as(pred)
        err = (pred - target).abs() if self.cfg.loss == "l1" else (pred - target).pow(2)
        loss = (err * w).sum() / w.sum().clamp_min(1.0)
        n = packed.num_tokens
        return {"loss": loss, "num_tokens": n, "num_targets": int(pair.sum()),
                "flops_forward": float(self._flops_per_token * n)}


class NeuroMambaForTask(nn.Module):
    """Encoder + :class:`~neuro_models.heads.MLPHead` on mean-pooled kept tokens: ``[B, num_outputs]``."""

    def __init__(self, cfg: NeuroMambaConfig, *, num_outputs: int = 1, hidden_dim: int | None = None,
                 dropout: float = 0.0, readout: type = nn.Linear) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = NeuroMambaEncoder(cfg)
        self.head = MLPHead(cfg.embed_dim, num_outputs, hidden_dim=hidden_dim, dropout=dropout, readout=readout)

    def forward(self, x_BCXYZT: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x_BCXYZT, brain_mask))

    def last_block_parameters(self):
        """Parameters of the last Mamba block, the final norm and the head (for partial fine-tuning)."""
        yield from self.encoder.blocks[-1].parameters()
        yield from self.encoder.norm_f.parameters()
        yield from self.head.parameters()
