"""Checks of the epilogue MLP (``swift.kernels.gelu_mlp``), run in a subprocess by test_swift_gelu_mlp.py with
TRITON_INTERPRET=1 (the variable must be set before Triton decorates the kernels, so not inside the shared pytest
process).

The interpreter computes ``tl.dot`` of bf16 tiles wrongly (Triton 3.9), so the kernels run in fp16 here; the same
code runs in bf16 on GPUs (``benchmarks/swift_blocks.py --check-kernels``)."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from interpreted import fp16_loss_and_grads, fp16_module_step, rel  # this folder

from neuro_models import registry as R
from neuro_models.swift.kernels import gelu_mlp, triton_launch
from neuro_models.swift.layers import Mlp


#: fp16 rounds to 2^-11 (4.9e-4 relative); the kernels round h, g, gelu'(h) and dh to fp16 and accumulate in
#: float32: measured 1.6e-4 to 4.0e-4 against float64
TOL = 1e-3


def gelu_slope(h: torch.Tensor) -> torch.Tensor:
    """gelu'(h) = Phi(h) + h phi(h)."""
    return 0.5 * torch.special.erfc(-h / math.sqrt(2)) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


def gelu_matches_float64() -> None:
    """The kernels' GELU and its slope (one exponential, Abramowitz & Stegun 7.1.26 for Phi) in float32 over
    [-12, 12]: absolute error against float64 at most 6e-7 (measured 4.0e-7) and 3e-7 (measured 1.9e-7), below
    float32 PyTorch's exact GELU's own 9.1e-7."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(h_ptr, g_ptr, d_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        g, d = gelu_mlp._gelu_and_slope(tl.load(h_ptr + r))
        tl.store(g_ptr + r, g)
        tl.store(d_ptr + r, d)

    n = 1 << 14
    h = torch.linspace(-12, 12, n)
    g, d = torch.empty(n), torch.empty(n)
    kernel[(1,)](h, g, d, N=n)
    hd = h.double()
    want = F.gelu(hd)
    err_g = float((g.double() - want).abs().max())
    err_d = float((d.double() - gelu_slope(hd)).abs().max())
    err_torch = float((F.gelu(h).double() - want).abs().max())
    assert err_g < 6e-7 and err_g < err_torch, (err_g, err_torch)
    assert err_d < 3e-7, err_d


def kernels_match_float64() -> None:
    """Output and all five gradients against float64 on the same fp16 inputs, for every launch configuration that
    takes the width, with hidden sizes and row counts that are not multiples of the tiles; no rows at all."""
    x0 = torch.zeros(0, 32).half().requires_grad_()
    p0 = [torch.randn(96, 32).half().requires_grad_(), torch.randn(96).half().requires_grad_(),
          torch.randn(32, 96).half().requires_grad_(), torch.randn(32).half().requires_grad_()]
    y0, _, _ = gelu_mlp.gelu_mlp_op(x0, *p0)
    y0.sum().backward()  # no tokens: an empty output, zero weight gradients
    assert y0.shape == (0, 32) and all(float(p.grad.abs().sum()) == 0 for p in p0)
    runs = 0
    for (M, C, H) in [(200, 32, 128), (77, 64, 160), (130, 96, 384)]:  # 1, 2 and 3 steps through the width
        key = (M, C, H, torch.float16, "cpu")
        configs = gelu_mlp.CONFIGS
        for i in range(max(len(c) for c in configs.values())):
            for kind, cs in configs.items():
                gelu_mlp._TUNED[(kind, key)] = cs[min(i, len(cs) - 1)]
            torch.manual_seed(i)
            x = torch.randn(M, C).half().requires_grad_()
            fc1, fc2 = torch.nn.Linear(C, H), torch.nn.Linear(H, C)
            params = [p.detach().half().requires_grad_() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
            dy = torch.randn(M, C).half()
            y, g, d = gelu_mlp.gelu_mlp_op(x, *params)
            y.backward(dy)
            ref = [t.detach().double().requires_grad_() for t in [x, *params]]
            hr = F.linear(ref[0], ref[1], ref[2])
            yr = F.linear(F.gelu(hr), ref[3], ref[4])
            yr.backward(dy.double())
            assert not g.requires_grad and not d.requires_grad  # saved for the backward, not differentiable
            assert rel(g, F.gelu(hr.detach())) < TOL and rel(d, gelu_slope(hr.detach())) < TOL
            assert y.dtype == torch.float16 and all(p.grad.dtype == torch.float16 for p in params)
            for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), [y, x.grad] + [p.grad for p in params],
                                  [yr] + [t.grad for t in ref]):
                err = rel(a.detach(), b.detach())
                assert err < TOL, (i, M, C, H, name, err)
            runs += 1
    assert runs == 3 * max(len(c) for c in configs.values()), runs


def module_matches_pytorch_and_compiles() -> None:
    """``Mlp(impl="epilogue")`` under fp16 autocast: the same as the PyTorch MLP to fp16 rounding, identical compiled
    (fullgraph: the custom ops are opaque nodes of the graph) and eager; float32 compute keeps the PyTorch path."""
    torch.manual_seed(0)
    epi, plain = Mlp(32, 128, impl="epilogue"), Mlp(32, 128)
    plain.load_state_dict(epi.state_dict())
    x = torch.randn(2, 5, 7, 32)

    calls = []
    orig = gelu_mlp._backward

    def spy(*args):
        calls.append(args[0].shape)
        return orig(*args)

    gelu_mlp._backward = spy
    try:
        eager = fp16_module_step(epi, x)
        compiled = fp16_module_step(torch.compile(epi, fullgraph=True), x)
    finally:
        gelu_mlp._backward = orig
    want = fp16_module_step(plain, x)
    assert len(calls) == 2, calls  # both the eager and the compiled backward ran the kernel
    assert eager[0].shape == x.shape
    for a, b, c in zip(eager, compiled, want):
        assert torch.equal(a, b)
        assert rel(a, c) < 2e-3, rel(a, c)
    assert gelu_mlp.usable(x.half(), epi.fc1, epi.fc2) and not gelu_mlp.usable(x, epi.fc1, epi.fc2)


def model_uses_it_where_it_can() -> None:
    """A 4D model with ``mlp_impl="epilogue"`` trains like the PyTorch MLP (fp16 autocast): same loss and gradients to
    fp16 rounding; the kernels run in every block whose width is a multiple of 32, and ``fused_mlp`` takes
    precedence where it runs."""
    cfg = R.get_config("swift_v2", "debug", img_size=(24, 24, 24, 4), drop_path_rate=0.0)
    dims = cfg.stage_dims()
    calls = []
    orig = gelu_mlp.gelu_mlp

    def spy(x, fc1, fc2):
        calls.append(fc1.in_features)
        return orig(x, fc1, fc2)

    gelu_mlp.gelu_mlp = spy
    try:
        grads = {impl: fp16_loss_and_grads(cfg.replace(mlp_impl=impl)) for impl in ("torch", "epilogue")}
        n = len(calls)
        fp16_loss_and_grads(cfg.replace(mlp_impl="auto", fused_mlp=True))
    finally:
        gelu_mlp.gelu_mlp = orig
    want = sorted(d for d, depth in zip(dims, cfg.depths) for _ in range(depth) if d % gelu_mlp.K_STEP == 0)
    assert sorted(calls[:n]) == want and want, (calls, dims)
    assert calls[n:] == [], calls[n:]  # fused_mlp took every (narrow) debug MLP
    assert abs(grads["epilogue"][0] - grads["torch"][0]) < 2e-3 * abs(grads["torch"][0])
    err = rel(grads["epilogue"][1], grads["torch"][1])
    assert err < 1e-2, err


if __name__ == "__main__":
    assert triton_launch.available(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    {"gelu": gelu_matches_float64, "kernel": kernels_match_float64, "module": module_matches_pytorch_and_compiles,
     "model": model_uses_it_where_it_can}[sys.argv[1]]()
    print("ok")
