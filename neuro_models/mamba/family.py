"""Family ``neuromamba``, one :class:`~neuro_models.family.ModelFamily` (:data:`FAMILY`).

Counts and FLOPs, with their conventions, live in :mod:`.counting` (the model imports them too).
Next-token prediction needs no mask (``make_mask=None``); downstream models take no prompt tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..family import FinetuneHooks, ModelFamily, linears_in_blocks
from ..mup_utils import apply_mup, readout_class
from .config import SIZES, NeuroMambaConfig
from .counting import flops_per_sample, forward_flops_per_token, param_counts, tokens_per_sample
from .model import NeuroMambaForTask, NeuroMambaPretrain

__all__ = ["FAMILY", "SIZES", "get_config", "with_width", "build_pretrain_model", "build_downstream_model",
           "param_counts", "flops_per_sample", "tokens_per_sample", "forward_flops_per_token"]

#: config fields that must agree between exported weights and a model loading them
ARCH_FIELDS = ("family", "embed_dim", "depth", "patch_size", "in_chans", "img_size", "mixer", "headdim", "d_state",
               "d_conv", "expand", "dt_rank", "parametrization")


def get_config(size: str, **overrides: Any) -> NeuroMambaConfig:
    """Config of a named size with field ``overrides`` (``ValueError`` for unknown sizes or fields)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a NeuroMamba size; allowed: {list(SIZES)}")
    fields = {f.name for f in dataclasses.fields(NeuroMambaConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown NeuroMamba config field(s) {bad}; allowed: {sorted(fields)}")
    for k in ("img_size", "patch_size"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return dataclasses.replace(SIZES[size], **overrides)


def with_width(cfg: NeuroMambaConfig, width: int) -> NeuroMambaConfig:
    """The same config at width ``width`` (``dt_rank`` follows the width when it is automatic)."""
    return dataclasses.replace(cfg, embed_dim=int(width))


def _bare_pretrain(cfg: NeuroMambaConfig) -> nn.Module:
    return NeuroMambaPretrain(cfg, readout=readout_class(cfg.parametrization))


def build_pretrain_model(cfg: NeuroMambaConfig) -> NeuroMambaPretrain:
    """Encoder + next-token head; muP base shapes set when ``cfg.parametrization == "mup"``."""
    model = _bare_pretrain(cfg)
    if cfg.parametrization == "mup":
        apply_mup(model, _bare_pretrain, cfg, with_width=with_width, base_width=cfg.mup_base_width)
    return model


def build_downstream_model(cfg: NeuroMambaConfig, *, task: str, num_outputs: int = 1,
                           hidden_dim: int | None = None, dropout: float = 0.0, **kwargs: Any) -> NeuroMambaForTask:
    """Encoder + MLP head on mean-pooled kept tokens; ``task`` is "classification" or "regression"."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task={task!r}; allowed: 'classification', 'regression'")
    if kwargs:
        raise ValueError(f"unknown downstream option(s) {sorted(kwargs)}; allowed: hidden_dim, dropout")

    def bare(c: NeuroMambaConfig) -> nn.Module:
        return NeuroMambaForTask(c, num_outputs=num_outputs, hidden_dim=hidden_dim, dropout=dropout,
                                 readout=readout_class(c.parametrization))

    model = bare(cfg)
    if cfg.parametrization == "mup":
        apply_mup(model, bare, cfg, with_width=with_width, base_width=cfg.mup_base_width)
    return model


def last_block_parameters(model: NeuroMambaForTask) -> list[nn.Parameter]:
    """Strategy ``last_block``: the last Mamba block, the final norm and the head."""
    return list(model.last_block_parameters())


def supports_prompts(cfg: NeuroMambaConfig) -> bool:
    """Never: the packed Mamba sequence has no place for prompt tokens (``build_downstream_model`` refuses them)."""
    return False


def feature_dim(cfg: NeuroMambaConfig) -> int:
    """Pooled features are the final states: width ``embed_dim``."""
    return int(cfg.embed_dim)


FAMILY = ModelFamily(
    name="neuromamba",
    config_class=NeuroMambaConfig,
    sizes=SIZES,
    get_config=get_config,
    with_width=with_width,
    build_pretrain_model=build_pretrain_model,
    build_downstream_model=build_downstream_model,
    param_counts=param_counts,
    flops_per_sample=flops_per_sample,
    tokens_per_sample=tokens_per_sample,
    make_mask=None,
    cuda_graph_regions=None,
    checkpoint_field="checkpoint_blocks",
    stage_modules=lambda encoder: [],  # packed token sequences, not a token grid: the output alone
    finetune=FinetuneHooks(last_block_parameters=last_block_parameters, lora_targets=linears_in_blocks,
                           supports_prompts=supports_prompts, feature_dim=feature_dim),
    arch_fields=ARCH_FIELDS,
)
