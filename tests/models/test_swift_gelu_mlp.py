"""The epilogue MLP (Triton, ``swift.kernels.gelu_mlp``) on CPU through the Triton interpreter; on GPU see
``swift_blocks.py --check-kernels``."""
from __future__ import annotations

import os

import pytest
import torch
from interpreted import run_check  # this folder (pytest puts it on sys.path)

from neuro_models import registry as R
from neuro_models.swift.kernels import gelu_mlp, triton_launch
from neuro_models.swift.layers import Mlp


def _run(case: str) -> None:
    run_check("gelu_mlp_check.py", case)


def test_kernel_gelu_and_slope_match_float64():
    _run("gelu")


def test_kernels_match_float64_for_every_launch_configuration():
    _run("kernel")


def test_module_matches_pytorch_mlp_eager_and_compiled():
    _run("module")


def test_model_runs_epilogue_mlp_where_the_width_allows():
    _run("model")


def test_mlp_impl_reaches_every_4d_block_and_is_checked():
    assert R.get_config("swift_v2", "debug").mlp_impl == "auto"  # the kernels wherever they can run
    cfg = R.get_config("swift_v2", "debug", mlp_impl="epilogue")
    blocks = [m for m in R.build_pretrain_model(cfg).modules() if isinstance(m, Mlp)]
    assert blocks and all(m.impl == "epilogue" for m in blocks)
    revised = R.build_pretrain_model(R.get_config("swift_v2_revised", "debug", mlp_impl="epilogue"))
    assert not any(m.impl != "torch" for m in revised.modules() if isinstance(m, Mlp))  # 4D family only
    with pytest.raises(ValueError, match=r"mlp_impl='cutlass'; allowed: \('torch', 'epilogue', 'auto'\)"):
        R.get_config("swift_v2", "debug", mlp_impl="cutlass")


def test_epilogue_mlp_is_not_used_where_it_cannot_run():
    m = Mlp(32, 128, impl="auto")
    x = torch.randn(3, 32)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not triton_launch.available(torch.device("cpu")) and not gelu_mlp.usable(x.half(), m.fc1, m.fc2)
    assert not gelu_mlp.usable(x, m.fc1, m.fc2)  # float32 compute keeps the PyTorch path
    odd = Mlp(40, 160, impl="epilogue")
    assert not gelu_mlp.usable(torch.randn(2, 40).half(), odd.fc1, odd.fc2)  # width not a multiple of K_STEP
    wide = Mlp(gelu_mlp.MAX_DIM + gelu_mlp.K_STEP, 8, impl="epilogue")
    assert not gelu_mlp.usable(torch.randn(2, wide.fc1.in_features).half(), wide.fc1, wide.fc2)
    m.fc2.weight.ds_id = 7  # a DeepSpeed ZeRO-3 partitioned weight
    assert not gelu_mlp.usable(x.half(), m.fc1, m.fc2)
    torch.testing.assert_close(m(x), m.fc2(m.act(m.fc1(x))))  # the PyTorch path where the kernels cannot run


def test_epilogue_mlp_refuses_inconsistent_shapes():
    pytest.importorskip("triton")
    x, w1, b1, w2, b2 = torch.zeros(5, 32), torch.zeros(64, 32), torch.zeros(64), torch.zeros(32, 64), torch.zeros(32)
    with pytest.raises(ValueError, match=r"fc2 weight shape \(64, 32\); expected \(32, 64\)"):
        gelu_mlp.gelu_mlp_op(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match=r"fc1 bias shape \(63,\)"):
        gelu_mlp.gelu_mlp_op(x, w1, b1[:63], w2, b2)
    with pytest.raises(ValueError, match="must be 2-D"):
        gelu_mlp.gelu_mlp_op(x[None], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="width 40 is not a multiple of 32"):
        gelu_mlp.gelu_mlp_op(torch.zeros(5, 40), torch.zeros(64, 40), b1, torch.zeros(40, 64), torch.zeros(40))
