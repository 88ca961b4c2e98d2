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

from ..family import FinetuneHooks, ModelFamily, linears_in_blocks
from ..mup_utils import readout_class
from . import config as C
from .compile_policy import small_stage_graphs
from .masking import make_mask
from .protocol import ARCH_FIELDS, SwiftVariant, feature_dim, last_stage_parameters, stage_modules
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

FAMILY = ModelFamily(
    name="swift_v2_revised",
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
