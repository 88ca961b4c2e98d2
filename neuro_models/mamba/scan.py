"""Selective state-space scan (Mamba-1) with sequence boundaries, in pure PyTorch.

The recurrence, per channel ``e`` and state index ``n`` (diagonal ``A``)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[e, n] + D[e] * u_t
    y_t = y_t * silu(z_t)                                          (gating, when z is given)

``starts_RL`` marks the first token of each packed sequence: there the state is reset
(``exp(delta A)`` is replaced by 0), so no information flows across packed boundaries.

Implementations (``impl``):

- ``"chunked"`` (default): the sequence is cut into chunks of ``chunk`` tokens. Inside a chunk a
  short recurrence over the ``chunk`` positions runs for *all chunks at once* (vectorised over
  chunks, so the number of Python steps is ``chunk``, never the sequence length); the chunk-end
  states are then combined by a Hillis-Steele parallel scan over chunks (``log2(n_chunks)``
  steps), and each position adds the carried state times its in-chunk cumulative decay. Only
  products of decays in ``[0, 1]`` are formed, so it cannot overflow (unlike the
  ``exp(cumsum)`` factorisation) and a reset (decay 0) is exact. Its backward is written by hand
  (a reverse chunked scan for ``dL/dh``) and recomputes the ``[R, L, E, N]`` states instead of
  storing them, one block of channels at a time: activation memory is that of the ``[R, L, E]``
  inputs, like the CUDA kernel's.
- ``"chunked_autograd"``: the same forward differentiated by autograd (stores every state; kept as
  a cross-check and for the benchmark).
- ``"compiled"``: ``"chunked"`` with its forward and backward cores through ``torch.compile``.
  On an H100 it compiled for ~200 s and then ran 2.3x *slower* than ``"chunked"`` (whose
  hand-written backward is 1.9x faster than autograd), so ``"auto"`` never picks it
  (``benchmarks/results/mamba.md``).
- ``"fused"``: the Triton kernels of :mod:`neuro_models.mamba.kernels.selective_scan` (forward and
  backward, state in registers, resets at sequence starts), a ``torch.library`` custom op; CUDA with
  Triton (or CPU under ``TRITON_INTERPRET=1``, for tests), float32/bf16/fp16 inputs.
- ``"sequential"``: a plain loop over time steps; the float64 reference used by the tests.
- ``"mamba_ssm"``: the CUDA kernel of the ``mamba-ssm`` package, used only when it is importable,
  the tensors are on CUDA and there are no interior sequence starts (the kernel has no boundary
  input).

``"auto"`` picks ``"fused"`` on a GPU where Triton runs (:data:`FUSED_IN_AUTO`), else ``"mamba_ssm"`` where it
can run, else ``"chunked"``. The fused kernel was checked on an H100 (session 15,
``benchmarks/mamba_scan_benchmark.py``): at the 3.1M model's layer its output and every gradient match the
float64 reference as closely as the chunked scan does (worst error 0.21 of the tolerance for both), one layer's
forward+backward is 17.3x faster (4.64 vs 80.2 ms) and the model's train step 9.4x (11.2x with compiled
blocks). The environment variable ``NEUROMAMBA_SCAN`` (``fused``, ``chunked``, ...) replaces what ``"auto"``
picks, e.g. to time or rule out a kernel without changing a config.

Shapes: ``R`` rows (batch rows or packed rows), ``L`` tokens, ``E`` channels, ``N`` state size.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # optional CUDA kernels; never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except Exception:  # pragma: no cover - mamba-ssm is not installed in CI
    _mamba_ssm_scan = None

SCAN_IMPLS = ("auto", "chunked", "chunked_autograd", "compiled", "sequential", "mamba_ssm", "fused")

#: environment variable that replaces what ``impl="auto"`` picks (one of ``SCAN_IMPLS`` other than "auto")
SCAN_ENV = "NEUROMAMBA_SCAN"


def fused_available(device: torch.device) -> bool:
    """True when the fused Triton scan can run for tensors on ``device`` (CUDA with Triton, or the interpreter)."""
    from .kernels.selective_scan import available  # imports Triton only here

    return available(device)


#: whether ``impl="auto"`` picks the fused Triton scan on a GPU: on since the kernel's GPU check
#: (``benchmarks/mamba_scan_benchmark.py``, H100, session 15) passed; never under the Triton interpreter (CPU),
#: where it is a test vehicle, hundreds of times slower than the chunked scan
FUSED_IN_AUTO = True


def _auto_impl(u: torch.Tensor) -> str:
    """What ``impl="auto"`` runs for ``u``: ``$NEUROMAMBA_SCAN`` if set, else "fused" where it can run and
    :data:`FUSED_IN_AUTO` is on, else "auto" (the mamba-ssm / chunked choice below)."""
    forced = os.environ.get(SCAN_ENV)
    if forced:
        if forced not in SCAN_IMPLS or forced == "auto":
            raise ValueError(f"{SCAN_ENV}={forced!r}; allowed: {SCAN_IMPLS[1:]}")
        return forced
    if FUSED_IN_AUTO and u.dtype != torch.float64 and not _interpreted() and fused_available(u.device):
        return "fused"
    return "auto"


def _interpreted() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    from .kernels.selective_scan import INTERPRET

    return INTERPRET


def mamba_ssm_available() -> bool:
    """True when the ``mamba-ssm`` CUDA selective-scan kernel can be imported."""
    return _mamba_ssm_scan is not None


def _shift(x: torch.Tensor, d: int, dim: int, fill: float) -> torch.Tensor:
    """``x`` shifted by ``d`` along ``dim`` (towards higher indices), the gap filled with ``fill``."""
    n = x.shape[dim]
    pad_shape = list(x.shape)
    pad_shape[dim] = min(d, n)
    head = torch.full(pad_shape, fill, dtype=x.dtype, device=x.device)
    if d >= n:
        return head
    return torch.cat([head, x.narrow(dim, 0, n - d)], dim=dim)


def linear_recurrence_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive Hillis-Steele scan of ``h_t = a_t h_{t-1} + b_t`` along ``dim`` (``h_{-1} = 0``).

    Returns ``(A, h)`` where ``A_t = prod_{s<=t} a_s`` and ``h_t`` is the state; ``log2(n)`` steps.
    """
    n = a.shape[dim]
    d = 1
    while d < n:
        b = b + a * _shift(b, d, dim, 0.0)
        a = a * _shift(a, d, dim, 1.0)
        d *= 2
    return a, b


