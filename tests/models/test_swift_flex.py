"""FlexAttention window attention (``attn_impl``) and the bf16 residual stream of SwiFT v2.

FlexAttention has no CPU backward in torch 2.13, so on CPU these tests check its forward (eager, no grad)
against SDPA, the region mask against Swin's, the block mask's tiling, and the selection logic; the
compiled forward + backward on GPU is checked by ``benchmarks/swift_blocks.py --check`` (BENCHMARKS.md).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from neuro_models import registry as R
from neuro_models.swift import layers as L
from neuro_models.swift.model import Stage, WindowBlock4D

# (map dims, window, shift): every axis shifted; an odd window; an unshifted axis; a 51M stage-1-like map
REGION_CASES = [((4, 6, 2, 4), (2, 2, 2, 2), (1, 1, 0, 1)), ((4, 6, 2, 4), (2, 3, 2, 2), (1, 1, 0, 1)),
                ((8, 8, 8, 10), (4, 4, 4, 2), (2, 2, 2, 1)), ((16, 16, 16, 20), (4, 4, 4, 4), (2, 2, 2, 2))]


def _block(impl: str, shifted: bool, window=(2, 2, 2, 2), dim=32, heads=2, seed=0) -> WindowBlock4D:
    torch.manual_seed(seed)
    return WindowBlock4D(dim, heads, window, shifted=shifted, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0,
                         scale=(dim // heads) ** -0.5, shift_impl="split", attn_impl=impl).eval()


@pytest.mark.parametrize("dims,window,shift", REGION_CASES)
def test_region_mask_mod_is_swins_mask_for_every_sample(dims, window, shift):
    ref = L.shifted_window_mask(dims, window, shift)  # [W, N, N]
    W, N, _ = ref.shape
    got = create_mask(L.region_mask_mod(dims, window, shift), 3 * W, 1, N, N, device="cpu")[:, 0]
    assert got.shape == (3 * W, N, N)
    for s in range(3):  # sequence b is window b % W of its sample
        assert torch.equal(got[s * W:(s + 1) * W], ref)
    assert not ref.all()  # the case has masked pairs at all


@pytest.mark.parametrize("dims,window,shift", REGION_CASES[:3])
def test_region_block_mask_tiles_like_a_direct_build(dims, window, shift):
    W = L.shifted_window_mask(dims, window, shift).shape[0]
    N = torch.Size(window).numel()
    tiled = L.region_block_mask(dims, window, shift, 3 * W, torch.device("cpu"))
    direct = create_block_mask(L.region_mask_mod(dims, window, shift), B=3 * W, H=None, Q_LEN=N, KV_LEN=N,
                               device="cpu")
    assert tiled.shape == direct.shape
    torch.testing.assert_close(tiled.to_dense(), direct.to_dense(), rtol=0, atol=0)
    assert L.region_block_mask(dims, window, shift, 3 * W, torch.device("cpu")) is tiled  # cached
    with pytest.raises(ValueError, match="multiple"):
        L.region_block_mask(dims, window, shift, 3 * W + 1, torch.device("cpu"))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("window", [(2, 2, 2, 2), (2, 3, 2, 2)])
def test_flex_block_equals_sdpa_block(shifted, window):
    x = torch.randn(3, 4, 6, 2, 4, 32, generator=torch.Generator().manual_seed(1))
    sdpa, flex = _block("sdpa", shifted, window), _block("flex", shifted, window)
    bm = flex.region_mask(x)
    assert (bm is not None) == shifted and sdpa.region_mask(x) is None
    with torch.no_grad():
        ref = sdpa(x)
        got = flex(x, *(() if bm is None else (bm,)))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_flex_model_forward_equals_sdpa_model():
    """The whole SimMIM forward (the stage loop builds and passes the block masks)."""
    cfg = R.get_config("swift_v2", "debug", img_size=(48, 24, 24, 8), window_size=(4, 2, 2, 4))
    x = torch.randn(2, 1, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    losses = []
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg.replace(attn_impl=impl)).eval()
        with torch.no_grad():
            losses.append(model(x, mask=model.make_mask(2, generator=torch.Generator().manual_seed(0))))
    torch.testing.assert_close(losses[1]["pred"], losses[0]["pred"], rtol=1e-5, atol=1e-5)


def test_stage_passes_block_masks_only_to_shifted_flex_blocks():
    calls = []

    class Spy(WindowBlock4D):
        def forward(self, x, *extra):
            calls.append((self.shifted, len(extra)))
            return super().forward(x, *extra)

    def spy(impl, shifted):
        torch.manual_seed(0)
        return Spy(16, 2, (2, 2, 2, 2), shifted=shifted, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0, scale=0.25,
                   attn_impl=impl)

    x = torch.randn(2, 4, 4, 4, 4, 16)
    with torch.no_grad():
        for impl in ("flex", "auto", "sdpa"):
            Stage([spy(impl, False), spy(impl, True)], use_checkpoint=False, full=False)(x)
    # flex: the shifted block gets one; auto on CPU and sdpa: none (no mask is built)
    assert calls == [(False, 0), (True, 1), (False, 0), (True, 0), (False, 0), (True, 0)]


def test_use_flex_selection(monkeypatch):
    cpu, cuda, xpu = torch.device("cpu"), torch.device("cuda"), torch.device("xpu")
    assert L.use_flex("flex", cpu) and not L.use_flex("sdpa", cuda)
    assert not L.use_flex("auto", cuda)  # eager: FlexAttention would materialise the scores
    # what the stage loop can know (it builds block masks then): "auto" on CUDA, "flex" anywhere
    assert L.flex_eligible("auto", cuda) and L.flex_eligible("flex", cpu)
    assert not L.flex_eligible("auto", cpu) and not L.flex_eligible("auto", xpu) and not L.flex_eligible("sdpa", cuda)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert L.use_flex("auto", cuda)
    assert not L.use_flex("auto", cpu) and not L.use_flex("auto", xpu)  # no CPU backward; XPU unmeasured
    assert not L.use_flex("sdpa", cuda)


def test_flex_chunks_without_a_block_mask(monkeypatch):
    q, k, v = (torch.randn(10, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    whole = L.flex_attention_chunked(q, k, v, None, 0.3)
    monkeypatch.setattr(L, "SDPA_MAX_SEQUENCES", 4)
    torch.testing.assert_close(L.flex_attention_chunked(q, k, v, None, 0.3), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block mask"):
        L.flex_attention_chunked(q, k, v, object(), 0.3)


def test_too_many_windows_for_one_flex_call_fall_back_to_sdpa(monkeypatch):
    blk = _block("flex", True)
    x = torch.randn(3, 4, 6, 2, 4, 32)  # 3 samples x 12 windows = 36 sequences
    monkeypatch.setattr("neuro_models.swift.model.SDPA_MAX_SEQUENCES", 20)
    assert blk.region_mask(x) is None
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _block("sdpa", True)(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bf16 residual stream
# ---------------------------------------------------------------------------------------------
def _block_input_dtypes(model, x, mask, autocast: bool) -> list[torch.dtype]:
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
             for m in model.modules() if isinstance(m, WindowBlock4D)]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
    with ctx, torch.no_grad():
        out = model(x, mask=mask)
    for h in hooks:
        h.remove()
    return seen, out


def test_bf16_residual_stream_under_autocast_only():
    cfg = R.get_config("swift_v2", "debug")
    x = torch.randn(2, 1, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    outs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg.replace(bf16_residual=bf16)).eval()
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
        seen, _ = _block_input_dtypes(model, x, mask, autocast=True)
        assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
        seen, outs[bf16] = _block_input_dtypes(model, x, mask, autocast=False)
        assert set(seen) == {torch.float32}
    torch.testing.assert_close(outs[True]["pred"], outs[False]["pred"], rtol=0, atol=0)  # no autocast: no change


def test_bf16_residual_trains_like_float32_residual():
    """A few bf16-autocast steps on a fixed batch: the loss falls, and follows the float32-residual run."""
    from tests.models.test_swift_model import smooth_batch

    cfg = R.get_config("swift_v2", "debug")
    x = smooth_batch()
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg.replace(bf16_residual=bf16))
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        curves[bf16] = []
        for _ in range(15):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, mask=mask)["loss"]
            loss.backward()
            opt.step()
            curves[bf16].append(loss.item())
    assert curves[True][-1] < 0.93 * curves[True][0], curves[True]
    assert abs(curves[True][-1] - curves[False][-1]) < 0.05 * curves[False][-1], curves


def test_flex_kernel_options_selection(monkeypatch):
    """Tuned backward tiles only for small heads on CUDA; PyTorch's defaults elsewhere; an override wins."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert L.flex_kernel_options(16, cuda) == L.SMALL_HEAD_BWD_OPTIONS
    assert L.flex_kernel_options(64, cuda) == {} and L.flex_kernel_options(16, cpu) == {}
    assert L.flex_kernel_options(16, torch.device("xpu")) == {}
    assert all(k.startswith("bwd_") for k in L.SMALL_HEAD_BWD_OPTIONS)  # the forward keeps PyTorch's tiling
    monkeypatch.setattr(L, "FLEX_KERNEL_OPTIONS", {})
    assert L.flex_kernel_options(16, cuda) == {}
    monkeypatch.setattr(L, "FLEX_KERNEL_OPTIONS", {"fwd_BLOCK_M": 64})
    assert L.flex_kernel_options(16, cpu) == {"fwd_BLOCK_M": 64}
