"""SwiFT v2 (4D Swin + SimMIM): layers, attention reference, masks, loss, training, config errors."""
from __future__ import annotations

import math

import pytest
import torch

from neuro_models import registry as R
from neuro_models.swift import config as C
from neuro_models.swift.layers import shifted_window_mask, window_partition, window_reverse
from neuro_models.swift.masking import make_mask, num_masked_cells
from neuro_models.swift.model import WindowBlock4D, reconstruction_loss

FAM = "swift_v2"


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# window partition
# ---------------------------------------------------------------------------------------------
def test_window_partition_round_trip_and_content():
    x = _x((2, 4, 6, 8, 10, 3))
    win = (2, 3, 4, 5)
    w = window_partition(x, win)
    n_windows = 2 * 2 * 2 * 2
    assert w.shape == (2 * n_windows, 2 * 3 * 4 * 5, 3)
    torch.testing.assert_close(window_reverse(w, win, (4, 6, 8, 10)), x, rtol=0, atol=0)
    # window 0 of sample 0 is the corner box, row-major over (x, y, z, t)
    torch.testing.assert_close(w[0], x[0, :2, :3, :4, :5].reshape(-1, 3), rtol=0, atol=0)
    # the second window steps along t (the last window axis)
    torch.testing.assert_close(w[1], x[0, :2, :3, :4, 5:10].reshape(-1, 3), rtol=0, atol=0)
    # the first window of sample 1 follows all windows of sample 0
    torch.testing.assert_close(w[n_windows], x[1, :2, :3, :4, :5].reshape(-1, 3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# shifted-window attention == brute-force masked full attention (float64)
# ---------------------------------------------------------------------------------------------
def _brute_force_block(blk: WindowBlock4D, x: torch.Tensor, window, shift) -> torch.Tensor:
    """Reference: full attention over each sample with Swin's region mask in original coordinates.

    With a cyclic shift s, windows in original coordinates are [s + k w, s + (k+1) w), and the
    wrapped part [0, s) is a separate region, i.e. window id = floor((p - s) / w).
    """
    B, X, Y, Z, T, D = x.shape
    H, E = blk.attn.num_heads, blk.attn.head_dim
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in (X, Y, Z, T)], indexing="ij"), -1).reshape(-1, 4)
    wid = torch.stack([torch.div(coords[:, a] - shift[a], window[a], rounding_mode="floor") for a in range(4)], -1)
    allowed = (wid[:, None, :] == wid[None, :, :]).all(-1)  # [L, L]
    h = torch.nn.functional.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias).reshape(B, -1, D)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.reshape(B, -1, 3, H, E).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-1, -2)) * blk.attn.scale
    s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = (s @ v).transpose(1, 2).reshape(B, -1, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    y = x + o.reshape(x.shape)
    return y + blk.mlp(torch.nn.functional.layer_norm(y, (D,), blk.norm2.weight, blk.norm2.bias))


@pytest.mark.parametrize("shifted,shift_impl,window", [
    (False, "mask", (2, 3, 2, 2)), (True, "mask", (2, 3, 2, 2)),
    (True, "split", (2, 2, 2, 2)),  # every shifted axis has shift = window / 2: mask-free path
    (True, "split", (2, 3, 2, 2)),  # y has an odd window: falls back to the mask
])
def test_shifted_window_attention_matches_brute_force(shifted, shift_impl, window):
    torch.manual_seed(0)
    dims = (4, 6, 2, 4)  # z: map == window -> clipped and never shifted
    blk = WindowBlock4D(8, 2, window, shifted=shifted, mlp_ratio=2.0, qkv_bias=True, drop_path=0.0,
                        scale=8 ** -0.5 * 2 ** 0.5, shift_impl=shift_impl).double().eval()
    x = torch.randn(2, *dims, 8, dtype=torch.float64)
    shift = tuple(w // 2 if g > w else 0 for g, w in zip(dims, window)) if shifted else (0, 0, 0, 0)
    ref = _brute_force_block(blk, x, window, shift)
    torch.testing.assert_close(blk(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["swift_v2", "swift_v2_revised"])
def test_split_and_mask_shift_impls_agree(family):
    cfg = R.get_config(family, "debug", img_size=(48, 24, 24, 8), window_size=(4, 2, 2, 4))
    x = _x((2, 1, 48, 24, 24, 8))
    losses = []
    for impl in ("mask", "split"):
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg.replace(shift_impl=impl)).double()
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
        out = model(x.double(), mask=mask)
        out["loss"].backward()
        losses.append((out["pred"], model.encoder.patch_embed.proj.weight.grad))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-9, atol=1e-9)


def test_shifted_mask_regions():
    m = shifted_window_mask((4,), (2,), (1,))
    # rolled by -1: windows [1,2], [3,0]; the last one splits into regions {3} and {0}
    assert m.shape == (2, 2, 2)
    assert m[0].all() and m[1].diagonal().all() and not m[1][0, 1] and not m[1][1, 0]
    assert shifted_window_mask((4,), (2,), (0,)) is None


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masking_type", ["random", "tube", "temporal"])
def test_mask_ratio_exact_and_deterministic(masking_type):
    cfg = R.get_config(FAM, "debug", img_size=(24, 36, 48, 8), masking_type=masking_type, mask_ratio=0.6)
    assert cfg.grid == (4, 6, 8, 8)
    cell = (2, 2, 2, 2)
    counts = (2, 3, 4, 4)
    g = torch.Generator().manual_seed(3)
    m = make_mask(cfg, 3, generator=g)
    assert m.shape == (3, 4, 6, 8, 8) and m.dtype == torch.bool
    if masking_type == "random":
        n_cells = math.prod(counts)
    elif masking_type == "tube":
        n_cells = math.prod(counts[:3])
    else:
        n_cells = counts[3]
    n_masked = num_masked_cells(n_cells, 0.6)
    assert n_masked == round(0.6 * n_cells)
    for b in range(3):  # exactly n_masked cells of 2x2x2x2 tokens (x whole-axis repeats for tube/temporal)
        assert int(m[b].sum()) * n_cells == n_masked * m[b].numel()
    # cells are uniform blocks of mask_patch_size / patch_size tokens
    blocks = m.reshape(3, 2, 2, 3, 2, 4, 2, 4, 2).permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(3, -1, 16)
    assert bool(((blocks.all(-1)) | (~blocks.any(-1))).all())
    if masking_type == "tube":
        assert bool((m == m[..., :1]).all())
        assert 0 < m[..., 0].float().mean() < 1
    if masking_type == "temporal":
        frames = m.reshape(3, -1, 8)
        assert bool(((frames.all(1)) | (~frames.any(1))).all())
    # deterministic given the generator, and per-sample consistent
    a = make_mask(cfg, 2, generator=torch.Generator().manual_seed(7))
    g2 = torch.Generator().manual_seed(7)
    b = torch.cat([make_mask(cfg, 1, generator=g2), make_mask(cfg, 1, generator=g2)])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) or masking_type == "temporal"


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_mim_loss_ignores_unmasked_and_non_brain_voxels(loss_type):
    cfg = R.get_config(FAM, "debug", img_size=(24, 36, 48, 6), loss_type=loss_type)
    x = _x((2, 1, 24, 36, 48, 6))
    pred = _x((2, 4, 6, 8, 6, 216), seed=1).requires_grad_(True)
    mask = make_mask(cfg, 2, generator=torch.Generator().manual_seed(0))
    brain = torch.zeros(2, 24, 36, 48, dtype=torch.bool)
    brain[:, 3:20, 5:30, 7:40] = True
    loss = reconstruction_loss(cfg, pred, x, mask, brain)
    # change the target at unmasked tokens and outside the brain: the loss must not move
    vox_mask = mask.repeat_interleave(6, 1).repeat_interleave(6, 2).repeat_interleave(6, 3)[:, None]
    x2 = x.clone()
    x2[~vox_mask.expand_as(x)] += 5.0
    x2[~brain[:, None, ..., None].expand_as(x)] -= 3.0
    torch.testing.assert_close(reconstruction_loss(cfg, pred, x2, mask, brain), loss, rtol=0, atol=0)
    loss.backward()
    assert pred.grad[~mask].abs().max() == 0
    assert pred.grad[mask].abs().max() > 0
    # reference value in float64 for l1
    if loss_type == "l1":
        tgt = x.reshape(2, 1, 4, 6, 6, 6, 8, 6, 6, 1).permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9).reshape(2, 4, 6, 8, 6, 216)
        bm = brain.reshape(2, 4, 6, 6, 6, 8, 6).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 4, 6, 8, 1, 216)
        w = (mask[..., None] & bm).double()
        ref = ((pred.double() - tgt.double()).abs() * w).sum() / w.sum()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# model forward / backward / training