def _prepare(u, delta, A, B, C, starts):
    a = torch.exp(delta.unsqueeze(-1) * A)  # [R, L, E, N], in (0, 1]
    if starts is not None:
        a = a * (~starts).to(a.dtype)[:, :, None, None]
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # [R, L, E, N]
    return a, b


def _finish(h, u, C, D, z):
    y = (h * C.unsqueeze(2)).sum(-1)  # [R, L, E]; elementwise on purpose (see flops docs)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, starts=None):
    """Reference scan: a Python loop over time steps (slow; for tests, use float64)."""
    R, L, E = u.shape
    a, b = _prepare(u, delta, A, B, C, starts)
    h = torch.zeros(R, E, A.shape[1], dtype=a.dtype, device=a.device)
    hs = []
    for t in range(L):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return _finish(torch.stack(hs, dim=1), u, C, D, z)


def _states(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """All states of ``h_t = a_t h_{t-1} + b_t`` along dim 1 of ``[R, L, E, N]`` tensors (chunked).

    Without autograd it overwrites ``b`` (callers pass a fresh temporary).
    """
    R, L, E, N = a.shape
    Q = max(1, min(int(chunk), L))
    pad = (-L) % Q
    if pad:
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, 0, 0, pad), value=0.0)
    nC = (L + pad) // Q
    a = a.reshape(R, nC, Q, E, N)
    b = b.reshape(R, nC, Q, E, N)
    if not torch.is_grad_enabled():
        # no autograd (inside the custom Function): update in place, 3 full-size buffers
        h = b if b.is_contiguous() else b.contiguous()
        a_cum = a.clone()
        for q in range(1, Q):
            h[:, :, q].addcmul_(a[:, :, q], h[:, :, q - 1])
            a_cum[:, :, q].mul_(a_cum[:, :, q - 1])
        _, h_end = linear_recurrence_scan(a_cum[:, :, -1], h[:, :, -1], dim=1)
        h.addcmul_(a_cum, _shift(h_end, 1, 1, 0.0).unsqueeze(2))
        return h.reshape(R, nC * Q, E, N)[:, :L]
    # in-chunk recurrence for all chunks at once: Q steps, each over [R, nC, E, N]
    acc_a = [a[:, :, 0]]
    acc_h = [b[:, :, 0]]
    for q in range(1, Q):
        acc_h.append(a[:, :, q] * acc_h[-1] + b[:, :, q])
        acc_a.append(a[:, :, q] * acc_a[-1])
    # carry across chunks: parallel scan over chunk-end (decay, state) pairs
    _, h_end = linear_recurrence_scan(acc_a[-1], acc_h[-1], dim=1)
    h_in = _shift(h_end, 1, 1, 0.0)  # state entering each chunk
    a_cum = torch.stack(acc_a, dim=2)  # decay from chunk start to position q (inclusive)
    del acc_a
    h = torch.stack(acc_h, dim=2)      # state assuming zero state entering the chunk
    del acc_h
    h = h + a_cum * h_in.unsqueeze(2)
    return h.reshape(R, nC * Q, E, N)[:, :L]


