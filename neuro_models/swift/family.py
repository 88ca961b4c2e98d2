"""Family protocol of ``swift_v2`` (original SwiFT v2: 4D shifted-window Swin + SimMIM).

See :mod:`neuro_models.registry` for the protocol, :mod:`neuro_models.swift.protocol` for the shared
implementation and :mod:`neuro_models.swift.config` for the parameter-counting convention.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..mup_utils import readout_class
from . import config as C
from .model import PixelShuffleDecoder, SwiftEncoder
from .protocol import SwiftFamily


def _config_kwargs(size: str) -> dict[str, Any]:
    return C.size_kwargs(size)


def _decoder(cfg: C.SwiftConfig, enc: nn.Module) -> nn.Module:
    patch_numel = cfg.in_chans * math.prod(cfg.patch_size)
    return PixelShuffleDecoder(enc.num_features, 2 ** (cfg.num_stages - 1), cfg.decoder_dim, patch_numel,
                               readout_class(cfg.parametrization))


FAMILY_IMPL = SwiftFamily("swift_v2", _config_kwargs, SwiftEncoder, _decoder)
globals().update(FAMILY_IMPL.exports())
