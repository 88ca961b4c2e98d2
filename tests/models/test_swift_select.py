"""SimMIM token selection: the patch embedding projects only the visible tokens — same tokens, loss and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from neuro_models import registry as R
from neuro_models.swift.layers import PatchEmbed, gather_tokens
from neuro_models.swift.masking import make_mask, masked_tokens_per_sample, token_selection

V2 = dict(img_size=(24, 36, 48, 6))
REVISED = dict(img_size=(24, 24, 48, 8), window_size=(2, 2, 2, 4))


@pytest.mark.parametrize("family,overrides", [
    ("swift_v2", dict(V2, masking_type="random")),
    ("swift_v2", dict(V2, masking_type="tube", mask_ratio=0.5)),
    ("swift_v2", dict(V2, masking_type="temporal", mask_ratio=0.4)),
    ("swift_v2", dict(img_size=(24, 24, 48, 8), patch_size=(6, 6, 6, 2), mask_patch_size=(12, 12, 12, 4))),
    ("swift_v2_revised", REVISED),
])
def test_masked_count_is_static(family, overrides):
    cfg = R.get_config(family, "debug", **overrides)
    m = make_mask(cfg, 5, generator=torch.Generator().manual_seed(3))
    assert (m.reshape(5, -1).sum(1) == masked_tokens_per_sample(cfg)).all()


def test_token_selection_partitions_the_grid():
    cfg = R.get_config("swift_v2", "debug", **V2)
    mask = make_mask(cfg, 3, generator=torch.Generator().manual_seed(0))
    n = masked_tokens_per_sample(cfg)
    vis, msk = token_selection(mask, n)
    N = mask[0].numel()
    assert vis.shape == (3, N - n) and msk.shape == (3, n)
    flat = mask.reshape(3, -1)
    for b in range(3):
        assert flat[b, msk[b]].all() and not flat[b, vis[b]].any()
        assert (msk[b].diff() > 0).all() and (vis[b].diff() > 0).all()  # ascending: monotone gathers
        assert torch.equal(torch.sort(torch.cat([vis[b], msk[b]])).values, torch.arange(N))
    with pytest.raises(ValueError, match="num_masked"):
        token_selection(mask, N)


def test_gather_tokens_is_row_major_over_the_grid():
    t = torch.arange(2 * 2 * 3 * 2 * 2 * 5).reshape(2, 2, 3, 2, 2, 5)
    idx = torch.tensor([[0, 7, 23], [5, 6, 1]])
    out = gather_tokens(t, idx)
    for b in range(2):
        for k in range(3):
            x, rem = divmod(int(idx[b, k]), 3 * 2 * 2)
            y, rem = divmod(rem, 2 * 2)
            z, tt = divmod(rem, 2)
            assert torch.equal(out[b, k], t[b, x, y, z, tt])


def test_patch_embed_visible_only_equals_dense():
    torch.manual_seed(0)
    pe = PatchEmbed((6, 6, 6, 1), 1, 8).double()
    x = torch.randn(2, 1, 12, 18, 12, 3, dtype=torch.float64)
    mask = torch.rand(2, 2, 3, 2, 3) < 0.6
    n = int(mask[0].sum())
    # equal counts per sample: rebuild sample 1 with exactly n masked tokens
    flat = torch.zeros(mask[1].numel(), dtype=torch.bool)
    flat[torch.randperm(flat.numel())[:n]] = True
    mask[1] = flat.reshape(mask[1].shape)
    token = torch.randn(8, dtype=torch.float64, requires_grad=True)
    vis, _ = token_selection(mask, n)
    dense = pe(x, mask, token)
    sel = pe(x, mask, token, vis)
    torch.testing.assert_close(sel, dense, rtol=0, atol=1e-12)
    g = torch.randn_like(dense)
    gd = torch.autograd.grad(dense, [token, pe.proj.weight], g)
    gs = torch.autograd.grad(sel, [token, pe.proj.weight], g)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="mask_token"):
        pe(x, mask, None, vis)


CASES = [
    ("swift_v2", dict(V2, loss_type="l1"), True),
    ("swift_v2", dict(V2, loss_type="huber", huber_delta=0.5), False),
    ("swift_v2", dict(V2, masking_type="tube"), True),
    ("swift_v2", dict(img_size=(24, 24, 48, 8), patch_size=(6, 6, 6, 2), mask_patch_size=(12, 12, 12, 4),
                      last_layer_full_attention=False, window_size=(2, 2, 2, 2)), True),
    ("swift_v2_revised", dict(REVISED, loss_type="l2"), True),
]


@pytest.mark.parametrize("family,overrides,brain", CASES)
def test_selected_loss_and_gradients_equal_dense(family, overrides, brain):
    """float64: embedding only the visible tokens gives the same tokens, loss, prediction and gradients."""
    cfg = R.get_config(family, "debug", drop_path_rate=0.0, **overrides)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg).double()
    B = 2
    x = torch.randn(B, 1, *cfg.img_size, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    mask = model.make_mask(B, generator=g)
    bm = (torch.rand(B, *cfg.img_size[:3], generator=g) < 0.7) if brain else None
    outs, grads, rows = {}, {}, {}
    hook = model.encoder.patch_embed.proj.register_forward_hook(
        lambda m, inp, out: rows.__setitem__("n", inp[0].shape[-2]))
    for exact in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(x, brain_mask=bm, mask=mask, exact_mask=exact)
        out["loss"].backward()
        outs[exact], grads[exact] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
        rows[exact] = rows["n"]
    hook.remove()
    assert not outs[False]["token_selection"] and outs[True]["token_selection"]
    assert rows[True] == math.prod(cfg.grid) - model.num_masked  # only the visible patches were projected
    torch.testing.assert_close(outs[True]["loss"], outs[False]["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(outs[True]["pred"], outs[False]["pred"], rtol=1e-10, atol=1e-12)
    for n, gd in grads[False].items():
        torch.testing.assert_close(grads[True][n], gd, rtol=1e-9, atol=1e-14, msg=n)
    assert grads[True]["mask_token"].abs().sum() > 0  # the masked tokens' replacement still learns


def test_exact_mask_decides_the_path():
    cfg = R.get_config("swift_v2", "debug", **V2)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = torch.randn(2, 1, *cfg.img_size)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    assert model(x, mask=mask)["token_selection"]                   # CPU mask, exact count: checked, selected
    assert model(x)["token_selection"]                              # drawn here: exact by construction
    assert not model(x, mask=mask, exact_mask=False)["token_selection"]
    odd = mask.clone()
    odd[0].view(-1)[odd[0].view(-1).nonzero()[0]] = False           # one token fewer in sample 0
    out = model(x, mask=odd)
    assert not out["token_selection"]                               # wrong count: dense path, still correct
    dense = model(x, mask=odd, exact_mask=False)
    assert out["loss"].item() == pytest.approx(dense["loss"].item(), rel=1e-6)


def test_everything_masked_never_selects():
    cfg = R.get_config("swift_v2", "debug", img_size=(24, 24, 24, 4), mask_patch_size=(24, 24, 24, 4),
                       last_layer_full_attention=False, window_size=(2, 2, 2, 2))
    model = R.build_pretrain_model(cfg)
    assert model.num_masked == 4 * 4 * 4 * 4  # one cell: it is masked
    out = model(torch.randn(1, 1, *cfg.img_size), exact_mask=True)
    assert not out["token_selection"] and torch.isfinite(out["loss"])
    f = R.flops_per_sample(cfg)
    assert f["forward_selected"] == f["forward"] and f["train_selected"] == f["train"]


def test_compiled_patch_embed_selection_under_bf16_autocast():
    """Regression: Inductor miscompiled index_put into an expanded dtype cast of the mask token (bf16 autocast
    only; the whole SimMIM loss was off by 1e-2 and its gradients by 100% on H100). Compiled must equal eager."""
    torch.manual_seed(0)
    pe = PatchEmbed((6, 6, 6, 1), 1, 8)
    x = torch.randn(2, 1, 12, 18, 12, 3)
    mask = torch.zeros(2, 36, dtype=torch.bool)
    for b in range(2):
        mask[b, torch.randperm(36)[:20]] = True
    mask = mask.reshape(2, 2, 3, 2, 3)
    token = torch.randn(8, requires_grad=True)
    vis, _ = token_selection(mask, 20)
    compiled = torch.compile(pe, dynamic=False)
    outs, grads = [], []
    for net in (pe, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, mask, token, vis)
        g = torch.autograd.grad(y.float().square().sum(), [token, pe.proj.weight])
        outs.append(y.float())
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("masking_type", ["random", "tube", "temporal"])
def test_make_mask_equals_the_cell_masks_repeated_per_axis(masking_type):
    """make_mask's one broadcast copy equals repeat_interleave of the cell mask along every axis (the
    definition), cell by cell: the loader makes one mask per sample, so its speed is the loader's."""
    from neuro_models.swift.masking import _cells, make_mask

    cfg = R.get_config("swift_v2", "51M", patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 4),
                       mask_patch_size=(12, 12, 12, 2), masking_type=masking_type)
    cell, counts = _cells(cfg)
    m = make_mask(cfg, 3, generator=torch.Generator().manual_seed(7))
    cells = m[:, ::cell[0], ::cell[1], ::cell[2], ::cell[3]]
    assert tuple(cells.shape[1:]) == tuple(counts)
    ref = cells
    for ax, c in enumerate(cell, start=1):
        ref = ref.repeat_interleave(c, dim=ax)
    assert torch.equal(m, ref) and m.dtype == torch.bool
    assert torch.equal(m, make_mask(cfg, 3, generator=torch.Generator().manual_seed(7)))