def _ssm_fwd(u, delta, A, B, C, D, z, keep, chunk: int):
    """Scan output ``(sum_n C h + D u) * silu(z)`` for one block of channels (D, z optional)."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    if keep is not None:
        a = a * keep[:, :, None, None]
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    h = _states(a, b, chunk)
    y = (h * C.unsqueeze(2)).sum(-1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def _ssm_bwd(dy, u, delta, A, B, C, D, z, keep, chunk: int):
    """Gradients of :func:`_ssm_fwd` by recomputation and a reverse chunked scan."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    if keep is not None:
        a = a * keep[:, :, None, None]
    du_ = delta * u
    b = du_.unsqueeze(-1) * B.unsqueeze(2)
    h = _states(a, b, chunk)
    dz = dD = None
    if z is not None:
        y = (h * C.unsqueeze(2)).sum(-1)
        if D is not None:
            y = y + u * D
        sg = torch.sigmoid(z)
        dz = dy * y * (sg * (1 + z * (1 - sg)))
        dy = dy * (z * sg)
    du_skip = None
    if D is not None:
        dD = (dy * u).sum((0, 1))
        du_skip = dy * D
    dC = (dy.unsqueeze(-1) * h).sum(2)
    g = dy.unsqueeze(-1) * C.unsqueeze(2)              # dL/dh_t from y_t
    a_next = _shift(a.flip(1), 1, 1, 0.0)               # a_{t+1}, reversed in time
    dh = _states(a_next, g.flip(1), chunk).flip(1)      # dh_t = g_t + a_{t+1} dh_{t+1}
    del g, a_next
    h_prev = _shift(h, 1, 1, 0.0)
    dlog = dh * h_prev * a                              # d loss / d (delta * A)  (0 where reset)
    del h, h_prev
    ddelta = (dlog * A).sum(-1)
    dA = (dlog * delta.unsqueeze(-1)).sum((0, 1))
    del dlog
    d_du = (dh * B.unsqueeze(2)).sum(-1)
    dB = (dh * du_.unsqueeze(-1)).sum(2)
    ddelta = ddelta + d_du * u
    du = d_du * delta
    if du_skip is not None:
        du = du + du_skip
    return du, ddelta, dA, dB, dC, dD, dz


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _sl(t, s, n):
    return None if t is None else t[..., s:s + n]


