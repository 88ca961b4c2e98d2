"""The model-family contract: what a family gives the registry, the trainer, the planner and the fine-tuning engine.

A family is one :class:`ModelFamily` object (torchtitan's ``ModelSpec`` in spirit): its config class, named
sizes, builders, counts, FLOPs, mask function, fine-tuning hooks and architecture fields, every one spelled
out in the family's own module. :mod:`neuro_models.registry` lists the objects by name; nothing above
``neuro_models`` looks into a model's modules by attribute name. ``tests/models/test_family_contract.py``
checks every registered family against this contract, so a new family that builds is a family that works.

Configs are frozen, keyword-only dataclasses with a ``family`` field equal to the family's name and the
fields every config has (``img_size``, ``in_chans``, ``patch_size``, ``embed_dim``, ``parametrization``,
``mup_base_width``, ``drop_path_rate``; ``docs/CONTRACTS.md``). A downstream model (``build_downstream_model``)
has ``.encoder`` (the part pre-trained weights load into, from the pre-training model's ``encoder.*``
tensors) and ``.head``, and maps ``(x_BCXYZT, brain_mask=None) -> [B, num_outputs]``; built with
``prompt_tokens=P > 0`` (only where ``FinetuneHooks.supports_prompts``) it also has ``.prompts`` ``[P, D]``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

#: the config fields every family's config has (docs/CONTRACTS.md)
COMMON_CONFIG_FIELDS = ("family", "img_size", "in_chans", "patch_size", "embed_dim", "parametrization",
                        "mup_base_width", "drop_path_rate")


@dataclass(frozen=True, kw_only=True)
class FinetuneHooks:
    """How the fine-tuning engine (``study/finetune_engine.py``) reaches into a family's downstream model."""

    last_block_parameters: Callable[[nn.Module], list[nn.Parameter]]
    """``(downstream model) -> parameters`` that strategy ``last_block`` trains: the seed's "last block" (for
    SwiFT the last stage), the final norm and the head; never the prompts."""
    lora_targets: Callable[[nn.Module], list[str]]
    """``(model.encoder) -> module names`` (relative to the encoder) that LoRA adapts; raises ``ValueError``
    when there are none."""
    supports_prompts: Callable[[Any], bool]
    """``(cfg) -> bool``: whether ``build_downstream_model(cfg, ..., prompt_tokens=P)`` with ``P > 0`` works
    (strategy ``prompt``)."""
    feature_dim: Callable[[Any], int]
    """``(cfg) -> int``: width of the pooled features the head reads (the ``frozen_mlp`` head's hidden width)."""


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One model family. Every field is required; :func:`neuro_models.registry.get_family` returns these."""

    name: str
    """Registry name, equal to the configs' ``family`` field (``"swift_v2"``)."""
    config_class: type
    """The family's frozen config dataclass."""
    sizes: Mapping[str, Any]
    """Named sizes in ladder order, smallest first, ``"debug"`` (a CPU-test size) first: name -> config."""
    get_config: Callable[..., Any]
    """``(size, **overrides) -> cfg``: a named size with field overrides; ``ValueError`` for unknown fields."""
    with_width: Callable[[Any, int], Any]
    """``(cfg, width) -> cfg``: the same model at another width (muP ladders, µTransfer)."""
    build_pretrain_model: Callable[[Any], nn.Module]
    """``(cfg) -> nn.Module`` whose forward ``(x_BCXYZT, brain_mask=, mask=)`` returns ``dict(loss, num_tokens,
    ...)``; muP base shapes set when ``cfg.parametrization == "mup"``."""
    build_downstream_model: Callable[..., nn.Module]
    """``(cfg, *, task, num_outputs=1, hidden_dim=None, dropout=0.0, **family options) -> nn.Module`` (see the
    module docstring for its attributes)."""
    param_counts: Callable[[Any], dict[str, int]]
    """``(cfg) -> dict(total=, encoder=, decoder=, non_embedding=, ...)`` of the pre-training model."""
    flops_per_sample: Callable[[Any], dict[str, float]]
    """``(cfg) -> dict(forward=, train=, ...)``: analytic FLOPs per sample at ``cfg.img_size``."""
    tokens_per_sample: Callable[[Any], int]
    """``(cfg) -> int``: tokens per sample (for tokens seen)."""
    make_mask: Callable[..., Any] | None
    """``(cfg, batch_size, *, generator=None, device=None) -> bool mask`` of a masked-modeling objective, a
    module-level function (loader workers pickle it); ``None`` for objectives without masks."""
    cuda_graph_regions: Callable[[Any, int], Callable[[str, nn.Module], dict]] | None
    """``(cfg, micro_batch) -> region_kwargs`` for :func:`neuro_models.layers.compile_regions` when the trainer
    may use CUDA graphs (per-region ``torch.compile`` options: ``{"mode": "reduce-overhead"}`` for the
    launch-bound regions); ``None``: the family's compiled regions never use CUDA graphs."""
    checkpoint_field: str | None
    """Name of the config field (a bool) that turns on activation checkpointing of the blocks (SwiFT's
    ``use_checkpoint``, NeuroMamba's ``checkpoint_blocks``); ``None``: the family cannot recompute activations
    (the run planner then never plans checkpointing for it)."""
    stage_modules: Callable[[nn.Module], list[nn.Module]]
    """``(encoder) -> modules`` whose outputs are the encoder's stage representations, in order, each a token grid
    ``[B, X', Y', Z', T', D]`` (representation analyses: embedding autocorrelation, CKA between sizes); ``[]`` when
    the encoder's output is its only representation."""
    finetune: FinetuneHooks
    """What the fine-tuning strategies need (:class:`FinetuneHooks`)."""
    arch_fields: tuple[str, ...]
    """Config fields that must agree between exported weights and a model that loads them (width, depths,
    heads, patch and input size, ...); ``"family"`` first."""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config_class):
            raise ValueError(f"family {self.name!r}: config_class={self.config_class!r} must be a dataclass")
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        missing = [f for f in COMMON_CONFIG_FIELDS if f not in fields]
        if missing:
            raise ValueError(f"family {self.name!r}: config_class {self.config_class.__name__} lacks the common "
                             f"config field(s) {missing}; every config has {list(COMMON_CONFIG_FIELDS)}")
        if not self.arch_fields or self.arch_fields[0] != "family" or set(self.arch_fields) - fields:
            raise ValueError(f"family {self.name!r}: arch_fields={self.arch_fields!r} must start with 'family' and "
                             f"name fields of {self.config_class.__name__}")
        if not self.sizes or next(iter(self.sizes)) != "debug":
            raise ValueError(f"family {self.name!r}: sizes must start with 'debug'; got {list(self.sizes)}")
        bad = [k for k, c in self.sizes.items() if not isinstance(c, self.config_class) or c.family != self.name]
        if bad:
            raise ValueError(f"family {self.name!r}: sizes {bad} are not {self.config_class.__name__} configs of "
                             f"family {self.name!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("get_config", "with_width", "build_pretrain_model", "build_downstream_model",
                          "param_counts", "flops_per_sample", "tokens_per_sample") and not callable(v):
                raise ValueError(f"family {self.name!r}: {f.name} must be callable, got {v!r}")
        if self.checkpoint_field is not None and self.checkpoint_field not in fields:
            raise ValueError(f"family {self.name!r}: checkpoint_field={self.checkpoint_field!r} is not a field of "
                             f"{self.config_class.__name__}")
        if not callable(self.stage_modules):
            raise ValueError(f"family {self.name!r}: stage_modules must be callable, got {self.stage_modules!r}")
        if self.make_mask is not None and not callable(self.make_mask):
            raise ValueError(f"family {self.name!r}: make_mask must be callable or None")
        if not isinstance(self.finetune, FinetuneHooks):
            raise ValueError(f"family {self.name!r}: finetune must be a FinetuneHooks")


def linears_in_blocks(encoder: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside an encoder's ``blocks`` (the LoRA targets of our families:
    attention and MLP projections)."""
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and "blocks" in n.split(".")]
    if not names:
        raise ValueError(f"strategy='lora': the {type(encoder).__name__} encoder has no nn.Linear in its blocks")
    return names
