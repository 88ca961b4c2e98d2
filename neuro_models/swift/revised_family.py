"""Family protocol of ``swift_v2_revised`` (factorized temporal/spatial window attention + RoPE).

Defaults follow the revised SwiFT v2 report: patch 6x6x6x1, windows 4x4x4 in space and 10 in
time, LayerScale, mask ratio 0.8, factorized pixel-shuffle decoder. The size ladder has the same
names and widths as ``swift_v2``; the factorized block holds two attentions, so its encoder counts
are larger (``REVISED_ENCODER_PARAMS``, at input 96^3 x 20).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..mup_utils import apply_mup, readout_class
from . import config as C
from .counting import flops_per_sample as _flops, param_counts as _counts
from .model import DownstreamModel, SimMIM
from .revised import FactorizedPixelShuffleDecoder, RevisedEncoder

FAMILY = "swift_v2_revised"
SIZES: dict[str, C.SwiftConfig] = {}


def _defaults(size: str) -> dict[str, Any]:
    kw: dict[str, Any] = dict(family=FAMILY, patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 10), mask_ratio=0.8,
                              mask_patch_size=(12, 12, 12, 2), last_layer_full_attention=False)
    if size == "debug":
        kw.update(window_size=(2, 2, 2, 2), img_size=(24, 24, 24, 4))
    return kw


def get_config(size: str, **overrides: Any) -> C.SwiftConfig:
    """Config of a named size with field overrides."""
    base = C.size_kwargs(size)
    base.pop("patch_size", None)
    kw = {**base, **_defaults(size), **overrides}
    return C.SwiftConfig(**kw)


for _name in C.SIZE_NAMES:
    SIZES[_name] = get_config(_name)


def with_width(cfg: C.SwiftConfig, width: int) -> C.SwiftConfig:
    return C.with_width(cfg, width)


def build_encoder(cfg: C.SwiftConfig) -> nn.Module:
    return RevisedEncoder(cfg)


def _bare_pretrain(cfg: C.SwiftConfig) -> nn.Module:
    enc = build_encoder(cfg)
    dec = FactorizedPixelShuffleDecoder(enc.num_features, 2 ** (cfg.num_stages - 1), cfg.decoder_dim, cfg.patch_size,
                                        cfg.in_chans, readout_class(cfg.parametrization))
    return SimMIM(cfg, enc, dec)


def _finish(model: nn.Module, builder, cfg: C.SwiftConfig) -> nn.Module:
    if cfg.parametrization == "mup":
        apply_mup(model, builder, cfg, with_width=with_width, base_width=cfg.mup_base_width)
    return model


def build_pretrain_model(cfg: C.SwiftConfig) -> nn.Module:
    """SimMIM model with the revised encoder and the factorized decoder."""
    return _finish(_bare_pretrain(cfg), _bare_pretrain, cfg)


def build_downstream_model(cfg: C.SwiftConfig, *, task: str, num_outputs: int = 1, hidden_dim: int | None = None,
                           dropout: float = 0.0, prompt_tokens: int = 0) -> nn.Module:
    """Encoder + MLP head (prompt tuning is not supported by the windowed-only revised encoder)."""
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
