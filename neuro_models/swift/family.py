"""Family ``swift_v2`` (original SwiFT v2: 4D shifted-window Swin + SimMIM), one :class:`ModelFamily`.

See :mod:`neuro_models.family` for the contract, :mod:`neuro_models.swift.protocol` for the code shared
with the revised variant and :mod:`neuro_models.swift.config` for the parameter-counting convention.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..family import FinetuneHooks, ModelFamily, linears_in_blocks
from ..mup_utils import readout_class
from . import config as C
from .compile_policy import small_stage_graphs
from .masking import make_mask
from .model import PixelShuffleDecoder, SwiftEncoder
from .protocol import ARCH_FIELDS, SwiftVariant, feature_dim, last_stage_parameters, stage_modules


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

FAMILY = ModelFamily(
    name="swift_v2",
    config_class=C.SwiftConfig,
    sizes=_V.sizes,
    get_config=_V.get_config,
    with_width=_V.with_width,
    build_pretrain_model=_V.build_pretrain_model,
    build_downstream_model=_V.build_downstream_model,
    param_counts=_V.param_counts,
    flops_per_sample=_V.flops_per_sample,
    tokens_per_sample=_V.tokens_per_sample,
    make_mask=make_mask,
    cuda_graph_regions=small_stage_graphs,
    checkpoint_field="use_checkpoint",
    stage_modules=stage_modules,
    finetune=FinetuneHooks(last_block_parameters=last_stage_parameters, lora_targets=linears_in_blocks,
                           supports_prompts=supports_prompts, feature_dim=feature_dim),
    arch_fields=ARCH_FIELDS,
)
