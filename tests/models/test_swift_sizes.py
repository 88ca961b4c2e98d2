"""Size ladder: every size builds on the meta device; counted parameters match the documented counts."""
from __future__ import annotations

import pytest
import torch

from neuro_models import registry as R
from neuro_models.swift.config import EXPECTED_ENCODER_PARAMS

LADDER = ["51M", "202M", "806M", "3B", "13.4B"]


def test_registry_lists_sizes():
    for fam in ("swift_v2", "swift_v2_revised"):
        assert R.list_sizes(fam) == ["debug", *LADDER]


@pytest.mark.parametrize("size", LADDER)
def test_encoder_count_matches_documented_within_1pct(size):
    cfg = R.get_config("swift_v2", size)
    assert cfg.patch_size == (6, 6, 6, 2) and cfg.img_size == (96, 96, 96, 20) and cfg.depths == (2, 2, 18, 2)
    assert cfg.embed_dim // cfg.num_heads[0] == 16
    counts = R.param_counts(cfg)
    expected = EXPECTED_ENCODER_PARAMS[size]
    assert abs(counts["encoder"] - expected) / expected < 0.01, (size, counts["encoder"], expected)
    assert counts["total"] == counts["encoder"] + counts["decoder"]
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] < counts["total"]


def test_51m_count_is_exact_swift_formula():
    """12 d^2 + 13 d per block, 16 d^2 + 16 d per merging, patch embed, per-stage position embeddings."""
    cfg = R.get_config("swift_v2", "51M")
    blocks = sum(n * (12 * d * d + 13 * d) for n, d in zip((2, 2, 18, 2), (96, 192, 384, 768)))
    merges = sum(16 * d * d + 16 * d for d in (96, 192, 384))
    embed = 432 * 96 + 96
    pos = sum(d * (g ** 3 + 10) for d, g in zip((96, 192, 384, 768), (16, 8, 4, 2)))
    assert R.param_counts(cfg)["encoder"] == blocks + merges + embed + pos + 2 * 768 == 50_916_576


@pytest.mark.parametrize("family", ["swift_v2", "swift_v2_revised"])
@pytest.mark.parametrize("size", ["debug", *LADDER])
def test_every_size_builds_on_meta(family, size):
    cfg = R.get_config(family, size)
    with torch.device("meta"):
        model = R.build_pretrain_model(cfg)
        down = R.build_downstream_model(cfg, task="classification", num_outputs=2)
    n = sum(p.numel() for p in model.parameters())
    assert n == R.param_counts(cfg)["total"]
    assert sum(p.numel() for p in down.encoder.parameters()) == R.param_counts(cfg)["encoder"]


def test_shrunk_real_size_runs():
    """A real size shrunk for tests (litgpt-style overrides) keeps its width and heads."""
    cfg = R.get_config("swift_v2", "51M", img_size=(24, 24, 24, 4), depths=(1, 1), num_heads=(6, 12),
                       window_size=(2, 2, 2, 2), mask_patch_size=(12, 12, 12, 2), decoder_dim=4)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    out = model(torch.randn(1, 1, 24, 24, 24, 4))
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (1, 4, 4, 4, 2, 432)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 1, 24, 24, 24, 2))
