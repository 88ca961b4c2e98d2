"""The Triton window attention (``attn_impl="triton"``/``"auto"``) on CPU through the Triton interpreter; on GPU
see ``benchmarks/swift_blocks.py --check-kernels`` (bf16 against float64) and ``--check-runs``."""
from __future__ import annotations

import os

import pytest
import torch
from interpreted import run_check  # this folder (pytest puts it on sys.path)

from neuro_models import registry as R
from neuro_models.swift import layers as L
from neuro_models.swift.kernels import window_attn as WA
from neuro_models.swift.model import WindowBlock4D


def _run(case: str) -> None:
    run_check("window_attn_check.py", case)


def test_kernels_match_float64_for_every_launch_configuration():
    _run("kernel")


def test_block_matches_sdpa_eager_and_compiled():
    _run("block")


def test_model_trains_like_sdpa():
    _run("model")


@pytest.mark.parametrize("dims,window,shift", [((4, 6, 2, 4), (2, 3, 2, 2), (1, 1, 0, 1)),
                                               ((16, 16, 16, 20), (4, 4, 4, 4), (2, 2, 2, 2))])
def test_region_tables_give_swins_mask(dims, window, shift):
    """``(tok[q] & win[w]) == (tok[k] & win[w])`` (the kernels' test) is Swin's region mask, window by window."""
    ref = L.shifted_window_mask(dims, window, shift)  # [W, N, N]
    tok, win = WA.region_bits(dims, window, shift)
    r = tok[None, :] & win[:, None]  # [W, N]
    assert torch.equal(r[:, :, None] == r[:, None, :], ref) and not ref.all()
    assert WA.region_tables(dims, window, shift, torch.device("cpu")) is WA.region_tables(dims, window, shift,
                                                                                         torch.device("cpu"))


def test_selection_and_fallbacks():
    """"auto" and "triton" take the kernels only where they can run; float32 compute, wide windows and odd head
    dims keep the other paths (and the outputs agree with SDPA)."""
    cfg = R.get_config("swift_v2", "debug")
    assert cfg.attn_impl == "auto"
    x = torch.randn(2, 4, 4, 4, 4, 32)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not interp:  # CPU without the interpreter: never
        assert not WA.usable(x.half(), 256, 16)
    assert not WA.usable(x, 256, 16)  # float32 compute
    assert WA.fits(256, 16) and WA.fits(24, 32) and WA.fits(1, 64)
    assert not any(WA.fits(*bad) for bad in [(257, 16), (0, 16), (64, 8), (64, 24), (64, 128)])
    blk = WindowBlock4D(32, 2, (2, 2, 2, 2), shifted=True, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0, scale=0.25,
                        attn_impl="triton").eval()
    ref = WindowBlock4D(32, 2, (2, 2, 2, 2), shifted=True, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0, scale=0.25,
                        attn_impl="sdpa").eval()
    ref.load_state_dict(blk.state_dict())
    assert blk.region_mask(x) is None  # float32: SDPA builds its own mask
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref(x))


def test_kernels_refuse_shapes_they_cannot_index():
    pytest.importorskip("triton")
    qkv = torch.zeros(4, 16, 96).half()
    with pytest.raises(ValueError, match="3 \\* heads"):
        WA.window_attn_op(qkv[..., :95], 2, 0.25, None, None)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        WA.window_attn_op(torch.zeros(1, 257, 96).half(), 2, 0.25, None, None)
    with pytest.raises(ValueError, match="head dim"):
        WA.window_attn_op(torch.zeros(1, 16, 48).half(), 2, 0.25, None, None)  # head dim 8
    tok, win = torch.zeros(16, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="both tok and win"):
        WA.window_attn_op(qkv, 2, 0.25, tok, None)
    with pytest.raises(ValueError, match="W dividing"):
        WA.window_attn_op(qkv, 2, 0.25, tok, win)  # 3 does not divide 4 windows
