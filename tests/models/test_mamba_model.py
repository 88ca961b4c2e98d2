"""NeuroMamba model: sizes, FLOPs, packing without leaks, objective, heads, muP, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from neuro_models import registry as R
from neuro_models.flops import measure_flops
from neuro_models.mamba.config import EXPECTED_ENCODER_PARAMS
from neuro_models.mamba.family import flops_per_sample, forward_flops_per_token
from neuro_models.mamba.tokens import keep_tokens

IMG = (12, 18, 24, 6)  # grid (2, 3, 4, 3): 72 tokens


def _cfg(**kw):
    kw.setdefault("img_size", IMG)
    return R.get_config("neuromamba", "debug", **kw)


def _batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, *IMG, generator=g)
    m = torch.zeros(B, *IMG[:3], dtype=torch.bool)
    m[0, 2:9, 3:10, 4:15] = True
    if B > 1:
        m[1, 7:12, 1:16, 13:24] = True
    return x, m


def _nparams(module):
    return sum(p.numel() for p in module.parameters())


# documented encoder parameter counts of the named sizes (patch 6x6x6x2, one channel, d_state 16)
DOCUMENTED = {"debug": 33_792, "1.4M": 1_454_848, "3.1M": 3_103_872, "12M": 11_737_344,
              "41M": 40_907_776, "91M": 90_852_864, "320M": 320_473_088}


def test_size_ladder_counts():
    assert R.list_sizes("neuromamba") == list(DOCUMENTED)
    assert EXPECTED_ENCODER_PARAMS == DOCUMENTED
    for name, expect in DOCUMENTED.items():
        cfg = R.get_config("neuromamba", name)
        with torch.device("meta"):
            model = R.build_pretrain_model(cfg)
        assert _nparams(model.encoder) == expect, name
        counts = R.param_counts(cfg)
        assert counts["encoder"] == expect
        assert counts["total"] == _nparams(model)
        assert counts["decoder"] == _nparams(model.head)
        assert counts["non_embedding"] == sum(_nparams(b) for b in model.encoder.blocks) + _nparams(model.encoder.norm_f)
        if name != "debug":  # names round the encoder count (the seed's "1.4M" counts its 1.40M blocks)
            nominal = float(name[:-1]) * 1e6
            assert abs(expect - nominal) / nominal < 0.04, name
    # the seed's two models: "small" embed 128 and best 3.1M, both 12 blocks
    assert R.get_config("neuromamba", "1.4M").embed_dim == 128
    assert R.param_counts(R.get_config("neuromamba", "1.4M"))["non_embedding"] == 1_399_424
    assert R.get_config("neuromamba", "3.1M").depth == 12


def test_mamba2_counts():
    cfg = R.get_config("neuromamba", "3.1M", mixer="mamba2", headdim=32, d_state=64)
    with torch.device("meta"):
        model = R.build_pretrain_model(cfg)
    counts = R.param_counts(cfg)
    assert counts["encoder"] == _nparams(model.encoder)
    assert counts["total"] == _nparams(model)
    blk = model.encoder.blocks[0].mixer
    assert blk.nheads == 12 and blk.in_proj.out_features == 2 * 384 + 2 * 64 + 12


def test_real_build_matches_count_for_seed_size():
    model = R.build_pretrain_model(R.get_config("neuromamba", "3.1M"))
    assert _nparams(model.encoder) == 3_103_872


MIXERS = [dict(mixer="mamba1"), dict(mixer="mamba2", headdim=16)]


@pytest.mark.parametrize("mixer", MIXERS, ids=["mamba1", "mamba2"])
@pytest.mark.parametrize("remove", [True, False])
def test_dense_flops_match_flop_counter(remove, mixer):
    cfg = _cfg(remove_background=remove, **mixer)
    model = R.build_pretrain_model(cfg)
    x, m = _batch()
    packed = model.encoder.tokenize(x, m)
    rows, length = packed.valid_RL.shape
    counted = measure_flops(lambda: model(x, brain_mask=m))
    per_tok = forward_flops_per_token(cfg)
    head = 2 * cfg.embed_dim * cfg.patch_dim
    # the backbone runs on every packed position; the head on all but the last of each row
    expect = (per_tok["dense"] - head) * rows * length + head * rows * (length - 1)
    assert counted == expect
    # the Mamba-1 scan count is the documented elementwise formula, 7 E S + 5 E per block
    E, S = cfg.d_inner, cfg.d_state
    if cfg.mixer == "mamba1":
        assert per_tok["scan"] == cfg.depth * (7 * E * S + 5 * E)
    fwd = flops_per_sample(cfg, num_tokens=100)
    assert fwd["forward"] == per_tok["total"] * 100 and fwd["train"] == 3 * fwd["forward"]


def test_background_removal_counts_tokens_and_flops():
    cfg = _cfg()
    model = R.build_pretrain_model(cfg)
    x, m = _batch()
    kept = int(keep_tokens(m, IMG, cfg.patch_size).sum())
    out = model(x, brain_mask=m)
    assert out["num_tokens"] == kept
    model.remove_background = False
    full = model(x, brain_mask=m)
    assert full["num_tokens"] == 2 * R.tokens_per_sample(cfg) == 144
    assert math.isclose(out["flops_forward"] / full["flops_forward"], kept / 144)
    assert R.tokens_per_sample(R.get_config("neuromamba", "3.1M")) == 16 * 16 * 16 * 10
    on = R.flops_per_sample(R.get_config("neuromamba", "3.1M"))["forward"]
    off = R.flops_per_sample(R.get_config("neuromamba", "3.1M", remove_background=False))["forward"]
    assert math.isclose(on / off, 0.364)


@pytest.mark.parametrize("mixer", MIXERS, ids=["mamba1", "mamba2"])
def test_packed_samples_do_not_leak_state(mixer):
    torch.manual_seed(0)
    cfg = _cfg(depth=2, **mixer)
    enc = R.build_pretrain_model(cfg).encoder.eval()
    x, m = _batch(B=3)
    m[2] = m[0]
    both = enc(x, m)
    for b in range(3):
        alone = enc(x[b:b + 1], m[b:b + 1])
        assert torch.allclose(both[b], alone[0], atol=1e-5, rtol=0), b
    # perturbing sample 0 changes nothing of samples 1 and 2 (they come after it in the packed row)
    x2 = x.clone()
    x2[0] += 3.0
    both2 = enc(x2, m)
    assert torch.equal(both2[1:], both[1:])
    assert not torch.allclose(both2[0], both[0])


def test_loss_ignores_removed_patches_and_positions_matter():
    torch.manual_seed(0)
    model = R.build_pretrain_model(_cfg()).eval()
    x, m = _batch(B=1)
    keep = keep_tokens(m, IMG, (6, 6, 6, 2))[0]
    assert 0 < keep.sum() < keep.numel()
    base = model(x, brain_mask=m)["loss"]
    x2 = x.clone()
    bg = torch.ones(IMG[:3], dtype=torch.bool)
    bg[0:12, 0:12, 0:18] = False  # spatial patches that hold brain voxels
    x2[0, 0][bg] += 7.0          # change voxels of removed (all-background) patches only
    assert torch.equal(model(x2, brain_mask=m)["loss"], base)
    # without removal, the same change reaches the backbone
    model.remove_background = False
    assert not torch.equal(model(x2, brain_mask=m)["loss"], model(x, brain_mask=m)["loss"])


@pytest.mark.parametrize("mixer", MIXERS, ids=["mamba1", "mamba2"])
def test_loss_falls_on_fixed_batch(mixer):
    torch.manual_seed(0)
    cfg = _cfg(depth=2, **mixer)
    model = R.build_pretrain_model(cfg)
    x, m = _batch()
    # a learnable signal: smooth in time, so the next patch is predictable
    t = torch.linspace(0, 1, IMG[3])
    x = x * 0.1 + torch.sin(6 * t)[None, None, None, None, None, :]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(x, brain_mask=m)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("time_order", ["slowest", "fastest"])
def test_both_time_orders_run_and_differ(time_order):
    torch.manual_seed(0)
    cfg = _cfg(time_order=time_order)
    model = R.build_pretrain_model(cfg)
    x, m = _batch()
    out = model(x, brain_mask=m)
    assert torch.isfinite(out["loss"])
    assert out["num_tokens"] == int(keep_tokens(m, IMG, cfg.patch_size).sum())


def test_make_mask_is_none_and_mask_rejected():
    model = R.build_pretrain_model(_cfg())
    assert model.make_mask(4, generator=torch.Generator()) is None
    x, m = _batch()
    with pytest.raises(ValueError, match="mask must be None"):
        model(x, brain_mask=m, mask=torch.zeros(2, 72, dtype=torch.bool))


def test_bad_inputs_raise_clear_errors():
    model = R.build_pretrain_model(_cfg())
    x, m = _batch()
    with pytest.raises(ValueError, match="brain_mask must have shape"):
        model(x, brain_mask=m[:, :, :, :-1])
    with pytest.raises(ValueError, match="brain_mask must have shape"):
        model(x, brain_mask=m[:1])
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[..., :-2], brain_mask=m)
    m0 = m.clone()
    m0[1] = False
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] has no brain voxel"):
        model(x, brain_mask=m0)
    # no mask: every token is kept and the loss counts every voxel (documented behaviour)
    assert model(x)["num_tokens"] == 144


def test_bad_config_raises():
    for kw, field in ((dict(time_order="diagonal"), "time_order"), (dict(loss="huber"), "loss"),
                      (dict(embed_dim=36), "embed_dim"), (dict(scan_impl="cuda"), "scan_impl"),
                      (dict(parametrization="ntk"), "parametrization"), (dict(mixer="mamba3"), "mixer"),
                      (dict(mixer="mamba2", headdim=24), "headdim"), (dict(img_size=(13, 18, 24, 6)), "divisible")):
        with pytest.raises(ValueError, match=field):
            _cfg(**kw)
    with pytest.raises(ValueError, match="unknown NeuroMamba config field"):
        _cfg(width=3)
    with pytest.raises(ValueError, match="size="):
        R.get_config("neuromamba", "7B")


def test_downstream_model():
    torch.manual_seed(0)
    cfg = _cfg()
    model = R.build_downstream_model(cfg, task="regression", num_outputs=3, hidden_dim=16)
    x, m = _batch()
    y = model(x, brain_mask=m)
    assert y.shape == (2, 3)
    last = {id(p) for p in model.last_block_parameters()}
    assert {id(p) for p in model.encoder.blocks[-1].parameters()} <= last
    assert {id(p) for p in model.head.parameters()} <= last
    assert not {id(p) for p in model.encoder.blocks[0].parameters()} & last
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    y.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(ValueError, match="task"):
        R.build_downstream_model(cfg, task="segmentation")


def test_mup_build_and_with_width():
    import mup

    from neuro_models.mup_utils import has_base_shapes, make_optimizer

    cfg = _cfg(parametrization="mup", mup_base_width=32)
    wide = R.with_width(cfg, 64)
    assert wide.embed_dim == 64 and wide.rank == 4 and wide.depth == cfg.depth
    model = R.build_pretrain_model(wide)
    assert has_base_shapes(model)
    assert isinstance(model.head, mup.MuReadout)
    assert model.head.weight.infshape.width_mult() == 2.0
    # matrix-like hidden weights scale, vector-like ones (patch embedding, A_log) do not
    mixer = model.encoder.blocks[0].mixer
    assert mixer.in_proj.weight.infshape.ninf() == 2
    assert model.encoder.patch_embed.weight.infshape.ninf() == 1
    assert mixer.A_log.infshape.ninf() == 1
    opt = make_optimizer(model, "mup", lr=1e-3)
    x, m = _batch()
    model(x, brain_mask=m)["loss"].backward()
    opt.step()
    down = R.build_downstream_model(wide, task="classification")
    assert has_base_shapes(down)


def test_mup_coordinate_check_is_flat_where_sp_grows():
    """After a few steps at a fixed LR, a hidden block output keeps its scale across widths under muP
    but grows with width under SP (Tensor Programs V's coordinate check)."""
    from neuro_models.mup_utils import coord_check

    img = (12, 12, 12, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *img, generator=g)
    m = torch.zeros(2, *img[:3], dtype=torch.bool)
    m[:, 2:10, 2:10, 2:10] = True
    name = "encoder.blocks.1.mixer.out_proj"
    ratio = {}
    for par in ("sp", "mup"):
        def make(w, par=par):
            return R.build_pretrain_model(R.get_config("neuromamba", "debug", img_size=img, parametrization=par,
                                                       mup_base_width=32, embed_dim=w))
        res = coord_check(make, [32, 256], (x, m), lambda mod, b: mod(b[0], brain_mask=b[1])["loss"],
                          parametrization=par, lr=1e-2, steps=4, module_filter=lambda n, mod: n == name)
        ratio[par] = res[256][-1][name] / res[32][-1][name]
    assert ratio["sp"] > 3.0, ratio
    assert 0.5 < ratio["mup"] < 2.0, ratio
