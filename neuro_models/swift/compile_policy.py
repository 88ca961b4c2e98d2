"""Where SwiFT's regional ``torch.compile`` uses CUDA graphs: the launch-bound stages only.

A SwiFT step is GPU-bound in its first stages (large token maps) and launch-bound in the last ones (a 51M's
stage 3 runs 18 blocks on a 6x6x6x20 token map): CUDA graphs (``mode="reduce-overhead"``) remove the launch
cost where it dominates. Graphing a large region costs memory and copies instead: CUDA-graph trees copy
every input not produced by another graph into static memory (the 1.1 GB input batch twice per step at the
51M's batch 16). Measured on one H100 (BENCHMARKS.md, SwiFT v2 model, ``select-cgs``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

#: a region gets CUDA graphs when its stage's token map (micro-batch x tokens x width) has at most this many
#: elements; larger regions are GPU-bound
CUDAGRAPH_MAX_ELEMENTS = 2**24


def small_stage_graphs(cfg: Any, micro_batch: int) -> Callable[[str, nn.Module], dict]:
    """``region_kwargs`` for :func:`neuro_models.layers.compile_regions`: CUDA graphs for the blocks, position
    embeddings and merges of the stages whose token map at ``micro_batch`` is small, none elsewhere."""
    small = [micro_batch * math.prod(g) * d <= CUDAGRAPH_MAX_ELEMENTS
             for g, d in zip(cfg.stage_grids(), cfg.stage_dims())]

    def kwargs(name: str, module: nn.Module) -> dict:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "encoder" and parts[1] in ("stages", "pos_embeds", "merges"):
            return {"mode": "reduce-overhead"} if small[int(parts[2])] else {}
        return {}

    return kwargs
