"""Registry of model families and their named sizes.

Each family lives in its own module that exposes the same small set of functions (the *family
protocol*): ``SIZES`` (name -> config), ``get_config(size, **overrides)``, ``with_width(cfg, width)``,
``build_pretrain_model(cfg)``, ``build_downstream_model(cfg, *, task, num_outputs, **kw)``,
``param_counts(cfg)``, ``flops_per_sample(cfg)`` and ``tokens_per_sample(cfg)``. This module only
dispatches on ``family`` names, so the training engine and the studies never import a family
directly.

Examples
--------
>>> from neuro_models import registry as R
>>> cfg = R.get_config("swift_v2", "debug")
>>> model = R.build_pretrain_model(cfg)
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

#: family name -> module implementing the family protocol
FAMILY_MODULES: dict[str, str] = {
    "swift_v2": "neuro_models.swift.family",
    "swift_v2_revised": "neuro_models.swift.revised_family",
    "neuromamba": "neuro_models.mamba.family",
}


def family_module(family: str) -> ModuleType:
    """Return the module that implements ``family``; raise ``ValueError`` for unknown names."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"family={family!r} is not a known model family; allowed: {sorted(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[family])


def _family_of(cfg: Any) -> ModuleType:
    fam = getattr(cfg, "family", None)
    if fam is None:
        raise ValueError(f"config {type(cfg).__name__} has no 'family' field")
    return family_module(fam)


def list_families() -> list[str]:
    return sorted(FAMILY_MODULES)


def list_sizes(family: str) -> list[str]:
    """Named sizes of ``family`` in registry order (smallest first)."""
    return list(family_module(family).SIZES)


def get_config(family: str, size: str, **overrides: Any):
    """The config of a named size, with field ``overrides`` applied (e.g. a shrunk depth for tests)."""
    mod = family_module(family)
    if size not in mod.SIZES:
        raise ValueError(f"size={size!r} is not a size of family {family!r}; allowed: {list(mod.SIZES)}")
    return mod.get_config(size, **overrides)


def with_width(cfg: Any, width: int):
    return _family_of(cfg).with_width(cfg, width)


def build_pretrain_model(cfg: Any):
    return _family_of(cfg).build_pretrain_model(cfg)


def build_downstream_model(cfg: Any, *, task: str, num_outputs: int = 1, **kwargs: Any):
    if task not in ("classification", "regression"):
        raise ValueError(f"task={task!r}; allowed: 'classification', 'regression'")
    return _family_of(cfg).build_downstream_model(cfg, task=task, num_outputs=num_outputs, **kwargs)


def param_counts(cfg: Any) -> dict[str, int]:
    return _family_of(cfg).param_counts(cfg)


def flops_per_sample(cfg: Any) -> dict[str, float]:
    return _family_of(cfg).flops_per_sample(cfg)


def mask_function(cfg: Any):
    """``f(batch_size, *, generator, device) -> bool mask`` for a masked-modeling family (picklable, so loader
    workers can make masks), or None for objectives without masks (NeuroMamba's next-token)."""
    fn = getattr(_family_of(cfg), "make_mask", None)
    return functools.partial(fn, cfg) if fn is not None else None


def tokens_per_sample(cfg: Any) -> int:
    return _family_of(cfg).tokens_per_sample(cfg)
