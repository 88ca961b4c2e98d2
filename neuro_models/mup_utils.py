"""Maximal-update parametrization (muP) helpers shared by every model family.

The ``mup`` package (Yang et al., "Tensor Programs V", 2022) needs three things from a model:

1. output layers that map a width dimension to a fixed dimension are ``mup.MuReadout``
   (:func:`readout_class` picks it under muP, ``nn.Linear`` under SP);
2. attention logits scaled by ``1/d_head`` instead of ``1/sqrt(d_head)``
   (:func:`attention_scale`);
3. every parameter carries an ``infshape`` attribute that says which of its dimensions grow with
   width; ``mup.set_base_shapes(model, base, delta=delta)`` sets it from a *base* and a *delta*
   model that differ from the target only in width (:func:`apply_mup`, which builds those two on the
   ``meta`` device so they cost no memory).

The optimizer must then be ``mup.MuAdamW`` (:func:`make_optimizer`), which divides the learning
rate of matrix-like parameters by their width multiplier.

Known pitfalls and how this module handles them
-----------------------------------------------
* **Shape info is lost on save/load.** ``infshape`` is a Python attribute on the ``Parameter``
  object; ``state_dict()``/``load_state_dict()``, ``torch.load`` of a state dict, ``copy`` through
  ``to_empty()``, DeepSpeed ZeRO-3 partitioning and FSDP flat parameters all drop it, and
  ``MuReadout.forward`` then fails (or, worse, a re-created optimizer silently falls back to SP).
  Never pickle base shapes with the weights; instead rebuild the model from its config (which sets
  base shapes again) and load the weights into it: :func:`load_mup_state_dict`. Pass
  ``rescale_params=False`` whenever base shapes are set on weights that were already rescaled
  (``MuReadout._rescale_parameters`` is *not* idempotent; mup raises ``RuntimeError`` if repeated).
* **Wrappers rename parameters.** ``set_base_shapes`` matches parameters by name. Names gain a
  ``module.`` prefix under (D)DP and ``_orig_mod.`` under ``torch.compile``; mup's own DataParallel
  fix-up uses ``str.strip('module.')``, which strips characters, not a prefix. Always set base
  shapes on the bare model *before* wrapping or compiling (``apply_mup`` does this at build time).
* **nn.DataParallel** replicates modules per step and loses ``infshape``; use DDP.
* Parameters with more than two width dimensions are unsupported by ``MuAdam``; our models have
  none (positional embeddings have one width dimension and are vector-like).

Examples
--------
>>> import torch
>>> from neuro_models.mup_utils import apply_mup, make_optimizer
>>> model = apply_mup(build_fn(cfg), build_fn, cfg, with_width=with_width, base_width=32)  # doctest: +SKIP
>>> opt = make_optimizer(model, "mup", lr=1e-3)  # doctest: +SKIP
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

PARAMETRIZATIONS = ("sp", "mup")


def check_parametrization(parametrization: str) -> str:
    """Return ``parametrization`` or raise ``ValueError`` naming the allowed values."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization={parametrization!r}; allowed: {PARAMETRIZATIONS}")
    return parametrization


def readout_class(parametrization: str) -> type:
    """``mup.MuReadout`` under muP, ``nn.Linear`` under SP (for layers width -> fixed size)."""
    if check_parametrization(parametrization) == "mup":
        from mup import MuReadout

        return MuReadout
    return nn.Linear


def attention_scale(head_dim: int, parametrization: str, *, base_head_dim: int | None = None) -> float:
    """Softmax temperature for attention logits.

    SP uses ``1/sqrt(d)``. muP uses ``1/d`` so that logits stay O(1) when ``d`` grows (q and k
    become correlated during training); we multiply by ``sqrt(base_head_dim)`` so both coincide at
    the base head dimension (``base_head_dim=None`` means ``head_dim`` itself).
    """
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    if check_parametrization(parametrization) == "sp":
        return 1.0 / math.sqrt(head_dim)
    base = head_dim if base_head_dim is None else base_head_dim
    return math.sqrt(base) / head_dim


def has_base_shapes(model: nn.Module) -> bool:
    """True when every parameter of ``model`` carries mup's ``infshape``."""
    return all(hasattr(p, "infshape") for p in model.parameters())


def _build_meta(build_fn: Callable[[Any], nn.Module], cfg: Any) -> nn.Module:
    with torch.device("meta"):
        return build_fn(cfg)