class _ChunkedSSM(torch.autograd.Function):
    """Chunked scan with a hand-written backward. It saves only its ``[R, L, E]`` inputs (in their
    own dtype, e.g. bf16) and recomputes the ``[R, L, E, N]`` states in backward, one block of
    channels at a time (channels are independent), so memory stays ``O(R L E)`` plus one bounded
    block; the skip ``D u`` and the gate ``silu(z)`` are fused in. Computes in ``ctype``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, keep, chunk, e_block, compiled, ctype):
        ctx.save_for_backward(u, delta, A, B, C, D, z, keep)
        ctx.chunk, ctx.e_block, ctx.compiled, ctx.ctype = chunk, e_block, compiled, ctype
        fwd = _compiled(_ssm_fwd) if compiled else _ssm_fwd
        cv = (lambda t: None if t is None else t.to(ctype))
        Bc, Cc = cv(B), cv(C)
        E = u.shape[-1]
        ys = [fwd(cv(_sl(u, s, e_block)), cv(_sl(delta, s, e_block)), cv(A[s:s + e_block]), Bc, Cc,
                  cv(None if D is None else D[s:s + e_block]), cv(_sl(z, s, e_block)), keep, chunk)
              for s in range(0, E, e_block)]
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, keep = ctx.saved_tensors
        bwd = _compiled(_ssm_bwd) if ctx.compiled else _ssm_bwd
        ct = ctx.ctype
        cv = (lambda t: None if t is None else t.to(ct))
        Bc, Cc = cv(B), cv(C)
        E, eb = u.shape[-1], ctx.e_block
        parts = [[] for _ in range(7)]
        dB = torch.zeros_like(Bc)
        dC = torch.zeros_like(Cc)
        for s in range(0, E, eb):
            r = bwd(cv(dy[..., s:s + eb]).contiguous(), cv(_sl(u, s, eb)), cv(_sl(delta, s, eb)), cv(A[s:s + eb]),
                    Bc, Cc, cv(None if D is None else D[s:s + eb]), cv(_sl(z, s, eb)), keep, ctx.chunk)
            for i in (0, 1, 2, 5, 6):
                parts[i].append(r[i])
            dB += r[3]
            dC += r[4]

        def cat(i, dim, like):
            if like is None:
                return None
            return torch.cat(parts[i], dim).to(like.dtype)

        return (cat(0, -1, u), cat(1, -1, delta), cat(2, 0, A), dB.to(B.dtype), dC.to(C.dtype),
                cat(5, 0, D), cat(6, -1, z), None, None, None, None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, starts=None, chunk: int = 16, *,
                           max_block_elems: int = 1 << 28, compiled: bool = False):
    """Chunked parallel scan with the memory-lean custom backward (see module docstring).

    Inputs may be bf16; the scan computes in float32 (float64 when ``u`` is float64) and returns
    that dtype. ``max_block_elems`` bounds the ``[R, L, E_block, N]`` temporaries (channels are
    processed in blocks); ``compiled`` runs the forward and backward cores through ``torch.compile``.
    """
    R, L, E = u.shape
    N = A.shape[1]
    ctype = torch.float64 if u.dtype == torch.float64 else torch.float32
    e_block = max(1, min(E, max_block_elems // max(1, R * L * N)))
    keep = None if starts is None else (~starts).to(ctype)
    return _ChunkedSSM.apply(u, delta, A, B, C, D, z, keep, int(chunk), e_block, bool(compiled), ctype)


def selective_scan_chunked_autograd(u, delta, A, B, C, D=None, z=None, starts=None, chunk: int = 16):
    """The same chunked algorithm differentiated by autograd (stores every state: memory-hungry)."""
    a, b = _prepare(u, delta, A, B, C, starts)
    return _finish(_states(a, b, chunk), u, C, D, z)


def _scan_mamba_ssm(u, delta, A, B, C, D, z):
    y = _mamba_ssm_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
                        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                        None if D is None else D.float(), None if z is None else z.transpose(1, 2).contiguous(),
                        delta_bias=None, delta_softplus=False)
    return y.transpose(1, 2)


def selective_scan(u_RLE, delta_RLE, A_EN, B_RLN, C_RLN, D_E=None, z_RLE=None, starts_RL=None, *,
                   impl: str = "auto", chunk: int = 16) -> torch.Tensor:
    """Run the selective scan with the chosen implementation.

    Parameters
    ----------
    u_RLE, delta_RLE : Tensor [R, L, E]
        Input and (already positive, e.g. softplus-ed) step sizes.
    A_EN : Tensor [E, N]
        Negative diagonal state matrix.
    B_RLN, C_RLN : Tensor [R, L, N]
        Input-dependent input and output projections.
    D_E : Tensor [E] or None
        Skip connection.
    z_RLE : Tensor [R, L, E] or None
        Gate; the output is multiplied by ``silu(z)``.
    starts_RL : bool Tensor [R, L] or None
        True at the first token of each packed sequence (state reset there).
    impl : {"auto", "chunked", "chunked_autograd", "compiled", "sequential", "mamba_ssm", "fused"}
        See the module docstring. ``"auto"`` uses ``"fused"`` where it can run, else ``mamba_ssm`` when
        possible, else ``"chunked"`` (``$NEUROMAMBA_SCAN`` overrides it).
    chunk : int
        Chunk length of the chunked scan.

    Returns
    -------
    Tensor [R, L, E]
        In float32 (or float64 when the inputs are float64).
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"scan impl={impl!r}; allowed: {SCAN_IMPLS}")
    if impl == "auto":
        impl = _auto_impl(u_RLE)
    if impl == "fused":  # before the interior-start test below, a host sync that would break a compiled graph
        from .kernels.selective_scan import fused_selective_scan

        return fused_selective_scan(u_RLE, delta_RLE, A_EN, B_RLN, C_RLN, D_E, z_RLE, starts_RL)
    interior = starts_RL is not None and bool(starts_RL[:, 1:].any())
    starts = starts_RL if interior else None
    if impl in ("auto", "chunked", "compiled") and not (impl == "auto" and _mamba_ssm_scan is not None
                                                         and u_RLE.is_cuda and not interior):
        # the custom Function casts per channel block itself and saves the inputs in their dtype
        return selective_scan_chunked(u_RLE, delta_RLE, A_EN, B_RLN, C_RLN, D_E, z_RLE, starts, chunk,
                                      compiled=(impl == "compiled"))
    dt = torch.float64 if u_RLE.dtype == torch.float64 else torch.float32
    u, delta, B, C = (t.to(dt) for t in (u_RLE, delta_RLE, B_RLN, C_RLN))
    A = A_EN.to(dt)
    D = None if D_E is None else D_E.to(dt)
    z = None if z_RLE is None else z_RLE.to(dt)
    kernel_ok = (_mamba_ssm_scan is not None and u.is_cuda and not interior and dt == torch.float32)
    if impl == "mamba_ssm" and not kernel_ok:
        raise ValueError("scan impl='mamba_ssm' needs the mamba-ssm package, CUDA tensors, float32 and no "
                         "interior sequence starts (the kernel has no boundary input); use 'chunked'")
    if impl == "mamba_ssm" or (impl == "auto" and kernel_ok):
        return _scan_mamba_ssm(u, delta, A, B, C, D, z)
    if impl == "sequential":
        return selective_scan_sequential(u, delta, A, B, C, D, z, starts)
    if impl == "chunked_autograd":
        return selective_scan_chunked_autograd(u, delta, A, B, C, D, z, starts, chunk)
    return selective_scan_chunked(u, delta, A, B, C, D, z, starts, chunk)


