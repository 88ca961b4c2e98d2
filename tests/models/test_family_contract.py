"""Every registered family satisfies the ModelFamily contract (neuro_models/family.py) at its debug size, on CPU.

A new family passes this file before anything above neuro_models uses it: fields present and callable, counts and
FLOPs positive, the pre-training model builds and returns a finite loss, the downstream model and each fine-tuning
hook do what the engine relies on.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from neuro_models import registry as R
from neuro_models.family import COMMON_CONFIG_FIELDS, FinetuneHooks, ModelFamily

FAMILIES = R.list_families()
#: input-size overrides where a family's debug size keeps the ladder's input (NeuroMamba's debug is 96^3 x 20,
#: where its FLOP conventions are documented); a family whose debug size is CPU-sized needs no entry
SMALL_INPUT = {"neuromamba": {"img_size": (12, 12, 18, 4)}}


def _debug(fam: ModelFamily):
    return fam.get_config("debug", **SMALL_INPUT.get(fam.name, {}))


@pytest.fixture(params=FAMILIES)
def fam(request) -> ModelFamily:
    return R.get_family(request.param)


def _x(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=g)


def test_registry_lines_name_their_family():
    assert FAMILIES == sorted(R.FAMILIES) and len(FAMILIES) >= 3
    for name in FAMILIES:
        fam = R.get_family(name)
        assert isinstance(fam, ModelFamily) and fam.name == name
    with pytest.raises(ValueError, match="allowed"):
        R.get_family("nope")


def test_every_field_present_and_callable(fam):
    for f in dataclasses.fields(ModelFamily):
        assert getattr(fam, f.name) is not None or f.name in ("make_mask", "cuda_graph_regions"), f.name
    for name in ("get_config", "with_width", "build_pretrain_model", "build_downstream_model", "param_counts",
                 "flops_per_sample", "tokens_per_sample"):
        assert callable(getattr(fam, name)), name
    assert fam.make_mask is None or callable(fam.make_mask)
    assert fam.cuda_graph_regions is None or callable(fam.cuda_graph_regions)
    assert isinstance(fam.finetune, FinetuneHooks)
    for f in dataclasses.fields(FinetuneHooks):
        assert callable(getattr(fam.finetune, f.name)), f.name
    fields = {f.name for f in dataclasses.fields(fam.config_class)}
    assert set(COMMON_CONFIG_FIELDS) <= fields
    assert fam.arch_fields[0] == "family" and set(fam.arch_fields) <= fields


def test_sizes_configs_and_width(fam):
    assert list(fam.sizes)[0] == "debug" and R.list_sizes(fam.name) == list(fam.sizes)
    for size, cfg in fam.sizes.items():
        assert isinstance(cfg, fam.config_class) and cfg.family == fam.name, size
    cfg = fam.get_config("debug")
    assert cfg == fam.sizes["debug"] == R.get_config(fam.name, "debug")
    assert fam.get_config("debug", drop_path_rate=0.1).drop_path_rate == 0.1
    wide = fam.with_width(cfg, 2 * cfg.embed_dim)
    assert isinstance(wide, fam.config_class) and wide.embed_dim == 2 * cfg.embed_dim
    with pytest.raises((ValueError, TypeError)):
        fam.get_config("debug", no_such_field=1)


def test_counts_flops_tokens_positive_for_debug(fam):
    cfg = _debug(fam)
    counts = fam.param_counts(cfg)
    assert {"total", "encoder", "decoder", "non_embedding"} <= set(counts)
    assert counts["total"] == counts["encoder"] + counts["decoder"] and 0 < counts["non_embedding"] < counts["total"]
    flops = fam.flops_per_sample(cfg)
    assert 0 < flops["forward"] < flops["train"]
    assert fam.tokens_per_sample(cfg) > 0
    assert counts == R.param_counts(cfg) and flops == R.flops_per_sample(cfg)


def test_debug_pretrain_model_runs_forward_on_cpu(fam):
    cfg = _debug(fam)
    torch.manual_seed(0)
    model = fam.build_pretrain_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == fam.param_counts(cfg)["total"]
    mask = None
    if fam.make_mask is not None:
        mask = fam.make_mask(cfg, 2, generator=torch.Generator().manual_seed(1), device="cpu")
        assert mask.dtype == torch.bool and mask.shape[0] == 2
    brain = torch.ones(2, *cfg.img_size[:3], dtype=torch.bool)
    out = model(_x(cfg), brain_mask=brain, mask=mask)
    assert torch.isfinite(out["loss"]) and int(out["num_tokens"]) > 0
    out["loss"].backward()


def test_checkpointing_field_and_stage_modules(fam):
    """``checkpoint_field`` is a bool field that, set, recomputes activations with the same loss and gradients;
    ``stage_modules`` gives the encoder's stages, each a token grid ``[B, X', Y', Z', T', D]``."""
    cfg = _debug(fam)
    brain = torch.ones(2, *cfg.img_size[:3], dtype=torch.bool)
    mask = (fam.make_mask(cfg, 2, generator=torch.Generator().manual_seed(1), device="cpu")
            if fam.make_mask is not None else None)
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        c = dataclasses.replace(cfg, **{fam.checkpoint_field: on}) if fam.checkpoint_field else cfg
        model = fam.build_pretrain_model(c)
        model.train()
        out = model(_x(cfg), brain_mask=brain, mask=mask)
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert fam.checkpoint_field is None or isinstance(getattr(cfg, fam.checkpoint_field), bool)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    encoder = fam.build_pretrain_model(cfg).encoder
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in fam.stage_modules(encoder)]
    with torch.no_grad():
        encoder(_x(cfg))
    for h in hooks:
        h.remove()
    assert len(outs) == len(fam.stage_modules(encoder))
    assert all(o.ndim == 6 and o.shape[0] == 2 for o in outs), [tuple(o.shape) for o in outs]


