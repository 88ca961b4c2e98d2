"""Registry of model families: one line per family, each a :class:`~neuro_models.family.ModelFamily`.

A family is one folder with a module that defines a ``ModelFamily`` object (the contract: config class,
sizes, builders, counts, FLOPs, mask function, fine-tuning hooks, architecture fields; see
:mod:`neuro_models.family`) plus one line in :data:`FAMILIES`. The functions below dispatch on the
config's ``family`` field, so the training engine and the studies never import a family directly.

Entries are ``"module:attribute"`` and load on first use: listing the names or validating a run spec
imports no model code (a family module imports torch and, for SwiFT, its Triton kernels).

Examples
--------
>>> from neuro_models import registry as R
>>> cfg = R.get_config("swift_v2", "debug")
>>> model = R.build_pretrain_model(cfg)
>>> R.get_family("swift_v2").finetune.supports_prompts(cfg)
True
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from .family import ModelFamily

#: family name -> the ModelFamily object that implements it ("module:attribute")
FAMILIES: dict[str, str] = {
    "swift_v2": "neuro_models.swift.family:FAMILY",
    "swift_v2_revised": "neuro_models.swift.revised_family:FAMILY",
    "neuromamba": "neuro_models.mamba.family:FAMILY",
}


@functools.cache
def get_family(family: str) -> ModelFamily:
    """The :class:`ModelFamily` registered as ``family``; ``ValueError`` for unknown names."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a known model family; allowed: {sorted(FAMILIES)}")
    module, _, attr = FAMILIES[family].partition(":")
    fam = getattr(importlib.import_module(module), attr)
    if not isinstance(fam, ModelFamily) or fam.name != family:
        raise TypeError(f"registry entry {family!r} -> {FAMILIES[family]} is {fam!r}, not the ModelFamily named "
                        f"{family!r}")
    return fam


def family_of(cfg: Any) -> ModelFamily:
    """The family of a config (its ``family`` field)."""
    fam = getattr(cfg, "family", None)
    if fam is None:
        raise ValueError(f"config {type(cfg).__name__} has no 'family' field")
    return get_family(fam)


def list_families() -> list[str]:
    return sorted(FAMILIES)


def list_sizes(family: str) -> list[str]:
    """Named sizes of ``family`` in registry order (smallest first)."""
    return list(get_family(family).sizes)


def get_config(family: str, size: str, **overrides: Any):
    """The config of a named size, with field ``overrides`` applied (e.g. a shrunk depth for tests)."""
    fam = get_family(family)
    if size not in fam.sizes:
        raise ValueError(f"size={size!r} is not a size of family {family!r}; allowed: {list(fam.sizes)}")
    return fam.get_config(size, **overrides)


def with_width(cfg: Any, width: int):
    return family_of(cfg).with_width(cfg, width)


def build_pretrain_model(cfg: Any):
    return family_of(cfg).build_pretrain_model(cfg)


def build_downstream_model(cfg: Any, *, task: str, num_outputs: int = 1, **kwargs: Any):
    if task not in ("classification", "regression"):
        raise ValueError(f"task={task!r}; allowed: 'classification', 'regression'")
    return family_of(cfg).build_downstream_model(cfg, task=task, num_outputs=num_outputs, **kwargs)


def param_counts(cfg: Any) -> dict[str, int]:
    return family_of(cfg).param_counts(cfg)


def flops_per_sample(cfg: Any) -> dict[str, float]:
    return family_of(cfg).flops_per_sample(cfg)


def mask_function(cfg: Any):
    """``f(batch_size, *, generator, device) -> bool mask`` for a masked-modeling family (picklable, so loader
    workers can make masks), or None for objectives without masks (NeuroMamba's next-token)."""
    fn = family_of(cfg).make_mask
    return functools.partial(fn, cfg) if fn is not None else None


def cuda_graph_regions(cfg: Any, micro_batch: int):
    """``region_kwargs`` for :func:`neuro_models.layers.compile_regions` with CUDA graphs where the family
    puts them at this micro-batch, or None (the family never graphs its regions)."""
    fn = family_of(cfg).cuda_graph_regions
    return fn(cfg, micro_batch) if fn is not None else None


def tokens_per_sample(cfg: Any) -> int:
    return family_of(cfg).tokens_per_sample(cfg)