def scan_flops_per_token(d_inner: int, d_state: int) -> int:
    """FLOPs of the recurrence math per token (not of a particular parallel algorithm).

    Per (channel, state): ``delta*A`` 1, ``exp`` 1, ``(delta u) * B`` 1, ``a*h + b`` 2, ``C*h`` summed 2
    = 7; per channel: ``delta*u`` 1, ``+ D*u`` 2, gate ``* silu(z)`` 2 = 5. These elementwise FLOPs are
    invisible to ``torch.utils.flop_counter`` (it counts matmuls and convolutions only).
    """
    return 7 * d_inner * d_state + 5 * d_inner


__all__ = ["selective_scan", "fused_available", "SCAN_ENV", "selective_scan_chunked", "selective_scan_chunked_autograd", "selective_scan_sequential", "linear_recurrence_scan",
           "mamba_ssm_available", "scan_flops_per_token", "SCAN_IMPLS"]


# --------------------------------------------------------------------------------------------------
# Mamba-2 (SSD: state-space duality, Dao & Gu 2024): scalar decay per head, chunked matmul form.
# Shapes: H heads, P head dim (E = H * P), N state size shared by all heads (one group).
# --------------------------------------------------------------------------------------------------


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < k <= i} x[..., k]`` for ``i >= j``, ``-inf`` above the diagonal.

    Direct sums (masked cumsum), never differences of cumsums: exact with ``-inf`` entries (resets).
    """
    Q = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, Q)  # [..., k, j] = x_k
    strict = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0.0)
    s = torch.cumsum(xx, dim=-2)
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device), diagonal=0)
    return s.masked_fill(~lower, float("-inf"))


def ssd_sequential(x_RLHP, dt_RLH, A_H, B_RLN, C_RLN, D_H=None, starts_RL=None):
    """Reference Mamba-2 recurrence, a loop over time steps (for tests, in float64)::

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T      (per head, h: [P, N]; reset at starts)
        y_t = h_t C_t + D x_t
    """
    R, L, H, P = x_RLHP.shape
    N = B_RLN.shape[-1]
    h = x_RLHP.new_zeros(R, H, P, N)
    ys = []
    for t in range(L):
        a = torch.exp(dt_RLH[:, t] * A_H)  # [R, H]
        if starts_RL is not None:
            a = a * (~starts_RL[:, t]).to(a.dtype)[:, None]
        h = a[:, :, None, None] * h + (x_RLHP[:, t] * dt_RLH[:, t, :, None])[..., None] * B_RLN[:, t, None, None, :]
        ys.append((h * C_RLN[:, t, None, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D_H is not None:
        y = y + x_RLHP * D_H[:, None]
    return y


def _to_chunks(Q: int, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``t`` ``[R, L, ...]`` padded along time with ``fill`` to a multiple of ``Q`` and split: ``[R, c, Q, ...]``."""
    pad = (-t.shape[1]) % Q
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad), value=fill)
    return t.reshape(t.shape[0], t.shape[1] // Q, Q, *t.shape[2:])


def _from_chunks(y_RcQHP: torch.Tensor, L: int, x_RLHP: torch.Tensor, D_H) -> torch.Tensor:
    """Chunked output back to ``[R, L, H, P]`` (padding dropped) plus the skip term ``D x``."""
    R, c, Q = y_RcQHP.shape[:3]
    y = y_RcQHP.reshape(R, c * Q, *y_RcQHP.shape[3:])[:, :L]
    return y if D_H is None else y + x_RLHP * D_H[:, None]


def ssd_chunked_segsum(x_RLHP, dt_RLH, A_H, B_RLN, C_RLN, D_H=None, starts_RL=None, chunk: int = 64):
    """Chunked SSD (Mamba-2) in matmul form with sequence resets; same semantics as :func:`ssd_sequential`.

    Inside a chunk the output is ``(C B^T o L) (x dt)`` with ``L = exp(segsum(dt A))``; chunk-end
    states are carried by the Hillis-Steele scan over chunks; a reset sets ``dt A = -inf`` at the
    start token, which zeroes every decay that crosses it.
    """
    R, L, H, P = x_RLHP.shape
    Q = max(1, min(int(chunk), L))
    A_dt = dt_RLH * A_H  # [R, L, H]
    if starts_RL is not None:
        A_dt = A_dt.masked_fill(starts_RL[..., None], float("-inf"))
    xdt, B, C = (_to_chunks(Q, t) for t in (x_RLHP * dt_RLH[..., None], B_RLN, C_RLN))
    c = xdt.shape[1]
    N = B.shape[-1]
    A_dt = _to_chunks(Q, A_dt).permute(0, 3, 1, 2)  # [R, H, c, Q]
    A_pre = torch.cumsum(A_dt, dim=-1)                    # sum_{k<=l}: decay from chunk start to l
    # exclusive suffix sums computed directly (no cancellation): sum_{k>l} A_k
    A_suf = torch.flip(torch.cumsum(torch.flip(F.pad(A_dt[..., 1:], (0, 1)), (-1,)), dim=-1), (-1,))
    # 1. inside chunks
    CB = torch.einsum("rcln,rcsn->rcls", C, B)           # [R, c, Q, Q]
    M = CB.unsqueeze(1) * torch.exp(_segsum(A_dt))       # [R, H, c, Q(l), Q(s)]
    y = torch.einsum("rhcls,rcshp->rclhp", M, xdt)
    # 2. state at each chunk end from its own tokens
    Bd = B.unsqueeze(1) * torch.exp(A_suf).unsqueeze(-1)  # [R, H, c, Q, N]
    states = torch.einsum("rhcln,rclhp->rchpn", Bd, xdt)  # [R, c, H, P, N]
    # 3. carry across chunks
    a = torch.exp(A_pre[..., -1]).permute(0, 2, 1)[..., None, None].expand(R, c, H, P, N)
    _, h_end = linear_recurrence_scan(a, states, dim=1)
    h_in = _shift(h_end, 1, 1, 0.0)
    # 4. contribution of the carried state
    y_off = torch.einsum("rcln,rchpn->rclhp", C, h_in) * torch.exp(A_pre).permute(0, 2, 3, 1).unsqueeze(-1)
    return _from_chunks(y + y_off, L, x_RLHP, D_H)


def ssd_chunked_seg(x_RLHP, dt_RLH, A_H, B_RLN, C_RLN, D_H=None, starts_RL=None, chunk: int = 64):
    """Chunked SSD with segment ids (as mamba-ssm's ``seq_idx``); same semantics as :func:`ssd_sequential`.

    Decays inside a chunk are differences of the chunk's cumsum of ``dt A`` restarted at each reset (at most
    ``chunk`` terms, so float32 keeps ~1e-6 relative accuracy), computed from ``[chunk]`` vectors per head instead of
    :func:`ssd_chunked_segsum`'s ``[chunk, chunk]`` masked cumsum; a reset is a mask: token ``s`` feeds token
    ``l`` only when both are in the same segment (``cumsum(starts)``), and a chunk's entering state feeds
    only the tokens before the chunk's first reset.
    """
    R, L, H, P = x_RLHP.shape
    Q = max(1, min(int(chunk), L))
    if starts_RL is None:
        seg = torch.zeros(R, L, dtype=torch.int32, device=x_RLHP.device)
    else:
        seg = torch.cumsum(starts_RL.to(torch.int32), dim=1)
    seg = _to_chunks(Q, seg, fill=-1)  # [R, c, Q]; padded tokens: a segment of their own (after the row)
    xdt, B, C, A_dt = (_to_chunks(Q, t) for t in (x_RLHP * dt_RLH[..., None], B_RLN, C_RLN, dt_RLH * A_H))
    c, N = xdt.shape[1], B.shape[-1]
    # the segment the state entering each chunk belongs to: that of the previous chunk's last token
    seg_in = torch.cat([seg.new_zeros(R, 1), seg[:, :-1, -1]], dim=1)  # [R, c]
    # in-chunk cumsum of dt A restarted at each reset (a scan whose carry is cut by an exact 0): token l's sum
    # holds only its own segment's terms, so a neighbouring sample cannot change even its rounding
    cut = (seg[..., 1:] == seg[..., :-1]).to(A_dt.dtype)  # [R, c, Q - 1]: 0 where a segment starts
    cut = F.pad(cut, (1, 0)).unsqueeze(1).expand(R, H, c, Q)
    _, A_cs = linear_recurrence_scan(cut, A_dt.permute(0, 3, 1, 2), dim=-1)  # [R, H, c, Q]
    same = seg[..., :, None] == seg[..., None, :]  # [R, c, Q(l), Q(s)]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x_RLHP.device).tril()
    keep = (same & causal).unsqueeze(1)  # [R, 1, c, Q, Q]
    diff = A_cs[..., :, None] - A_cs[..., None, :]
    Lmat = torch.where(keep, torch.exp(torch.where(keep, diff, 0.0)), 0.0)
    CB = torch.einsum("rcln,rcsn->rcls", C, B)
    y = torch.einsum("rhcls,rcshp->rclhp", CB.unsqueeze(1) * Lmat, xdt)
    # chunk-end states from the chunk's own tokens of the last token's segment
    end_same = (seg == seg[..., -1:]).unsqueeze(1)  # [R, 1, c, Q]
    dec_end = torch.where(end_same, torch.exp(torch.where(end_same, A_cs[..., -1:] - A_cs, 0.0)), 0.0)
    states = torch.einsum("rhcl,rcln,rclhp->rchpn", dec_end, B, xdt)
    # carry across chunks: the entering state survives to the chunk's end only if no reset inside
    through = (seg[..., -1] == seg_in)  # [R, c]
    a = (torch.exp(A_cs[..., -1]) * through.unsqueeze(1)).permute(0, 2, 1)[..., None, None].expand(R, c, H, P, N)
    _, h_end = linear_recurrence_scan(a, states, dim=1)
    h_in = _shift(h_end, 1, 1, 0.0)
    in_same = (seg == seg_in[..., None]).unsqueeze(1)  # [R, 1, c, Q]
    dec_in = torch.where(in_same, torch.exp(A_cs), 0.0).permute(0, 2, 3, 1).unsqueeze(-1)  # [R, c, Q, H, 1]
    y_off = torch.einsum("rcln,rchpn->rclhp", C, h_in) * dec_in
    return _from_chunks(y + y_off, L, x_RLHP, D_H)


#: environment variable choosing the SSD form for Mamba-2 mixers built after it is set: "seg" (default,
#: :func:`ssd_chunked_seg`) or "segsum" (:func:`ssd_chunked_segsum`)
SSD_ENV = "NEUROMAMBA_SSD"
SSD_IMPLS = {"seg": ssd_chunked_seg, "segsum": ssd_chunked_segsum}


def ssd_impl(name: str | None = None):
    """The SSD function for ``name`` (default: ``$NEUROMAMBA_SSD``, else "seg")."""
    name = name or os.environ.get(SSD_ENV) or "seg"
    if name not in SSD_IMPLS:
        raise ValueError(f"{SSD_ENV}={name!r}; allowed: {sorted(SSD_IMPLS)}")
    return SSD_IMPLS[name]


def ssd_chunked(x_RLHP, dt_RLH, A_H, B_RLN, C_RLN, D_H=None, starts_RL=None, chunk: int = 64):
    """Chunked SSD in the form :func:`ssd_impl` picks (see :data:`SSD_ENV`)."""
    return ssd_impl()(x_RLHP, dt_RLH, A_H, B_RLN, C_RLN, D_H, starts_RL, chunk)


def ssd_flops_per_token(d_inner: int, d_state: int, chunk: int) -> int:
    """Matmul FLOPs of :func:`ssd_chunked` per (padded) token: ``C B^T`` 2QN, the masked
    intra-chunk product 2QE, chunk states 2EN, carried-state output 2EN (all counter-visible)."""
    return 2 * chunk * d_state + 2 * chunk * d_inner + 4 * d_inner * d_state