def apply_mup(model: nn.Module, build_fn: Callable[[Any], nn.Module], cfg: Any, *,
              with_width: Callable[[Any, int], Any], base_width: int, delta_width: int | None = None,
              rescale_params: bool = True) -> nn.Module:
    """Set muP base shapes on ``model`` from a base and a delta model built by ``build_fn``.

    Parameters
    ----------
    model : nn.Module
        The target model, freshly built by ``build_fn(cfg)`` (bare: not compiled, not wrapped).
    build_fn : callable
        ``build_fn(cfg) -> nn.Module``; must build the *bare* model (it must not call ``apply_mup``
        itself). Base and delta are built with it on the ``meta`` device.
    cfg : Any
        The target config.
    with_width : callable
        ``with_width(cfg, width) -> cfg`` returns the same config at another width.
    base_width : int
        Width of the base model (muP equals SP at this width).
    delta_width : int, optional
        Width of the delta model, used only to tell which dimensions scale; default
        ``2 * base_width``.
    rescale_params : bool
        Rescale SP-initialised readout weights and biases to the muP init. Use ``False`` when the
        weights come from a muP checkpoint.

    Returns
    -------
    nn.Module
        ``model`` itself with ``p.infshape`` set on every parameter.
    """
    import mup

    if base_width <= 0:
        raise ValueError(f"mup_base_width must be a positive int, got {base_width!r}")
    delta_width = 2 * base_width if delta_width is None else delta_width
    if delta_width == base_width:
        raise ValueError(f"delta_width must differ from base_width={base_width}, got {delta_width}")
    base = _build_meta(build_fn, with_width(cfg, base_width))
    delta = _build_meta(build_fn, with_width(cfg, delta_width))
    mup.set_base_shapes(model, base, delta=delta, rescale_params=rescale_params)
    return model


def load_mup_state_dict(build_model: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor], *,
                        strict: bool = True) -> nn.Module:
    """Rebuild a muP model and load weights into it (the safe way to restore a muP checkpoint).

    ``build_model()`` must return the model *with base shapes already set* (e.g. the family's
    ``build_pretrain_model(cfg)``); loading copies tensors into the existing parameters, which
    keeps their ``infshape``. A ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefix in the
    checkpoint keys is removed first.
    """
    model = build_model()
    clean = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    model.load_state_dict(clean, strict=strict)
    if not has_base_shapes(model):
        raise ValueError("build_model() returned a model without muP base shapes; build it with "
                         "parametrization='mup'")
    return model


def make_optimizer(model_or_params: nn.Module | Iterable, parametrization: str, *, lr: float,
                   weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """``mup.MuAdamW`` under muP (needs base shapes), ``torch.optim.AdamW`` under SP."""
    if isinstance(model_or_params, nn.Module):
        params: list = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("make_optimizer got no trainable parameters")
    if check_parametrization(parametrization) == "mup":
        from mup import MuAdamW

        tensors = params if isinstance(params[0], torch.Tensor) else [q for g in params for q in g["params"]]
        for p in tensors:
            if not hasattr(p, "infshape"):
                raise ValueError("parametrization='mup' but a parameter has no infshape: build the model "
                                 "with parametrization='mup' (base shapes are lost on load; see "
                                 "load_mup_state_dict)")
        return MuAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


@torch.no_grad()
def _l1_scale(t: torch.Tensor) -> float:
    return t.detach().float().abs().mean().item()


def coord_check(make_model: Callable[[int], nn.Module], widths: Iterable[int], batch: Any,
                loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, parametrization: str,
                lr: float, steps: int = 3, module_filter: Callable[[str, nn.Module], bool] | None = None,
                seed: int = 0) -> dict[int, list[dict[str, float]]]:
    """Coordinate check: mean |activation| of chosen modules over a few optimizer steps per width.

    Parameters
    ----------
    make_model : callable
        ``make_model(width) -> nn.Module`` (with base shapes set under muP).
    widths : iterable of int
        Widths to compare (>= 4 for a meaningful check).
    batch : Any
        Fixed input batch passed to ``loss_fn``.
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar loss``.
    parametrization : {"sp", "mup"}
        Chooses the optimizer (``MuAdamW`` or ``AdamW``).
    lr : float
        Learning rate (the same for every width: that is the point of the check).
    steps : int
        Optimizer steps; activations are recorded at the forward of each step (step 0 = init).
    module_filter : callable, optional
        ``(name, module) -> bool`` selecting modules whose outputs are recorded; default: leaf
        modules that are ``nn.Linear`` or ``nn.LayerNorm``.
    seed : int
        Seed set before building each model.

    Returns
    -------
    dict
        ``{width: [{module_name: mean_abs_output, ...} for each step]}``.
    """
    module_filter = module_filter or (lambda n, m: isinstance(m, (nn.Linear, nn.LayerNorm)))
    out: dict[int, list[dict[str, float]]] = {}
    for width in widths:
        torch.manual_seed(seed)
        model = make_model(width)
        opt = make_optimizer(model, parametrization, lr=lr, weight_decay=0.0)
        records: list[dict[str, float]] = []
        current: dict[str, float] = {}
        hooks = []
        for name, mod in model.named_modules():
            if name and module_filter(name, mod):
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, name=name: current.__setitem__(
                        name, _l1_scale(o if isinstance(o, torch.Tensor) else o[0]))))
        try:
            for _ in range(steps):
                current = {}
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
                records.append(dict(current))
        finally:
            for h in hooks:
                h.remove()
        out[width] = records
    return out