# ---------------------------------------------------------------------------------------------
def test_debug_forward_backward_distinct_axes():
    cfg = R.get_config(FAM, "debug", img_size=(24, 36, 48, 6))
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = _x((2, 1, 24, 36, 48, 6))
    brain = torch.ones(2, 24, 36, 48, dtype=torch.bool)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    out = model(x, brain_mask=brain, mask=mask)
    assert out["pred"].shape == (2, 4, 6, 8, 6, 216) and out["token_selection"]
    assert out["num_tokens"] == 2 * 4 * 6 * 8 * 6 == 2 * R.tokens_per_sample(cfg)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    feats = model.encoder(x)
    assert feats.shape == (2, 2, 3, 4, 6, 32)


def test_default_mask_follows_global_seed():
    cfg = R.get_config(FAM, "debug")
    model = R.build_pretrain_model(cfg).eval()
    x = _x((1, 1, 24, 24, 24, 4))
    torch.manual_seed(5)
    a = model(x)["mask"]
    torch.manual_seed(5)
    b = model(x)["mask"]
    assert torch.equal(a, b)


def smooth_batch():
    """Two smooth 4D signals (learnable from context), shape [2, 1, 24, 24, 24, 4]."""
    g = torch.meshgrid(*[torch.linspace(0, 1, n) for n in (24, 24, 24, 4)], indexing="ij")
    x = torch.stack([torch.sin(6 * g[0] + 2 * g[3]) + torch.cos(5 * g[1] - 3 * g[2]),
                     torch.sin(4 * g[2] + g[0] - 2 * g[3])])
    return x[:, None]


