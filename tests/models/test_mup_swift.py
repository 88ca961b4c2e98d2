"""muP for SwiFT: base shapes, MuReadout, MuAdamW, equality with SP at base width, save/load, coord check."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("mup")
from mup import MuReadout  # noqa: E402

from neuro_models import registry as R  # noqa: E402
from neuro_models.mup_utils import coord_check, has_base_shapes, load_mup_state_dict, make_optimizer  # noqa: E402

X = torch.randn(2, 1, 24, 24, 24, 4, generator=torch.Generator().manual_seed(0))


def _cfg(par, width=None, family="swift_v2"):
    cfg = R.get_config(family, "debug", parametrization=par)
    return R.with_width(cfg, width) if width else cfg


@pytest.mark.parametrize("family", ["swift_v2", "swift_v2_revised"])
def test_mup_model_has_base_shapes_and_readouts(family):
    cfg = _cfg("mup", 64, family)
    model = R.build_pretrain_model(cfg)
    assert has_base_shapes(model)
    readouts = [m for m in model.modules() if isinstance(m, MuReadout)]
    assert len(readouts) == 1 and readouts[0].width_mult() == pytest.approx(64 / cfg.mup_base_width)
    head = R.build_downstream_model(cfg, task="classification", num_outputs=2)
    assert has_base_shapes(head) and isinstance(head.head.net[-1], MuReadout)
    opt = make_optimizer(model, "mup", lr=1e-2)
    lrs = {g["lr"] for g in opt.param_groups}
    assert 1e-2 in lrs and any(lr == pytest.approx(1e-2 * 16 / 64) for lr in lrs)  # hidden matrices: lr / width_mult
    # the stage-1 qkv weight (fan_in 128 vs base 32) is in a group with lr / 4
    blk = model.encoder.stages[1].blocks[0]
    qkv = (blk.attn if family == "swift_v2" else blk.attn_s).qkv.weight
    group = next(g for g in opt.param_groups if any(p is qkv for p in g["params"]))
    assert group["lr"] == pytest.approx(1e-2 / 4)
    assert isinstance(make_optimizer(R.build_pretrain_model(_cfg("sp", 64, family)), "sp", lr=1e-2), torch.optim.AdamW)


def test_mup_equals_sp_at_base_width():
    outs = []
    for par in ("sp", "mup"):
        torch.manual_seed(0)
        model = R.build_pretrain_model(_cfg(par, 16)).eval()
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
        outs.append(model(X, mask=mask)["loss"])
    torch.testing.assert_close(outs[0], outs[1])


def test_attention_scale_is_one_over_d_under_mup():
    from neuro_models.mup_utils import attention_scale

    assert attention_scale(64, "sp") == pytest.approx(1 / 8)
    assert attention_scale(64, "mup", base_head_dim=16) == pytest.approx(4 / 64)
    assert attention_scale(16, "mup", base_head_dim=16) == attention_scale(16, "sp")
    with pytest.raises(ValueError, match="parametrization"):
        attention_scale(16, "ntk")


def test_save_load_keeps_shapes_via_rebuild():
    cfg = _cfg("mup", 32)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg).eval()
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    ref = model(X, mask=mask)["loss"]
    # pitfall: a plain rebuild in SP (or load into a module built without base shapes) loses infshape
    plain = R.build_pretrain_model(cfg.replace(parametrization="sp"))
    plain.load_state_dict(model.state_dict())
    assert not has_base_shapes(plain)
    with pytest.raises(ValueError, match="infshape"):
        make_optimizer(plain, "mup", lr=1e-3)
    # the safe way: rebuild from the config (sets base shapes) and load; compiled/DDP prefixes are stripped
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    restored = load_mup_state_dict(lambda: R.build_pretrain_model(cfg), sd).eval()
    assert has_base_shapes(restored)
    torch.testing.assert_close(restored(X, mask=mask)["loss"], ref)
    make_optimizer(restored, "mup", lr=1e-3)


def _coord_stats(par):
    def make(width):
        return R.build_pretrain_model(_cfg(par, width))

    mask = make(16).make_mask(2, generator=torch.Generator().manual_seed(1))
    names = ("encoder.stages.0.blocks.0.mlp.fc2", "encoder.stages.0.blocks.0.attn.proj", "encoder.merges.0",
             "encoder.stages.1.blocks.0.mlp.fc2", "encoder.stages.1.blocks.0.attn.proj")
    res = coord_check(make, [16, 32, 64, 128], X, lambda m, b: m(b, mask=mask)["loss"], parametrization=par,
                      lr=1e-2, steps=4, module_filter=lambda n, m: n in names)
    # mean |activation| after 3 updates, per width, averaged (geometric) over the hidden modules
    return [math.exp(sum(math.log(res[w][-1][n]) for n in names) / len(names)) for w in (16, 32, 64, 128)]


def test_coordinate_check_flat_under_mup_drifts_under_sp():
    mup_scales = _coord_stats("mup")
    sp_scales = _coord_stats("sp")
    assert max(mup_scales) / min(mup_scales) < 1.5, mup_scales
    assert sp_scales[-1] / sp_scales[0] > 3.0, sp_scales
    assert all(b > a for a, b in zip(sp_scales, sp_scales[1:])), sp_scales  # grows with width under SP
