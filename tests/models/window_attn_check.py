"""Checks of the Triton window attention, run in a subprocess by test_swift_window_attn.py with TRITON_INTERPRET=1
(the variable must be set before Triton decorates the kernels, so not inside the shared pytest process).

The interpreter computes ``tl.dot`` of bf16 tiles wrongly (Triton 3.9), so the kernels run in fp16 here; the same
code runs in bf16 on GPUs (``benchmarks/swift_blocks.py --check``)."""
from __future__ import annotations

import math
import sys

import torch
from interpreted import fp16_loss_and_grads, rel  # this folder

from neuro_models import registry as R
from neuro_models.swift.kernels import window_attn as WA
from neuro_models.swift.layers import shifted_window_mask
from neuro_models.swift.model import WindowBlock4D


#: fp16 rounds to 2^-11 (4.9e-4 relative); P and dS are rounded to fp16 before their matmuls (as FlashAttention
#: does), products accumulate in float32
TOL = 2e-3

# (map dims, window, shift, heads, head dim): every axis shifted at 256 tokens (the 51M's windows); an unshifted
# 256-token window; a window of 24 tokens (padded to 32) with one unshifted axis; head dim 32; 2 samples each
CASES = [((8, 4, 4, 8), (4, 4, 4, 4), (2, 2, 2, 2), 2, 16), ((4, 4, 4, 4), (4, 4, 4, 4), (0, 0, 0, 0), 1, 16),
         ((4, 6, 2, 4), (2, 3, 2, 2), (1, 1, 0, 1), 2, 32), ((4, 4, 2, 6), (2, 2, 2, 3), (0, 0, 0, 0), 3, 16)]


