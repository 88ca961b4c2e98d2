"""The attention benchmark times the shapes the model really runs."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from neuro_models import registry as R
from neuro_models.swift.layers import Attention
from neuro_models.swift.model import FullBlock, WindowBlock4D

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from attention_backends import attention_shapes  # noqa: E402


def test_attention_shapes_match_the_unshifted_blocks_of_a_forward_pass():
    cfg = R.get_config("swift_v2", "51M", patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 4),
                       mask_patch_size=(12, 12, 12, 2), img_size=(48, 48, 48, 12))
    batch = 3
    with torch.device("meta"):
        model = R.build_pretrain_model(cfg)
    seen = []

    def hook(block):
        def record(module, args):
            S, N, D = args[0].shape
            seen.append((S, module.num_heads, N, D // module.num_heads))
        return record

    handles = [b.attn.register_forward_pre_hook(hook(b)) for b in model.modules()
               if (isinstance(b, WindowBlock4D) and not b.shifted) or isinstance(b, FullBlock)]
    assert all(isinstance(m.attn, Attention) for m in model.modules() if isinstance(m, (WindowBlock4D, FullBlock)))
    with torch.no_grad():
        model.encoder(torch.empty(batch, 1, *cfg.img_size, device="meta"))
    for h in handles:
        h.remove()
    expected = []
    for s in attention_shapes(cfg, batch):
        calls = s["calls"] if s["stage"] == len(cfg.depths) and cfg.last_layer_full_attention else (s["calls"] + 1) // 2
        expected += [(s["S"], s["H"], s["N"], s["E"])] * calls
    assert sorted(seen) == sorted(expected)
