"""The code shared by the SwiFT v2 variants' :class:`~neuro_models.family.ModelFamily` entries.

A variant differs only in its config defaults, its encoder and its decoder; everything else (muP base
shapes, downstream models, counts, FLOPs, tokens, fine-tuning hooks) is the same code, bound here once.
Each variant's module (``family.py``, ``revised_family.py``) gives its config defaults, encoder, decoder and whether
its downstream models take prompt tokens; :meth:`SwiftVariant.model_family` binds the rest into its ``ModelFamily``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..family import FinetuneHooks, ModelFamily, linears_in_blocks
from ..mup_utils import apply_mup
from . import config as C
from .compile_policy import small_stage_graphs
from .counting import flops_per_sample as _flops, param_counts as _counts
from .masking import make_mask
from .model import DownstreamModel, SimMIM


#: config fields that must agree between exported weights and a model loading them (both variants)
ARCH_FIELDS = ("family", "embed_dim", "depths", "num_heads", "patch_size", "in_chans", "img_size", "window_size",
               "mlp_ratio", "qkv_bias", "last_layer_full_attention", "parametrization")


def last_stage_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Strategy ``last_block``: the last encoder stage (the seed's "last block": the 51M's 2 full-attention
    blocks, ~28% of the model), the final norm and the head; not the prompts."""
    enc = model.encoder
    return list(enc.stages[-1].parameters()) + list(enc.norm.parameters()) + list(model.head.parameters())


def stage_modules(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's stages in order: each outputs the token grid ``[B, X', Y', Z', T', D_s]`` after its blocks (the
    last one before the encoder's final norm)."""
    return list(encoder.stages)


def feature_dim(cfg: C.SwiftConfig) -> int:
    """Width of the last stage (the pooled features)."""
    return int(cfg.stage_dims()[-1])


class SwiftVariant:
    """One SwiFT v2 variant: ``config_kwargs(size)`` gives a named size's fields (before overrides),
    ``encoder(cfg)`` and ``decoder(cfg, encoder)`` build the networks."""

    def __init__(self, name: str, config_kwargs: Callable[[str], dict[str, Any]],
                 encoder: Callable[[C.SwiftConfig], nn.Module],
                 decoder: Callable[[C.SwiftConfig, nn.Module], nn.Module]) -> None:
        self.name, self._config_kwargs, self._encoder, self._decoder = name, config_kwargs, encoder, decoder
        self.sizes = {size: self.get_config(size) for size in C.SIZE_NAMES}

    def get_config(self, size: str, **overrides: Any) -> C.SwiftConfig:
        """Config of a named size with field overrides (e.g. ``depths=(1, 1, 1, 1)`` to shrink it)."""
        return C.SwiftConfig(**{**self._config_kwargs(size), "family": self.name, **overrides})

    @staticmethod
    def with_width(cfg: C.SwiftConfig, width: int) -> C.SwiftConfig:
        return C.with_width(cfg, width)

    def build_encoder(self, cfg: C.SwiftConfig) -> nn.Module:
        return self._encoder(cfg)

    def _bare_pretrain(self, cfg: C.SwiftConfig) -> nn.Module:
        enc = self._encoder(cfg)
        return SimMIM(cfg, enc, self._decoder(cfg, enc))

    def _finish(self, model: nn.Module, builder, cfg: C.SwiftConfig) -> nn.Module:
        if cfg.parametrization == "mup":
            apply_mup(model, builder, cfg, with_width=self.with_width, base_width=cfg.mup_base_width)
        return model

    def build_pretrain_model(self, cfg: C.SwiftConfig) -> nn.Module:
        """SimMIM model (encoder + mask token + decoder); muP base shapes set under ``"mup"``."""
        return self._finish(self._bare_pretrain(cfg), self._bare_pretrain, cfg)

    def build_downstream_model(self, cfg: C.SwiftConfig, *, task: str, num_outputs: int = 1,
                               hidden_dim: int | None = None, dropout: float = 0.0,
                               prompt_tokens: int = 0) -> nn.Module:
        """Encoder + MLP head; ``prompt_tokens`` learnable prompts join the last (full-attention) stage."""
        def builder(c: C.SwiftConfig) -> nn.Module:
            return DownstreamModel(c, self._encoder(c), task=task, num_outputs=num_outputs, hidden_dim=hidden_dim,
                                   dropout=dropout, prompt_tokens=prompt_tokens)

        return self._finish(builder(cfg), builder, cfg)

    def param_counts(self, cfg: C.SwiftConfig) -> dict[str, int]:
        return _counts(cfg, self._bare_pretrain)

    @staticmethod
    def flops_per_sample(cfg: C.SwiftConfig) -> dict[str, float]:
        return _flops(cfg)

    @staticmethod
    def tokens_per_sample(cfg: C.SwiftConfig) -> int:
        g = cfg.grid
        return int(g[0] * g[1] * g[2] * g[3])

    def model_family(self, supports_prompts: Callable[[C.SwiftConfig], bool]) -> ModelFamily:
        """This variant's registry entry: everything but ``supports_prompts`` is the code shared here."""
        return ModelFamily(
            name=self.name,
            config_class=C.SwiftConfig,
            sizes=self.sizes,
            get_config=self.get_config,
            with_width=self.with_width,
            build_pretrain_model=self.build_pretrain_model,
            build_downstream_model=self.build_downstream_model,
            param_counts=self.param_counts,
            flops_per_sample=self.flops_per_sample,
            tokens_per_sample=self.tokens_per_sample,
            make_mask=make_mask,
            cuda_graph_regions=small_stage_graphs,
            checkpoint_field="use_checkpoint",
            stage_modules=stage_modules,
            finetune=FinetuneHooks(last_block_parameters=last_stage_parameters, lora_targets=linears_in_blocks,
                                   supports_prompts=supports_prompts, feature_dim=feature_dim),
            arch_fields=ARCH_FIELDS,
        )
