"""Family protocol of ``swift_v2`` (original SwiFT v2: 4D shifted-window Swin + SimMIM).

See :mod:`neuro_models.registry` for the protocol and :mod:`neuro_models.swift.config` for the
parameter-counting convention.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..mup_utils import apply_mup, readout_class
from . import config as C
from .counting import flops_per_sample as _flops, param_counts as _counts
from .model import DownstreamModel, PixelShuffleDecoder, SimMIM, SwiftEncoder

FAMILY = "swift_v2"
SIZES: dict[str, C.SwiftConfig] = {}


def _defaults() -> dict[str, Any]:
    return dict(family=FAMILY)


def get_config(size: str, **overrides: Any) -> C.SwiftConfig:
    """Config of a named size with field overrides (e.g. ``depths=(1, 1, 1, 1)`` to shrink it)."""
    kw = {**_defaults(), **C.size_kwargs(size), **overrides}
    return C.SwiftConfig(**kw)


for _name in C.SIZE_NAMES:
    SIZES[_name] = get_config(_name)


def with_width(cfg: C.SwiftConfig, width: int) -> C.SwiftConfig:
    return C.with_width(cfg, width)


def build_encoder(cfg: C.SwiftConfig) -> nn.Module:
    return SwiftEncoder(cfg)


def _bare_pretrain(cfg: C.SwiftConfig) -> nn.Module:
    enc = build_encoder(cfg)
    r = 2 ** (cfg.num_stages - 1)
    patch_numel = cfg.in_chans * math.prod(cfg.patch_size)
    dec = PixelShuffleDecoder(enc.num_features, r, cfg.decoder_dim, patch_numel, readout_class(cfg.parametrization))
    return SimMIM(cfg, enc, dec)


def _finish(model: nn.Module, builder, cfg: C.SwiftConfig) -> nn.Module:
    if cfg.parametrization == "mup":
        apply_mup(model, builder, cfg, with_width=with_width, base_width=cfg.mup_base_width)
    return model


def build_pretrain_model(cfg: C.SwiftConfig) -> nn.Module:
    """SimMIM model (encoder + mask token + light decoder); muP base shapes set under ``"mup"``."""
    return _finish(_bare_pretrain(cfg), _bare_pretrain, cfg)


def build_downstream_model(cfg: C.SwiftConfig, *, task: str, num_outputs: int = 1, hidden_dim: int | None = None,
                           dropout: float = 0.0, prompt_tokens: int = 0) -> nn.Module:
    """Encoder + MLP head; ``prompt_tokens`` learnable prompts join the last (full-attention) stage."""
    def builder(c: C.SwiftConfig) -> nn.Module:
        return DownstreamModel(c, build_encoder(c), task=task, num_outputs=num_outputs, hidden_dim=hidden_dim,
                               dropout=dropout, prompt_tokens=prompt_tokens)

    return _finish(builder(cfg), builder, cfg)


def param_counts(cfg: C.SwiftConfig) -> dict[str, int]:
    return _counts(cfg, _bare_pretrain)


def flops_per_sample(cfg: C.SwiftConfig) -> dict[str, float]:
    return _flops(cfg)


def tokens_per_sample(cfg: C.SwiftConfig) -> int:
    g = cfg.grid
    return int(g[0] * g[1] * g[2] * g[3])