def reference(qkv: torch.Tensor, heads: int, scale: float, mask_WNN: torch.Tensor | None) -> torch.Tensor:
    """float64 softmax attention per window and head: ``[S, N, 3 H E] -> [S, N, H E]``."""
    S, N, C = qkv.shape
    q, k, v = qkv.reshape(S, N, 3, heads, C // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    sc = q @ k.transpose(-1, -2) * scale
    if mask_WNN is not None:
        W = mask_WNN.shape[0]
        sc = sc.masked_fill(~mask_WNN.repeat(S // W, 1, 1)[:, None], float("-inf"))
    return (sc.softmax(-1) @ v).transpose(1, 2).reshape(S, N, C // 3)


def kernels_match_float64() -> None:
    """Output and the qkv gradient against float64 on the same fp16 inputs, for every launch configuration, masked
    (Swin's regions from ``region_tables``) and not, for windows that are and are not a power of two; no windows."""
    empty = torch.zeros(0, 16, 3 * 32).half().requires_grad_()
    o0 = WA.window_attention(empty, 2, 0.25)
    o0.sum().backward()
    assert o0.shape == (0, 16, 32) and empty.grad.shape == empty.shape
    n_cfg = max(len(c) for c in WA.CONFIGS.values())
    for i in range(n_cfg):
        for c, (dims, window, shift, H, E) in enumerate(CASES):
            N = math.prod(window)
            W = math.prod(g // w for g, w in zip(dims, window))
            S = 2 * W
            key = (S, N, H, E, any(shift), torch.float16, "cpu")
            for kind in WA.CONFIGS:
                fits = WA._configs(kind, N)
                WA._TUNED[(kind, key)] = fits[min(i, len(fits) - 1)]
            torch.manual_seed(10 * i + c)
            qkv = (torch.randn(S, N, 3 * H * E) * 1.5).half().requires_grad_()
            do = torch.randn(S, N, H * E).half()
            scale = E ** -0.5
            tables = WA.region_bits(dims, window, shift) if any(shift) else None
            o = WA.window_attention(qkv, H, scale, tables)
            o.backward(do)
            ref = qkv.detach().double().requires_grad_()
            orf = reference(ref, H, scale, shifted_window_mask(dims, window, shift))
            orf.backward(do.double())
            assert o.dtype == torch.float16 and qkv.grad.dtype == torch.float16
            for name, a, b in (("o", o, orf), ("dq", qkv.grad[..., :H * E], ref.grad[..., :H * E]),
                               ("dk", qkv.grad[..., H * E:2 * H * E], ref.grad[..., H * E:2 * H * E]),
                               ("dv", qkv.grad[..., 2 * H * E:], ref.grad[..., 2 * H * E:])):
                err = rel(a.detach(), b.detach())
                assert err < TOL, (i, c, name, err)


def block_matches_sdpa_and_compiles() -> None:
    """A shifted and a regular ``WindowBlock4D`` with ``attn_impl="triton"`` under fp16 autocast equal the SDPA
    blocks to fp16 rounding (output and every gradient); compiled (fullgraph) it keeps the kernels as one opaque op
    and matches eager."""
    x = torch.randn(2, 8, 4, 4, 8, 32, generator=torch.Generator().manual_seed(1))
    for shifted in (False, True):
        blocks = {}
        for impl in ("triton", "sdpa"):
            torch.manual_seed(0)
            blocks[impl] = WindowBlock4D(32, 2, (4, 4, 4, 4), shifted=shifted, mlp_ratio=2.0, qkv_bias=True,
                                         drop_path=0.0, scale=0.25, shift_impl="mask", attn_impl=impl)

        def run(blk, fn=None):
            for p in blk.parameters():
                p.grad = None
            xi = x.clone().requires_grad_()
            call = blk if fn is None else fn
            with torch.autocast("cpu", dtype=torch.float16):  # the stage loop builds the mask under autocast too
                mask = blk.region_mask(xi)
                y = call(xi, mask) if mask is not None else call(xi)
            y.float().square().sum().backward()
            return [y.float(), xi.grad] + [p.grad for p in blk.parameters()]

        tri = blocks["triton"]
        with torch.autocast("cpu", dtype=torch.float16):
            assert isinstance(tri.region_mask(x), WA.RegionTables) if shifted else tri.region_mask(x) is None
        assert tri.region_mask(x) is None  # float32 compute: SDPA (no tables)
        graphs = []

        def record(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        run(tri, torch.compile(tri, fullgraph=True, backend=record))
        assert len(graphs) == 1 and "neurox.window_attn" in graphs[0], graphs
        calls = []
        orig = WA.window_attention
        WA.window_attention = lambda *a: calls.append(a[0].shape) or orig(*a)
        try:
            eager = run(tri)
        finally:
            WA.window_attention = orig
        assert calls == [(2 * 2 * 1 * 1 * 2, 256, 96)], calls
        compiled = run(tri, torch.compile(tri, fullgraph=True))
        want = run(blocks["sdpa"])
        for a, b, c in zip(eager, compiled, want):
            # measured: eager vs compiled <= 1.3e-4 (Inductor fuses the norms and MLP), vs SDPA <= 2.5e-4
            assert rel(a, b) < 1e-3, (shifted, rel(a, b))
            assert rel(a, c) < 2e-3, (shifted, rel(a, c))


def model_trains_like_sdpa() -> None:
    """The debug model with ``attn_impl="triton"``: same loss and gradients as SDPA to fp16 rounding (fp16
    autocast), and every window block ran the kernels."""
    cfg = R.get_config("swift_v2", "debug", img_size=(24, 24, 24, 8), drop_path_rate=0.0, window_size=(2, 2, 2, 2))
    calls = []
    orig = WA.window_attention

    def spy(qkv, heads, scale, tables=None):
        calls.append((qkv.shape[1], tables is not None))
        return orig(qkv, heads, scale, tables)

    WA.window_attention = spy
    grads = {}
    try:
        for impl in ("sdpa", "triton"):
            grads[impl] = fp16_loss_and_grads(cfg.replace(attn_impl=impl))
    finally:
        WA.window_attention = orig
    n_window_blocks = sum(d for d, full in zip(cfg.depths, [False] * (len(cfg.depths) - 1)
                                               + [cfg.last_layer_full_attention]) if not full)
    assert len(calls) == n_window_blocks and any(m for _, m in calls), calls
    assert abs(grads["triton"][0] - grads["sdpa"][0]) < 2e-3 * abs(grads["sdpa"][0])
    assert rel(grads["triton"][1], grads["sdpa"][1]) < 1e-2, rel(grads["triton"][1], grads["sdpa"][1])


if __name__ == "__main__":
    assert WA.available(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    {"kernel": kernels_match_float64, "block": block_matches_sdpa_and_compiles,
     "model": model_trains_like_sdpa}[sys.argv[1]]()
    print("ok")
