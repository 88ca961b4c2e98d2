"""Checks of the fused MLP, run in a subprocess by test_swift_fused_mlp.py with TRITON_INTERPRET=1 (the variable
must be set before Triton decorates the kernels, so not inside the shared pytest process).

The interpreter computes ``tl.dot`` of bf16 tiles wrongly (Triton 3.9), so the kernels run in fp16 here; the same
code runs in bf16 on GPUs (``benchmarks/swift_blocks.py --check``)."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from interpreted import fp16_loss_and_grads, fp16_module_step, rel  # this folder

from neuro_models import registry as R
from neuro_models.swift.kernels import fused_mlp, triton_launch
from neuro_models.swift.layers import Mlp


#: fp16 rounds to 2^-11 (4.9e-4 relative); the kernels round the hidden activation and its gradient to fp16 before
#: their matmuls, as autocast does, and accumulate in float32: measured 1.3e-4 to 3.0e-4 against float64
TOL = 1e-3


def kernels_match_float64() -> None:
    """Output and all five gradients against float64 on the same fp16 inputs, for every launch configuration and
    for widths, hidden sizes and row counts that are not multiples of the tiles."""
    for kind in ("fwd", "dh"):
        assert fused_mlp.CONFIGS[kind], kind
    x0 = torch.zeros(0, 24).half().requires_grad_()
    p0 = [torch.randn(96, 24).half().requires_grad_(), torch.randn(96).half().requires_grad_(),
          torch.randn(24, 96).half().requires_grad_(), torch.randn(24).half().requires_grad_()]
    y0 = fused_mlp.fused_mlp_op(x0, *p0)
    y0.sum().backward()  # no tokens: an empty output, zero weight gradients
    assert y0.shape == (0, 24) and all(float(p.grad.abs().sum()) == 0 for p in p0)
    n_cfg = max(len(c) for c in fused_mlp.CONFIGS.values())
    for i in range(n_cfg):
        for (M, C, H) in [(200, 24, 96), (77, 40, 160), (64, 96, 384)]:
            key = (M, C, H, torch.float16, "cpu")
            for kind, configs in fused_mlp.CONFIGS.items():
                fused_mlp._TUNED[(kind, key)] = configs[min(i, len(configs) - 1)]
            torch.manual_seed(i)
            x = torch.randn(M, C).half().requires_grad_()
            fc1, fc2 = torch.nn.Linear(C, H), torch.nn.Linear(H, C)
            params = [p.detach().half().requires_grad_() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
            dy = torch.randn(M, C).half()
            y = fused_mlp.fused_mlp_op(x, *params)
            y.backward(dy)
            ref = [t.detach().double().requires_grad_() for t in [x, *params]]
            yr = F.linear(F.gelu(F.linear(ref[0], ref[1], ref[2])), ref[3], ref[4])
            yr.backward(dy.double())
            assert y.dtype == torch.float16 and all(p.grad.dtype == torch.float16 for p in params)
            for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), [y, x.grad] + [p.grad for p in params],
                                  [yr] + [t.grad for t in ref]):
                err = rel(a.detach(), b.detach())
                assert err < TOL, (i, M, C, H, name, err)


def module_matches_pytorch_and_compiles() -> None:
    """``Mlp(fused=True)`` under fp16 autocast: the same as the PyTorch MLP to fp16 rounding, identical compiled
    (fullgraph: the custom op is one opaque node) and eager; float32 compute keeps the PyTorch path."""
    torch.manual_seed(0)
    fused, plain = Mlp(24, 96, fused=True), Mlp(24, 96)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 7, 24)

    eager = fp16_module_step(fused, x)
    compiled = fp16_module_step(torch.compile(fused, fullgraph=True), x)
    want = fp16_module_step(plain, x)
    assert eager[0].shape == x.shape
    for a, b, c in zip(eager, compiled, want):
        assert torch.equal(a, b)
        assert rel(a, c) < 2e-3, rel(a, c)
    assert fused_mlp.usable(x.half(), fused.fc1, fused.fc2) and not fused_mlp.usable(x, fused.fc1, fused.fc2)


def model_uses_it_in_narrow_stages() -> None:
    """A 4D model with ``fused_mlp`` trains like the PyTorch MLP (fp16 autocast): same loss and gradients to fp16
    rounding; the fused path runs only for MLPs of width <= MAX_DIM."""
    cfg = R.get_config("swift_v2", "debug", img_size=(24, 24, 24, 4), drop_path_rate=0.0)
    calls = []
    orig = fused_mlp.fused_mlp

    def spy(x, fc1, fc2):
        calls.append(fc1.in_features)
        return orig(x, fc1, fc2)

    fused_mlp.fused_mlp = spy
    max_dim = fused_mlp.MAX_DIM
    fused_mlp.MAX_DIM = cfg.stage_dims()[0]  # the debug widths are narrow: make the second stage too wide
    grads = {}
    try:
        for on in (False, True):
            grads[on] = fp16_loss_and_grads(cfg.replace(fused_mlp=on))
    finally:
        fused_mlp.fused_mlp = orig
        fused_mlp.MAX_DIM = max_dim
    dims = cfg.stage_dims()
    assert set(calls) == {dims[0]} and len(dims) > 1, (calls, dims)
    assert abs(grads[True][0] - grads[False][0]) < 2e-3 * abs(grads[False][0])
    assert rel(grads[True][1], grads[False][1]) < 1e-2, rel(grads[True][1], grads[False][1])


if __name__ == "__main__":
    assert triton_launch.available(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    {"kernel": kernels_match_float64, "module": module_matches_pytorch_and_compiles,
     "model": model_uses_it_in_narrow_stages}[sys.argv[1]]()
    print("ok")
