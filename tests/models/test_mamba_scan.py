"""Selective scan: chunked parallel scan vs the sequential float64 reference (values and gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuro_models.mamba.scan import (linear_recurrence_scan, mamba_ssm_available, selective_scan,
                                     selective_scan_chunked, selective_scan_sequential, ssd_chunked, SSD_IMPLS, ssd_impl, SSD_ENV,
                                     ssd_sequential)


def _inputs(R=2, L=37, E=5, N=3, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    u = torch.randn(R, L, E, generator=g, dtype=dt)
    delta = F.softplus(torch.randn(R, L, E, generator=g, dtype=dt)) * delta_scale
    A = -torch.rand(E, N, generator=g, dtype=dt) * 3 - 0.1
    B = torch.randn(R, L, N, generator=g, dtype=dt)
    C = torch.randn(R, L, N, generator=g, dtype=dt)
    D = torch.randn(E, generator=g, dtype=dt)
    z = torch.randn(R, L, E, generator=g, dtype=dt)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]


def _explicit_reference(u, delta, A, B, C, D, z, starts):
    """Textbook recurrence written independently of the library (no shared helpers)."""
    R, L, E = u.shape
    N = A.shape[1]
    y = torch.zeros(R, L, E, dtype=u.dtype)
    for r in range(R):
        h = torch.zeros(E, N, dtype=u.dtype)
        for t in range(L):
            if starts is not None and starts[r, t]:
                h = torch.zeros(E, N, dtype=u.dtype)
            h = torch.exp(delta[r, t, :, None] * A) * h + delta[r, t, :, None] * B[r, t][None, :] * u[r, t, :, None]
            y[r, t] = (h * C[r, t][None, :]).sum(-1) + D * u[r, t]
    return y * F.silu(z)


def test_sequential_matches_textbook_recurrence():
    args = _inputs(R=2, L=9, E=3, N=2)
    starts = torch.zeros(2, 9, dtype=torch.bool)
    starts[1, 4] = True
    ref = _explicit_reference(*[a.detach() for a in args], starts)
    got = selective_scan(*args, starts, impl="sequential")
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", ["chunked", "chunked_autograd"])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_matches_sequential_values_and_grads(chunk, impl):
    args = _inputs()
    starts = torch.zeros(2, 37, dtype=torch.bool)
    starts[0, 0] = True
    starts[0, 10] = True
    starts[1, 20] = True
    starts[1, 21] = True  # a one-token sequence
    y_ref = selective_scan(*args, starts, impl="sequential")
    y = selective_scan(*args, starts, impl=impl, chunk=chunk)
    assert y.dtype == torch.float64
    assert torch.allclose(y, y_ref, atol=1e-11, rtol=0)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), args)
    g = torch.autograd.grad((y * w).sum(), args)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_chunked_is_stable_for_strong_decay():
    # delta * |A| up to ~300 per step: an exp(cumsum) factorisation would overflow; products of decays cannot
    args = _inputs(L=50, delta_scale=100.0)
    y_ref = selective_scan(*args, None, impl="sequential")
    y = selective_scan(*args, None, impl="chunked", chunk=16)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, y_ref, atol=1e-10, rtol=0)


def test_no_state_leak_across_starts():
    u, delta, A, B, C, D, z = (a.detach() for a in _inputs(R=1, L=30))
    starts = torch.zeros(1, 30, dtype=torch.bool)
    starts[0, 12] = True
    y = selective_scan(u, delta, A, B, C, D, z, starts, impl="chunked", chunk=8)
    seg = slice(12, 30)
    alone = selective_scan(u[:, seg], delta[:, seg], A, B[:, seg], C[:, seg], D, z[:, seg], None, impl="chunked")
    assert torch.allclose(y[:, seg], alone, atol=1e-12, rtol=0)
    # and the part before the start is unaffected by what follows
    u2 = u.clone()
    u2[:, 12:] += 5.0
    y2 = selective_scan(u2, delta, A, B, C, D, z, starts, impl="chunked", chunk=8)
    assert torch.equal(y2[:, :12], y[:, :12])
    assert not torch.allclose(y2[:, 12:], y[:, 12:])


def test_linear_recurrence_scan_matches_loop():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(4, 13, 2, generator=g, dtype=torch.float64)
    b = torch.randn(4, 13, 2, generator=g, dtype=torch.float64)
    A_cum, h = linear_recurrence_scan(a, b, dim=1)
    hh = torch.zeros(4, 2, dtype=torch.float64)
    prod = torch.ones(4, 2, dtype=torch.float64)
    for t in range(13):
        hh = a[:, t] * hh + b[:, t]
        prod = prod * a[:, t]
        assert torch.allclose(h[:, t], hh, atol=1e-12)
        assert torch.allclose(A_cum[:, t], prod, atol=1e-12)


def test_float32_inputs_give_float32_output_close_to_float64():
    args64 = [a.detach() for a in _inputs()]
    y64 = selective_scan_sequential(*args64)
    y32 = selective_scan(*[a.float() for a in args64], impl="chunked")
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_bad_impl_and_missing_kernel():
    args = [a.detach() for a in _inputs(L=5)]
    with pytest.raises(ValueError, match="impl"):
        selective_scan(*args, impl="triton-magic")
    if not mamba_ssm_available():
        with pytest.raises(ValueError, match="mamba-ssm"):
            selective_scan(*args, impl="mamba_ssm")


def test_channel_blocks_give_the_same_values_and_grads():
    """The custom backward processes channels in blocks to bound memory; the result must not change."""
    args = _inputs(E=7)
    starts = torch.zeros(2, 37, dtype=torch.bool)
    starts[1, 5] = True
    y_ref = selective_scan(*args, starts, impl="sequential")
    y = selective_scan_chunked(*args, starts, chunk=8, max_block_elems=2 * 37 * 3 * 2)  # blocks of 2 channels
    assert torch.allclose(y, y_ref, atol=1e-11, rtol=0)
    g_ref = torch.autograd.grad(y_ref.sum(), args)
    g = torch.autograd.grad(y.sum(), args)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_custom_backward_passes_gradcheck():
    u, delta, A, B, C, D, z = _inputs(R=1, L=11, E=2, N=2)
    starts = torch.zeros(1, 11, dtype=torch.bool)
    starts[0, 6] = True
    assert torch.autograd.gradcheck(lambda *t: selective_scan_chunked(*t, starts=starts, chunk=4),
                                    (u, delta, A, B, C, D, z))


@pytest.mark.parametrize("impl", sorted(SSD_IMPLS))
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_ssd_chunked_matches_sequential_values_and_grads(chunk, impl):
    """Mamba-2 SSD: each chunked matmul form equals the recurrence, resets included (one on a chunk boundary
    for chunks 4 and 16, two in a row), values and gradients (float64)."""
    ssd_chunked = SSD_IMPLS[impl]
    g = torch.Generator().manual_seed(1)
    dt64 = torch.float64
    R, L, H, P, N = 2, 45, 3, 4, 5
    x = torch.randn(R, L, H, P, generator=g, dtype=dt64)
    dt = F.softplus(torch.randn(R, L, H, generator=g, dtype=dt64))
    A = -torch.rand(H, generator=g, dtype=dt64) * 3 - 0.1
    B = torch.randn(R, L, N, generator=g, dtype=dt64)
    C = torch.randn(R, L, N, generator=g, dtype=dt64)
    D = torch.randn(H, generator=g, dtype=dt64)
    args = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
    starts = torch.zeros(R, L, dtype=torch.bool)
    starts[0, 0] = starts[0, 13] = starts[0, 32] = starts[1, 16] = starts[1, 17] = True
    y_ref = ssd_sequential(*args, starts)
    y = ssd_chunked(*args, starts, chunk=chunk)
    assert torch.allclose(y, y_ref, atol=1e-11, rtol=0)
    w = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad((y * w).sum(), args), torch.autograd.grad((y_ref * w).sum(), args)):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    # a reset really cuts the past: the segment after a start equals that segment run alone
    alone = ssd_sequential(*(t.detach() for t in (x[:1, 13:32], dt[:1, 13:32], A, B[:1, 13:32], C[:1, 13:32], D)))
    assert torch.allclose(y[:1, 13:32].detach(), alone, atol=1e-11, rtol=0)


def test_ssd_float32_accuracy_at_mamba2_decays():
    """Float32 at Mamba-2's decay range (A in [-16, -1], 64-token chunks, resets every 150 tokens): both forms
    within 1e-5 of the float64 recurrence, relative to the output's scale (the segment form's in-chunk cumsum
    differences measured 1.2e-6, the masked cumsum 6e-8)."""
    g = torch.Generator().manual_seed(2)
    R, L, H, P, N = 1, 700, 4, 8, 16
    x = torch.randn(R, L, H, P, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(R, L, H, generator=g, dtype=torch.float64) - 2)
    A = -torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=g)
    B, C = (torch.randn(R, L, N, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.randn(H, generator=g, dtype=torch.float64)
    starts = torch.zeros(R, L, dtype=torch.bool)
    starts[0, ::150] = True
    ref = ssd_sequential(x, dt, A, B, C, D, starts)
    for impl, fn in SSD_IMPLS.items():
        y = fn(*(t.float() for t in (x, dt, A, B, C, D)), starts, chunk=64).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5, impl


def test_ssd_impl_selection(monkeypatch):
    monkeypatch.delenv(SSD_ENV, raising=False)
    assert ssd_impl() is SSD_IMPLS["seg"]
    monkeypatch.setenv(SSD_ENV, "segsum")
    assert ssd_impl() is SSD_IMPLS["segsum"]
    monkeypatch.setenv(SSD_ENV, "fast")
    with pytest.raises(ValueError, match="NEUROMAMBA_SSD='fast'"):
        ssd_impl()


def test_bf16_inputs_are_computed_in_float32():
    """Under autocast the mixer hands bf16 tensors to the scan: it computes in float32, returns float32
    outputs and gives gradients in the inputs' dtypes, close to the float32 run."""
    args32 = [a.detach().float() for a in _inputs()]
    args16 = [a.bfloat16().requires_grad_() if a.dim() == 3 else a.clone().requires_grad_() for a in args32]
    ref_in = [a.detach().float().requires_grad_() for a in args16]
    y16 = selective_scan(*args16, impl="chunked")
    y32 = selective_scan(*ref_in, impl="chunked")
    assert y16.dtype == torch.float32
    assert torch.allclose(y16, y32, atol=1e-5, rtol=1e-5)
    g16 = torch.autograd.grad(y16.sum(), args16)
    g32 = torch.autograd.grad(y32.sum(), ref_in)
    for a, b, inp in zip(g16, g32, args16):
        assert a.dtype == inp.dtype
        assert torch.allclose(a.float(), b, atol=0.05 * b.abs().max().item() + 1e-6)


