"""Layers shared by the model families."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (first axis) with probability ``p``.

    The keep probability lives in a (non-persistent) buffer, not in a Python float the forward branches
    on: ``torch.compile`` guards on Python constants, so with a float every block of a linear
    stochastic-depth schedule (a different rate each) compiled its own graph (24 graphs for the 51M
    SwiFT instead of one per block shape, past Dynamo's recompile limit). Only whether the branch is
    active at all (``p > 0``) is a Python value. ``state_dict`` is unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop path rate {value}; allowed: [0, 1)")
        self._p = value
        self.active = value > 0.0
        self.keep_prob.fill_(1.0 - value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = self.keep_prob.float()
        mask = (torch.rand(shape, device=x.device, dtype=torch.float32) < keep).float() / keep
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self._p}"


#: Dynamo's recompile limits for compiled regions: one region's code serves every block of a stage and every
#: stage's shape, in training and evaluation mode, at the training micro-batch and at evaluation's batch of one;
#: past PyTorch's default of 8 variants Dynamo silently runs the region eagerly (seen in train(): the 51M at the
#: v1 configuration hit "[2/8]" on stage 2 once evaluation started)
RECOMPILE_LIMIT = 256


def raise_recompile_limits(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise Dynamo's per-frame recompile limits to at least ``limit`` (never lowers them)."""
    import torch._dynamo.config as dc

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dc, name) and getattr(dc, name) < limit:
            setattr(dc, name, limit)


def compile_regions(model: nn.Module, region_kwargs: Callable[[str, nn.Module], dict] | None = None,
                    **compile_kwargs) -> list[str]:
    """Regional compilation: ``torch.compile`` every outermost submodule whose class sets
    ``compile_region = True`` (encoder blocks, patch embedding and merging, decoders, losses), in place.

    Blocks of the same shape share compiled code (Dynamo inlines module instances and guards on
    parameter shapes), so a 24-block encoder compiles one graph per (stage, shifted) pair instead of
    one big graph: minutes less than ``torch.compile(model)`` and no graph break at the model's Python
    glue (mask handling, stage loops, checkpointing). Defaults to ``dynamic=False``: stages have
    different but fixed shapes, and automatic dynamic shapes would otherwise turn the second stage's
    recompile into a slower symbolic-shape graph; a class whose input length varies from batch to batch says
    so with ``compile_kwargs = {"dynamic": None}`` (e.g. NeuroMamba's packed rows: one static graph, then one
    with the length symbolic, instead of a recompile per length). ``region_kwargs(name, module)`` returns per-region
    overrides of ``compile_kwargs`` (e.g. CUDA graphs only for launch-bound regions). Returns the qualified
    names compiled.
    """
    compile_kwargs.setdefault("dynamic", False)
    raise_recompile_limits()
    done: list[str] = []
    for name, module in model.named_modules():
        if getattr(type(module), "compile_region", False) and not any(name.startswith(d + ".") for d in done):
            module.compile(**{**compile_kwargs, **getattr(type(module), "compile_kwargs", {}),
                              **(region_kwargs(name, module) if region_kwargs else {})})
            done.append(name)
    return done
