"""FLOP counting helpers shared by the model families.

Convention (the one ``torch.utils.flop_counter`` uses): a multiply-add is 2 FLOPs; only matrix
multiplications are counted (linear layers, attention score and value products, convolutions as
matmuls). Norms, activations, softmax, residual adds and optimizer updates are ignored (they are
O(tokens * width), a few percent at most). Training FLOPs are ``3 x forward``: the backward pass
costs two matmuls per forward matmul (gradients w.r.t. input and weight). Layers whose input does
not require grad (the very first linear on raw data) strictly cost ``2 x`` not ``3 x``; the
analytic counts keep the simple ``3 x`` rule for every matmul and state it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

#: backward/forward FLOP ratio for matmuls (grad input + grad weight)
BACKWARD_MULT = 2


def linear_flops(tokens: float, in_features: int, out_features: int) -> float:
    """Forward FLOPs of a dense layer applied to ``tokens`` rows: ``2 * tokens * in * out``."""
    return 2.0 * tokens * in_features * out_features


def attention_flops(num_seqs: float, q_len: int, kv_len: int, dim: int) -> float:
    """Forward FLOPs of softmax attention (QK^T and AV) over ``num_seqs`` independent sequences.

    ``dim`` is the total width over heads (heads * head_dim): ``2 * 2 * num_seqs * q * kv * dim``.
    """
    return 4.0 * num_seqs * q_len * kv_len * dim


def train_flops(forward: float) -> float:
    """Forward + backward FLOPs for a forward count: ``(1 + BACKWARD_MULT) * forward``."""
    return (1 + BACKWARD_MULT) * forward


def flops_dict(forward: float) -> dict[str, float]:
    """The ``dict(forward=, train=)`` the family protocol returns."""
    return {"forward": float(forward), "train": float(train_flops(forward))}


def measure_flops(fn: Callable[[], Any], *, backward: bool = False) -> int:
    """Count FLOPs of ``fn()`` with ``torch.utils.flop_counter.FlopCounterMode``.

    Parameters
    ----------
    fn : callable
        Runs the computation; it must return a tensor (a loss) when ``backward`` is true.
    backward : bool
        Also run ``fn().backward()`` inside the counter (forward + backward FLOPs).

    Returns
    -------
    int
        Total FLOPs counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            if not isinstance(out, torch.Tensor):
                out = out["loss"]
            out.backward()
    return int(counter.get_total_flops())


def mfu(samples_per_s: float, train_flops_per_sample: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved analytic FLOP/s divided by ``peak_flops``."""
    return samples_per_s * train_flops_per_sample / peak_flops