@pytest.mark.parametrize("family,factor", [("swift_v2", 0.93), ("swift_v2_revised", 0.97)])
def test_few_steps_reduce_loss_on_fixed_batch(family, factor):
    cfg = R.get_config(family, "debug")
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = smooth_batch()
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(x, mask=mask)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


def test_activation_checkpointing_same_gradients():
    cfg = R.get_config(FAM, "debug")
    x = _x((2, 1, 24, 24, 24, 4))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg.replace(use_checkpoint=ckpt))
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
        model(x, mask=mask)["loss"].backward()
        grads.append(model.encoder.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("task,n_out", [("classification", 3), ("regression", 1)])
def test_downstream_model_and_prompts(task, n_out):
    cfg = R.get_config(FAM, "debug", img_size=(24, 36, 48, 6))
    torch.manual_seed(0)
    x = _x((2, 1, 24, 36, 48, 6))
    plain = R.build_downstream_model(cfg, task=task, num_outputs=n_out)
    y = plain(x)
    assert y.shape == (2, n_out)
    last = {id(p) for p in plain.last_block_parameters()}
    assert {id(p) for p in plain.head.parameters()} <= last
    assert {id(p) for p in plain.encoder.stages[-1].blocks[-1].parameters()} <= last
    assert id(plain.encoder.patch_embed.proj.weight) not in last
    prompted = R.build_downstream_model(cfg, task=task, num_outputs=n_out, prompt_tokens=3)
    prompted.load_state_dict({**plain.state_dict(), "prompts": prompted.prompts.data}, strict=True)
    for p in prompted.encoder.parameters():
        p.requires_grad_(False)
    out = prompted(x)
    assert out.shape == (2, n_out)
    assert not torch.allclose(out, y)  # prompts change the features
    out.sum().backward()
    assert prompted.prompts.grad is not None and prompted.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in prompted.encoder.parameters())


# ---------------------------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,field", [
    (dict(window_size=(8, 2, 2, 2)), "window_size"),
    (dict(window_size=(3, 2, 2, 2)), "window_size"),
    (dict(img_size=(25, 24, 24, 4)), "patch_size"),
    (dict(patch_size=(5, 6, 6, 1)), "patch_size"),
    (dict(num_heads=(3, 2)), "num_heads"),
    (dict(num_heads=(1, 2, 4)), "num_heads"),
    (dict(masking_type="blocks"), "masking_type"),
    (dict(mask_patch_size=(9, 12, 12, 2)), "mask_patch_size"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(loss_type="mse"), "loss_type"),
    (dict(shift_impl="roll"), "shift_impl"),
    (dict(attn_impl="cudnn"), "attn_impl"),
    (dict(parametrization="ntk"), "parametrization"),
    (dict(depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), "depths"),
])
def test_bad_config_raises_value_error(overrides, field):
    with pytest.raises(ValueError, match=field):
        R.get_config(FAM, "debug", **overrides)


def test_registry_errors_and_width():
    with pytest.raises(ValueError, match="size"):
        R.get_config(FAM, "7B")
    cfg = R.get_config(FAM, "51M")
    w = R.with_width(cfg, 192)
    assert w.embed_dim == 192 and w.num_heads == (12, 24, 48, 96)
    with pytest.raises(ValueError, match="width"):
        R.with_width(cfg, 100)
    with pytest.raises(ValueError, match="prompt_tokens"):
        R.build_downstream_model(R.get_config(FAM, "debug", last_layer_full_attention=False,
                                              img_size=(24, 24, 24, 4)), task="regression", prompt_tokens=2)
    assert C.stage_window((2, 8, 4, 10), (4, 4, 4, 5)) == ((2, 4, 4, 5), (0, 2, 0, 2))


@pytest.mark.parametrize("exact_mask", [None, True])
@pytest.mark.parametrize("family", ["swift_v2", pytest.param("swift_v2_revised", marks=pytest.mark.slow)])
def test_no_graph_breaks_under_torch_compile(family, exact_mask):
    """The whole pre-training forward traces into one dynamo graph (torch.compile-friendly), with and
    without token selection (``None``: the mask's count is not checked inside a trace: dense path)."""
    cfg = R.get_config(family, "debug")
    model = R.build_pretrain_model(cfg)
    x = _x((2, 1, 24, 24, 24, 4))
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(x, mask=mask, exact_mask=exact_mask)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
