"""The fused SimMIM head (Triton) on CPU through the Triton interpreter; on GPU see ``swift_blocks.py --check``."""
from __future__ import annotations

import os

import pytest
import torch
from interpreted import run_check  # this folder (pytest puts it on sys.path)

from neuro_models import registry as R
from neuro_models.swift.kernels import fused_head


def _run(case: str) -> None:
    run_check("fused_head_check.py", case)


def test_kernel_matches_float64_reference():
    _run("kernel")


def test_model_with_fused_head_matches_pytorch_head():
    _run("model")


def test_fused_head_is_not_used_where_it_cannot_run():
    cfg = R.get_config("swift_v2", "debug", decoder_dim=16)
    model = R.build_pretrain_model(cfg)
    x = torch.randn(1, 1, *cfg.img_size)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not fused_head.available(torch.device("cpu")) and not model.uses_fused_head(x)
    assert not R.build_pretrain_model(cfg.replace(fused_head=False)).uses_fused_head(x)
    revised = R.build_pretrain_model(R.get_config("swift_v2_revised", "debug", decoder_dim=16))
    assert not revised.uses_fused_head(x)  # the factorized decoder keeps the PyTorch path
    with pytest.raises(ValueError, match="loss_type"):
        fused_head.fused_head_loss(torch.zeros(1, 1, 1, 1, 1, 16), torch.zeros(216, 16), torch.zeros(216),
                                   torch.zeros(1, 1, 6, 6, 6, 1), torch.ones(1, 1, 1, 1, 1, dtype=torch.bool), None,
                                   (6, 6, 6, 1), "l3")
