"""Family ``swift_v2_revised`` (factorized temporal/spatial window attention + RoPE), one :class:`ModelFamily`.

Defaults follow the revised SwiFT v2 report: patch 6x6x6x1, windows 4x4x4 in space and 10 in
time, LayerScale, mask ratio 0.8, factorized pixel-shuffle decoder. The size ladder has the same
names and widths as ``swift_v2``; the factorized block holds two attentions, so its encoder counts
are larger (``REVISED_ENCODER_PARAMS``, at input 96^3 x 20). Downstream models take no prompt tokens
(the windowed-only revised encoder has no full-attention stage to join).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..mup_utils import readout_class
from . import config as C
from .protocol import SwiftVariant
from .revised import FactorizedPixelShuffleDecoder, RevisedEncoder


def _config_kwargs(size: str) -> dict[str, Any]:
    kw = C.size_kwargs(size)
    kw.pop("patch_size", None)
    kw.update(patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 10), mask_ratio=0.8, mask_patch_size=(12, 12, 12, 2),
              last_layer_full_attention=False)
    if size == "debug":
        kw.update(window_size=(2, 2, 2, 2), img_size=(24, 24, 24, 4))
    return kw


def _decoder(cfg: C.SwiftConfig, enc: nn.Module) -> nn.Module:
    return FactorizedPixelShuffleDecoder(enc.num_features, 2 ** (cfg.num_stages - 1), cfg.decoder_dim,
                                         cfg.patch_size, cfg.in_chans, readout_class(cfg.parametrization))


def supports_prompts(cfg: C.SwiftConfig) -> bool:
    """Never: every stage of the revised encoder is windowed (``RevisedEncoder.supports_prompts``)."""
    return False


_V = SwiftVariant("swift_v2_revised", _config_kwargs, RevisedEncoder, _decoder)

FAMILY = _V.model_family(supports_prompts)
