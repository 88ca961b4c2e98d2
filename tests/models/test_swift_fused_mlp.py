"""The fused MLP (Triton) on CPU through the Triton interpreter; on GPU see ``swift_blocks.py --check``."""
from __future__ import annotations

import os

import pytest
import torch
from interpreted import run_check  # this folder (pytest puts it on sys.path)

from neuro_models import registry as R
from neuro_models.swift.kernels import fused_mlp, triton_launch
from neuro_models.swift.layers import Mlp


def _run(case: str) -> None:
    run_check("fused_mlp_check.py", case)


def test_kernels_match_float64_for_every_launch_configuration():
    _run("kernel")


def test_module_matches_pytorch_mlp_eager_and_compiled():
    _run("module")


def test_model_runs_fused_mlp_only_where_narrow_enough():
    _run("model")


def test_fused_mlp_is_off_by_default_and_not_used_where_it_cannot_run():
    cfg = R.get_config("swift_v2", "debug")
    assert not cfg.fused_mlp
    blocks = [m for m in R.build_pretrain_model(cfg.replace(fused_mlp=True)).modules() if isinstance(m, Mlp)]
    assert blocks and all(m.fused for m in blocks)
    revised = R.build_pretrain_model(R.get_config("swift_v2_revised", "debug", fused_mlp=True))
    assert not any(m.fused for m in revised.modules() if isinstance(m, Mlp))  # 4D family only
    m = Mlp(16, 64, fused=True)
    x = torch.randn(3, 16)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not triton_launch.available(torch.device("cpu")) and not fused_mlp.usable(x.half(), m.fc1, m.fc2)
    assert not fused_mlp.usable(x, m.fc1, m.fc2)  # float32 compute keeps the PyTorch path
    wide = Mlp(fused_mlp.MAX_DIM + 1, 8, fused=True)
    assert not fused_mlp.usable(torch.randn(2, fused_mlp.MAX_DIM + 1).half(), wide.fc1, wide.fc2)
    m.fc1.weight.ds_id = 7  # a DeepSpeed ZeRO-3 partitioned weight
    assert not fused_mlp.usable(x.half(), m.fc1, m.fc2)
    torch.testing.assert_close(m(x), m.fc2(m.act(m.fc1(x))))  # the PyTorch path where the kernels cannot run


def test_fused_mlp_refuses_inconsistent_shapes():
    pytest.importorskip("triton")
    x, w1, b1, w2, b2 = torch.zeros(5, 16), torch.zeros(64, 16), torch.zeros(64), torch.zeros(16, 64), torch.zeros(16)
    with pytest.raises(ValueError, match=r"fc2 weight shape \(64, 16\); expected \(16, 64\)"):
        fused_mlp.fused_mlp_op(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match=r"fc1 bias shape \(63,\)"):
        fused_mlp.fused_mlp_op(x, w1, b1[:63], w2, b2)
    with pytest.raises(ValueError, match="must be 2-D"):
        fused_mlp.fused_mlp_op(x[None], w1, b1, w2, b2)
