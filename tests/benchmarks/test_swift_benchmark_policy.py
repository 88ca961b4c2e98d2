"""The full-model benchmark's CUDA-graph policy (``block-cgs``): which regions get CUDA graphs."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from swift_benchmark import V1_51M, small_regions  # noqa: E402

from neuro_models.swift.compile_policy import CUDAGRAPH_MAX_ELEMENTS  # noqa: E402

from neuro_models import registry as R  # noqa: E402
from neuro_models.layers import compile_regions  # noqa: E402


def test_cuda_graphs_only_for_small_stages():
    cfg = R.get_config("swift_v2", "51M", **V1_51M)
    kw = small_regions(cfg, 16)
    # b16 token maps: 126M, 31M, 7.9M, 2.0M elements; the threshold is 16.8M
    assert [16 * (20 * (16 >> s) ** 3) * (96 << s) <= CUDAGRAPH_MAX_ELEMENTS for s in range(4)] == [0, 0, 1, 1]
    # the region names compile_regions really produces for a 51M (a smaller input: only the names matter)
    model = R.build_pretrain_model(R.get_config("swift_v2", "51M", **V1_51M, img_size=(48, 48, 48, 4)))
    names = compile_regions(model, lambda n, m: {"backend": "eager"})
    graphed = {name: kw(name, None).get("mode") for name in names}
    assert graphed["encoder.stages.0.blocks.1"] is None and graphed["encoder.stages.1.blocks.0"] is None
    assert graphed["encoder.stages.2.blocks.17"] == "reduce-overhead" == graphed["encoder.stages.3.blocks.0"]
    assert graphed["encoder.pos_embeds.0"] is None and graphed["encoder.pos_embeds.2"] == "reduce-overhead"
    assert graphed["encoder.merges.1"] is None and graphed["encoder.merges.2"] == "reduce-overhead"
    assert graphed["encoder.patch_embed"] is None and graphed["decoder"] is None and graphed["criterion"] is None
    # a batch small enough makes every stage launch-bound
    assert small_regions(cfg, 1)("encoder.stages.0.blocks.0", None) == {"mode": "reduce-overhead"}
