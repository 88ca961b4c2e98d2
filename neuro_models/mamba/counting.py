"""NeuroMamba parameter counts and analytic FLOPs (imported by the model for its per-batch FLOPs and by the family).

Parameter-count convention (:func:`param_counts`): ``encoder`` = patch embedding + Mamba blocks +
final norm (the size names round this number); ``decoder`` = next-token prediction head;
``total`` = both; ``non_embedding`` = ``total`` minus the patch embedding and the prediction head
(i.e. the Mamba blocks and final norm; Kaplan et al.'s convention).

FLOP convention (:func:`forward_flops_per_token`): a multiply-add is 2 FLOPs, as in
:mod:`neuro_models.flops`. ``dense`` counts the matmuls and the depthwise convolution, exactly
what ``torch.utils.flop_counter`` sees (tested equal). ``scan`` counts the selective scan's
elementwise recurrence math (:func:`.scan.scan_flops_per_token`, ``7 E S + 5 E`` per token and
block), which the counter cannot see: it is about 10-15 % of the total at these widths. For
``mixer="mamba2"`` the SSD is matmuls (``2QS + 2QE + 4ES`` per token with chunk ``Q``), counted in
``dense`` and seen by the counter; ``scan`` then holds its small elementwise rest. The
chunked parallel algorithm does a little more work than the recurrence (the in-chunk cumulative
decays and the carry add, about ``4 E S``, and a ``log2`` pass over chunk states); like attention
implementations, we count the math, not the algorithm. Training is ``3 x`` forward.
With background removal the per-sample count scales with the kept tokens; :func:`flops_per_sample`
uses ``cfg.brain_token_fraction`` (the MNI152 fraction) when ``cfg.remove_background`` is on, and
each forward also returns the exact ``flops_forward`` of its batch.
"""
from __future__ import annotations

import math

from ..flops import flops_dict, linear_flops
from .config import NeuroMambaConfig, encoder_params
from .scan import scan_flops_per_token, ssd_flops_per_token

__all__ = ["param_counts", "forward_flops_per_token", "tokens_per_sample", "flops_per_sample"]


def param_counts(cfg: NeuroMambaConfig) -> dict[str, int]:
    """Analytic parameter counts (see the module docstring for the convention)."""
    D = cfg.embed_dim
    enc = encoder_params(cfg)
    embed = cfg.patch_dim * D + D
    dec = D * cfg.patch_dim + cfg.patch_dim
    return {"total": enc + dec, "encoder": enc, "decoder": dec, "non_embedding": enc - embed}


def forward_flops_per_token(cfg: NeuroMambaConfig) -> dict[str, float]:
    """Forward FLOPs per token: ``dense`` (counter-visible matmuls + conv), ``scan`` and ``total``."""
    D, E, S, K, R, P = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.rank, cfg.patch_dim
    if cfg.mixer == "mamba2":
        H, Q = E // cfg.headdim, cfg.scan_chunk
        block = (linear_flops(1, D, 2 * E + 2 * S + H) + 2.0 * (E + 2 * S) * K + ssd_flops_per_token(E, S, Q)
                 + linear_flops(1, E, D))
        scan = float(cfg.depth * (Q * H + 7 * E))  # decay-mask product, skip, gate (elementwise)
    else:
        block = (linear_flops(1, D, 2 * E) + 2.0 * E * K + linear_flops(1, E, R + 2 * S) + linear_flops(1, R, E)
                 + linear_flops(1, E, D))
        scan = float(cfg.depth * scan_flops_per_token(E, S))
    dense = linear_flops(1, P, D) + cfg.depth * block + linear_flops(1, D, P)
    return {"dense": dense, "scan": scan, "total": dense + scan}


def tokens_per_sample(cfg: NeuroMambaConfig) -> int:
    """Tokens per sample *before* background removal (``prod(img_size / patch_size)``)."""
    return math.prod(cfg.grid)


def flops_per_sample(cfg: NeuroMambaConfig, num_tokens: float | None = None) -> dict[str, float]:
    """Analytic FLOPs per sample, ``dict(forward=, train=)``.

    ``num_tokens`` defaults to ``tokens_per_sample(cfg)``, times ``cfg.brain_token_fraction`` when
    ``cfg.remove_background`` is on.
    """
    if num_tokens is None:
        num_tokens = tokens_per_sample(cfg) * (cfg.brain_token_fraction if cfg.remove_background else 1.0)
    return flops_dict(forward_flops_per_token(cfg)["total"] * num_tokens)
