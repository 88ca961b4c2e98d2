"""Parameter counts and analytic FLOPs of both SwiFT variants.

Parameters are counted exactly by building the model on the ``meta`` device (no memory, works for
13B); the convention is documented in :mod:`neuro_models.swift.config`.

FLOPs follow :mod:`neuro_models.flops`: matmuls only (2 per multiply-add), per sample at
``cfg.img_size``, for the pre-training model (encoder + decoder). ``train`` = forward + backward
= ``3 x forward - patch embedding forward`` (the first layer needs no gradient w.r.t. its input).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..flops import attention_flops as attn, linear_flops as lin
from .config import SwiftConfig, stage_window
from .masking import masked_tokens_per_sample


def param_counts(cfg: SwiftConfig, build_bare_pretrain: Callable[[SwiftConfig], nn.Module]) -> dict[str, int]:
    """``dict(total=, encoder=, decoder=, non_embedding=, embedding=)`` of the pre-training model."""
    with torch.device("meta"):
        model = build_bare_pretrain(cfg.replace(parametrization="sp"))
    enc = sum(p.numel() for p in model.encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters()
              if n.startswith("encoder.patch_embed") or n.startswith("encoder.pos_embeds") or n == "mask_token")
    return {"total": total, "encoder": enc, "decoder": total - enc, "non_embedding": total - emb, "embedding": emb}


def _block_linears(L: float, d: int, hidden: int, n_attn: int) -> float:
    """qkv + proj per attention (``n_attn`` of them) and the MLP, on ``L`` tokens."""
    return n_attn * (lin(L, d, 3 * d) + lin(L, d, d)) + lin(L, d, hidden) + lin(L, hidden, d)


def encoder_flops(cfg: SwiftConfig, *, prompt_tokens: int = 0) -> dict[str, float]:
    """Forward FLOPs of the encoder per sample: ``dict(patch_embed=, blocks=, attention=, merging=)``."""
    dims, grids = cfg.stage_dims(), cfg.stage_grids()
    out = {"patch_embed": lin(math.prod(grids[0]), cfg.in_chans * math.prod(cfg.patch_size), dims[0]),
           "blocks": 0.0, "attention": 0.0, "merging": 0.0}
    revised = cfg.family == "swift_v2_revised"
    for s, (d, g, depth) in enumerate(zip(dims, grids, cfg.depths)):
        L = math.prod(g)
        hidden = int(d * cfg.mlp_ratio)
        if revised:
            wt, _ = stage_window(g[3:], cfg.window_size[3:])
            ws, _ = stage_window(g[:3], cfg.window_size[:3])
            nt, ns = wt[0], math.prod(ws)
            out["blocks"] += depth * _block_linears(L, d, hidden, 2)
            out["attention"] += depth * (attn(L / nt, nt, nt, d) + attn(L / ns, ns, ns, d))
        elif cfg.last_layer_full_attention and s == cfg.num_stages - 1:
            N = L + prompt_tokens
            out["blocks"] += depth * _block_linears(N, d, hidden, 1)
            out["attention"] += depth * attn(1, N, N, d)
        else:
            win, _ = stage_window(g, cfg.window_size)
            n = math.prod(win)
            out["blocks"] += depth * _block_linears(L, d, hidden, 1)
            out["attention"] += depth * attn(L / n, n, n, d)
        if s < cfg.num_stages - 1:
            out["merging"] += lin(L / 8, 8 * d, 2 * d)
    return out


def decoder_flops(cfg: SwiftConfig) -> float:
    """Forward FLOPs of the reconstruction decoder per sample."""
    dims, grids = cfg.stage_dims(), cfg.stage_grids()
    r = 2 ** (cfg.num_stages - 1)
    L_last, L0 = math.prod(grids[-1]), math.prod(grids[0])
    px, py, pz, pt = cfg.patch_size
    if cfg.family == "swift_v2_revised":
        return lin(L_last, dims[-1], pt * r ** 3 * cfg.decoder_dim) + lin(L0 * pt, cfg.decoder_dim,
                                                                          px * py * pz * cfg.in_chans)
    return lin(L_last, dims[-1], r ** 3 * cfg.decoder_dim) + lin(L0, cfg.decoder_dim, cfg.in_chans * px * py * pz * pt)


def flops_per_sample(cfg: SwiftConfig) -> dict[str, float]:
    """``dict(forward=, train=, encoder_forward=, forward_selected=, train_selected=)`` of the pre-training model
    per sample.

    ``forward``/``train`` count the model as defined (every token embedded and decoded): the compute axis of the
    scaling laws and the MFU numerator. ``*_selected`` count what SimMIM's token selection executes (the patch
    embedding of the visible tokens only; ``SimMIM``'s docstring).
    """
    e = encoder_flops(cfg)
    enc = sum(e.values())
    fwd = enc + decoder_flops(cfg)
    n, N = masked_tokens_per_sample(cfg), math.prod(cfg.grid)
    pe_sel = (1.0 - n / N) * e["patch_embed"] if 0 < n < N else e["patch_embed"]  # all masked: nothing selected
    fwd_sel = fwd - e["patch_embed"] + pe_sel
    return {"forward": float(fwd), "train": float(3 * fwd - e["patch_embed"]), "encoder_forward": float(enc),
            "forward_selected": float(fwd_sel), "train_selected": float(3 * fwd_sel - pe_sel)}
