"""Revised SwiFT v2: RoPE relativity, factorized blocks, forward/backward, memory-relevant shapes."""
from __future__ import annotations

import pytest
import torch

from neuro_models import registry as R
from neuro_models.swift.revised import FactorizedBlock, apply_rope, rope_tables

FAM = "swift_v2_revised"


@pytest.mark.parametrize("axes", [1, 3])
def test_rope_scores_depend_only_on_relative_positions(axes):
    g = torch.Generator().manual_seed(0)
    N, E = 7, 12
    q = torch.randn(2, 3, N, E, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, N, E, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 9, (N, axes), generator=g).double()

    def scores(p):
        cos, sin = rope_tables(p, E, theta=100.0, dtype=torch.float64)
        return apply_rope(q, cos.double(), sin.double()) @ apply_rope(k, cos.double(), sin.double()).transpose(-1, -2)

    s0 = scores(pos)
    shift = torch.tensor([5.0, -3.0, 11.0][:axes], dtype=torch.float64)
    torch.testing.assert_close(scores(pos + shift), s0, rtol=1e-9, atol=1e-9)
    # and it does depend on relative positions
    pos2 = pos.clone()
    pos2[0] += 2
    assert not torch.allclose(scores(pos2), s0)
    # rotation preserves norms
    cos, sin = rope_tables(pos, E, 100.0, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(q, cos.double(), sin.double()).norm(dim=-1), q.norm(dim=-1))


def test_factorized_block_translation_equivariance_in_time():
    """Without absolute positions, rolling the input by a whole temporal window rolls the output
    (unshifted block, time windows of 2 on 6 frames)."""
    torch.manual_seed(0)
    blk = FactorizedBlock(8, 2, (2, 2, 2, 2), shifted=False, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0,
                          scale=0.25 * 2 ** 0.5, layer_scale_init=1.0, rope_theta=100.0).double().eval()
    x = torch.randn(1, 4, 2, 6, 6, 8, dtype=torch.float64)
    y = blk(x)
    torch.testing.assert_close(blk(torch.roll(x, 2, dims=4)), torch.roll(y, 2, dims=4))
    torch.testing.assert_close(blk(torch.roll(x, 2, dims=1)), torch.roll(y, 2, dims=1))


def test_temporal_attention_mixes_only_within_time_window():
    torch.manual_seed(0)
    blk = FactorizedBlock(8, 2, (2, 2, 2, 3), shifted=False, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0,
                          scale=0.5, layer_scale_init=1.0, rope_theta=100.0).double().eval()
    x = torch.randn(1, 2, 2, 2, 6, 8, dtype=torch.float64)
    h = blk.norm_t(x)
    o = blk._window_attn(blk.attn_t, h, (1, 1, 1, 3), (0, 0, 0, 0), [3])
    x2 = x.clone()
    x2[..., 3:, :] += torch.randn(8, dtype=torch.float64)  # change the second time window only
    o2 = blk._window_attn(blk.attn_t, blk.norm_t(x2), (1, 1, 1, 3), (0, 0, 0, 0), [3])
    torch.testing.assert_close(o2[..., :3, :], o[..., :3, :])
    assert not torch.allclose(o2[..., 3:, :], o[..., 3:, :])


def test_revised_forward_backward_distinct_axes():
    cfg = R.get_config(FAM, "debug", img_size=(24, 48, 72, 8), window_size=(2, 2, 2, 4))
    assert cfg.patch_size == (6, 6, 6, 1) and cfg.mask_ratio == 0.8
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = torch.randn(2, 1, 24, 48, 72, 8)
    out = model(x, brain_mask=torch.ones(2, 24, 48, 72, dtype=torch.bool),
                mask=model.make_mask(2, generator=torch.Generator().manual_seed(1)))
    assert out["pred"].shape == (2, 4, 8, 12, 8, 216)
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    head = R.build_downstream_model(cfg, task="classification", num_outputs=2)
    assert head(x).shape == (2, 2)
    with pytest.raises(ValueError, match="prompt_tokens"):
        R.build_downstream_model(cfg, task="classification", prompt_tokens=2)


def test_revised_attention_cost_is_factorized():
    """Attention FLOPs per token ~ (w_t + w_s) instead of w_t * w_s: the memory/compute point of it."""
    from neuro_models.swift.counting import encoder_flops

    rev = R.get_config(FAM, "51M", img_size=(96, 96, 96, 80))
    v1 = R.get_config("swift_v2", "51M", img_size=(96, 96, 96, 80), patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 10))
    assert encoder_flops(rev)["attention"] < 0.5 * encoder_flops(v1)["attention"]


def test_revised_bad_window():
    with pytest.raises(ValueError, match="window_size"):
        R.get_config(FAM, "debug", window_size=(2, 2, 2, 3))
    with pytest.raises(ValueError, match="num_heads"):
        R.get_config(FAM, "debug", embed_dim=18, num_heads=(2, 4))
