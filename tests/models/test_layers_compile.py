"""Shared layers: DropPath's statistics and that regional compilation shares code across blocks."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from neuro_models import registry as R
from neuro_models.layers import DropPath, compile_regions


def test_drop_path_identity_when_off_or_eval():
    x = torch.randn(8, 3, 4)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(DropPath(0.4).eval()(x), x)


def test_drop_path_drops_whole_samples_at_rate_and_keeps_expectation():
    torch.manual_seed(0)
    dp = DropPath(0.3).train()
    x = torch.ones(200_000, 2)
    y = dp(x)
    dropped = (y[:, 0] == 0)
    assert torch.equal(dropped, y[:, 1] == 0)  # per sample, not per element
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / 0.7))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_drop_path_rate_setter_and_state_dict():
    dp = DropPath(0.1)
    assert "keep_prob" not in dp.state_dict()  # checkpoints unchanged by the buffer
    dp.p = 0.5
    assert dp.active and dp.keep_prob.item() == 0.5
    dp.p = 0.0
    assert not dp.active
    with pytest.raises(ValueError, match="drop path rate"):
        DropPath(1.0)


def test_drop_path_rates_share_one_compiled_graph():
    """Different rates must not recompile (a float constant in the forward made every block its own graph)."""
    counter = CompileCounter()
    mods = [DropPath(p).train() for p in (0.05, 0.1, 0.2, 0.3)]
    for m in mods:
        m.compile(backend=counter, dynamic=False)
    x = torch.randn(4, 5)
    for m in mods:
        m(x)
    assert counter.frame_count == 1


@pytest.mark.parametrize("family", ["swift_v2", "swift_v2_revised"])
def test_compile_regions_one_graph_per_block_shape(family):
    torch._dynamo.reset()
    cfg = R.get_config(family, "debug", drop_path_rate=0.2, depths=(2, 4))
    cfg_ref = cfg
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg).train()
    ref = R.build_pretrain_model(cfg_ref).train()
    ref.load_state_dict(model.state_dict())
    counter = CompileCounter()
    names = compile_regions(model, backend=counter)
    n_blocks = sum(cfg.depths)
    assert sum(".blocks." in n for n in names) == n_blocks
    assert any(n.endswith("patch_embed") for n in names) and "decoder" in names
    x = torch.randn(2, cfg.in_chans, *cfg.img_size)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    out = model(x, mask=mask)["loss"]
    torch.manual_seed(3)
    expect = ref(x, mask=mask)["loss"]
    torch.testing.assert_close(out, expect)
    # 6 blocks with 6 different drop-path rates compile at most one graph per (stage, shifted, active) kind,
    # plus patch embedding, merging, decoder and loss
    assert counter.frame_count <= 2 * len(cfg.depths) + 1 + 4
    assert counter.frame_count < n_blocks + 4


def test_compile_regions_per_region_overrides():
    """``region_kwargs`` overrides the shared options per region (how CUDA graphs go to launch-bound regions only)."""
    torch._dynamo.reset()
    cfg = R.get_config("swift_v2", "debug")
    model = R.build_pretrain_model(cfg)
    shared, own = CompileCounter(), CompileCounter()
    seen = []

    def kwargs(name, module):
        seen.append(name)
        return {"backend": own} if name == "decoder" else {}

    names = compile_regions(model, kwargs, backend=shared)
    assert seen == names
    model(torch.randn(1, cfg.in_chans, *cfg.img_size))
    assert own.frame_count == 1 and shared.frame_count > 1


def test_sdpa_chunks_large_sequence_batches_exactly(monkeypatch):
    """Fused CUDA SDPA kernels take at most 65535 sequences; larger batches run in chunks, same result."""
    from neuro_models.swift import layers

    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(7, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query sees a key
    bias = torch.zeros(7, 1, 5, 5, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    monkeypatch.setattr(layers, "SDPA_MAX_SEQUENCES", 3)
    out = layers.sdpa_chunked(q, k, v, bias, 0.3)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_compile_regions_raises_dynamos_recompile_limit():
    """One region's code serves every stage shape in training and evaluation: at PyTorch's default limit of 8
    variants Dynamo silently falls back to eager for the rest (seen in train() on an H100)."""
    import torch._dynamo.config as dc
    from torch import nn

    from neuro_models.layers import RECOMPILE_LIMIT, compile_regions

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    old = getattr(dc, name)
    try:
        setattr(dc, name, 8)
        compile_regions(nn.Sequential(nn.Linear(2, 2)))
        assert getattr(dc, name) == RECOMPILE_LIMIT
        setattr(dc, name, 1024)
        compile_regions(nn.Sequential(nn.Linear(2, 2)))
        assert getattr(dc, name) == 1024  # never lowered
    finally:
        setattr(dc, name, old)


def test_neuromamba_blocks_are_regions_and_a_new_packed_length_does_not_recompile():
    """Every Mamba block is a compile region; the packed row's length (set by the batch's brain masks) turns
    symbolic at its first change, so a third length compiles nothing new, and the loss is eager's."""
    torch._dynamo.reset()
    cfg = R.get_config("neuromamba", "debug", drop_path_rate=0.1)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg).train()
    ref = R.build_pretrain_model(cfg).train()
    ref.load_state_dict(model.state_dict())
    counter = CompileCounter()
    names = compile_regions(model, backend=counter)
    assert sum(".blocks." in n for n in names) == cfg.depth
    X, Y, Z, T = cfg.img_size
    frames = []
    for k in range(3):  # three batches whose masks keep different token counts
        x = torch.randn(2, 1, X, Y, Z, T, generator=torch.Generator().manual_seed(k))
        mask = torch.zeros(2, X, Y, Z, dtype=torch.bool)
        mask[:, 2:X - 2 - 6 * k, 2:Y - 2, 2:Z - 2] = True
        torch.manual_seed(5)
        out = model(x, mask)["loss"]
        torch.manual_seed(5)
        torch.testing.assert_close(out, ref(x, mask)["loss"], rtol=0, atol=0)
        out.backward()
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[2] == frames[1], frames