def _cuda_inputs(R=2, L=300, E=48, N=16):
    args = [a.detach().float().cuda() for a in _inputs(R=R, L=L, E=E, N=N, seed=5)]
    return [a.requires_grad_() for a in args]


@pytest.mark.gpu
@pytest.mark.skipif(not mamba_ssm_available(), reason="mamba-ssm is not installed")
def test_mamba_ssm_kernel_matches_chunked_scan():
    """Where the mamba-ssm CUDA kernel is importable, it and our scan agree (values and gradients)."""
    args = _cuda_inputs()
    y_k = selective_scan(*args, impl="mamba_ssm")
    y_c = selective_scan(*args, impl="chunked")
    assert torch.allclose(y_k, y_c, atol=1e-4, rtol=1e-3)
    for a, b in zip(torch.autograd.grad(y_k.sum(), args), torch.autograd.grad(y_c.sum(), args)):
        assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item() + 1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_scan_matches_chunked_on_gpu():
    args = _cuda_inputs()
    starts = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    starts[1, 123] = True
    y_c = selective_scan(*args, starts, impl="chunked")
    y_t = selective_scan(*args, starts, impl="compiled")
    assert torch.allclose(y_t, y_c, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y_t.sum(), args), torch.autograd.grad(y_c.sum(), args)):
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item() + 1e-6)