def test_downstream_model_and_finetune_hooks(fam):
    cfg = _debug(fam)
    hooks = fam.finetune
    torch.manual_seed(0)
    model = fam.build_downstream_model(cfg, task="classification", num_outputs=1)
    assert isinstance(model.encoder, nn.Module) and isinstance(model.head, nn.Module)
    assert model(_x(cfg)).shape == (2, 1)
    params = {id(p) for p in model.parameters()}
    last = {id(p) for p in hooks.last_block_parameters(model)}
    assert last < params and {id(p) for p in model.head.parameters()} <= last
    assert not {id(p) for p in model.encoder.patch_embed.parameters()} & last
    names = dict(model.encoder.named_modules())
    targets = hooks.lora_targets(model.encoder)
    assert targets and all(isinstance(names[t], nn.Linear) for t in targets)
    width = hooks.feature_dim(cfg)
    head_in = next(m for m in model.head.modules() if isinstance(m, nn.Linear)).in_features
    assert width == head_in
    mlp = fam.build_downstream_model(cfg, task="regression", num_outputs=1, hidden_dim=width)
    assert mlp(_x(cfg)).shape == (2, 1)
    if hooks.supports_prompts(cfg):
        prompted = fam.build_downstream_model(cfg, task="classification", num_outputs=1, prompt_tokens=3)
        assert prompted.prompts.shape == (3, width)
        assert id(prompted.prompts) not in {id(p) for p in hooks.last_block_parameters(prompted)}
        assert prompted(_x(cfg)).shape == (2, 1)
    else:
        with pytest.raises(ValueError):
            fam.build_downstream_model(cfg, task="classification", num_outputs=1, prompt_tokens=3)


def test_arch_fields_tell_different_models_apart(fam):
    cfg = _debug(fam)
    wide = fam.with_width(cfg, 2 * cfg.embed_dim)
    diff = [k for k in fam.arch_fields if getattr(cfg, k) != getattr(wide, k)]
    assert diff and "embed_dim" in diff


def test_contract_refuses_an_incomplete_family():
    good = R.get_family("neuromamba")
    with pytest.raises(ValueError, match="arch_fields"):
        dataclasses.replace(good, arch_fields=("embed_dim",))
    with pytest.raises(ValueError, match="debug"):
        dataclasses.replace(good, sizes={k: v for k, v in good.sizes.items() if k != "debug"})
    with pytest.raises(ValueError, match="callable"):
        dataclasses.replace(good, param_counts=None)
    with pytest.raises(TypeError):
        ModelFamily(name="x")  # every field is required


def test_swift_cuda_graphs_only_on_small_stages():
    """The 51M at the v1 configuration, micro-batch 16: stages 1-2 (token maps of 16 x 16^3 x 20 x 96 and
    16 x 8^3 x 20 x 192 elements) are GPU-bound and stay ungraphed; stages 3-4 get CUDA graphs; the decoder and
    loss never do. At micro-batch 1 every stage is small."""
    cfg = R.get_config("swift_v2", "51M", patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 4))
    kw = R.cuda_graph_regions(cfg, 16)
    graphed = {n: kw(n, None).get("mode") for n in
               ("encoder.stages.0.blocks.0", "encoder.stages.1.blocks.1", "encoder.stages.2.blocks.5",
                "encoder.pos_embeds.3", "encoder.merges.2", "decoder", "loss")}
    assert graphed == {"encoder.stages.0.blocks.0": None, "encoder.stages.1.blocks.1": None,
                       "encoder.stages.2.blocks.5": "reduce-overhead", "encoder.pos_embeds.3": "reduce-overhead",
                       "encoder.merges.2": "reduce-overhead", "decoder": None, "loss": None}
    assert R.cuda_graph_regions(cfg, 1)("encoder.stages.0.blocks.0", None) == {"mode": "reduce-overhead"}
    assert R.cuda_graph_regions(R.get_config("neuromamba", "debug"), 16) is None
