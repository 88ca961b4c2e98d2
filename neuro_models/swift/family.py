"""Family ``swift_v2`` (original SwiFT v2: 4D shifted-window Swin + SimMIM), one :class:`ModelFamily`.

See :mod:`neuro_models.family` for the contract, :mod:`neuro_models.swift.protocol` for the code shared
with the revised variant and :mod:`neuro_models.swift.config` for the parameter-counting convention.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..mup_utils import readout_class
from . import config as C
from .model import PixelShuffleDecoder, SwiftEncoder
from .protocol import SwiftVariant


def _config_kwargs(size: str) -> dict[str, Any]:
    return C.size_kwargs(size)


def _decoder(cfg: C.SwiftConfig, enc: nn.Module) -> nn.Module:
    patch_numel = cfg.in_chans * math.prod(cfg.patch_size)
    return PixelShuffleDecoder(enc.num_features, 2 ** (cfg.num_stages - 1), cfg.decoder_dim, patch_numel,
                               readout_class(cfg.parametrization))


def supports_prompts(cfg: C.SwiftConfig) -> bool:
    """Prompt tokens join the last stage when it uses full attention."""
    return bool(cfg.last_layer_full_attention)


_V = SwiftVariant("swift_v2", _config_kwargs, SwiftEncoder, _decoder)

FAMILY = _V.model_family(supports_prompts)
