"""Window attention for short windows and small heads as two Triton kernels (``SwiftConfig.attn_impl="triton"``).

Why: the SwiFT v1 reference configuration (51M, 96^3 x 20, batch 16) attends within 256-token windows (4x4x4x4)
with head dim 16 in its first three stages. With a head dim that small the matmuls are cheap and the exponentials
bound the kernels. FlexAttention's backward (an FA2-style template) computes the probabilities twice, once in its
dQ loop and once in its dK/dV loop; with 256 tokens a whole window fits one program, so here

* the forward kernel runs one program per (window, head): K and V are loaded once, and per block of queries the
  whole score row is on chip (an exact softmax, no running rescale); it writes O and the log-sum-exp;
* the backward kernel runs one program per (window, head) too: per block of queries it recomputes P once from the
  log-sum-exp and produces dQ (stored) and its share of dK and dV, accumulated in registers over the window; no
  atomics, no second pass.

Both read q, k and v straight from the qkv projection's output ``[S, N, 3 * H * E]`` and write O as ``[S, N, H * E]``
(the output projection's input) and the gradient as ``[S, N, 3 * H * E]``, so no head permute is materialised.
Swin's shifted-window regions are the two small tables of :func:`region_tables` (one bit per shifted axis), the
same rule as ``layers.region_mask_mod``: two tokens may attend iff ``(tok[q] ^ tok[k]) & win[window] == 0``.

Semantics equal ``scaled_dot_product_attention`` with that mask: scores and softmax in float32, the probabilities
and their gradient rounded to the compute dtype (bf16/fp16) before their matmuls, as FlashAttention does; O and the
gradient in the compute dtype. It is a ``torch.library`` custom op, so compiled blocks call it as one opaque kernel,
and it runs eagerly too. Used where :func:`usable` holds (CUDA or the Triton interpreter, bf16/fp16, at most
``MAX_TOKENS`` tokens per window, head dim a power of two from 16 to ``MAX_HEAD_DIM``); elsewhere the SDPA or
FlexAttention path runs. Triton 3.9's interpreter gets ``tl.dot`` of bf16 tiles wrong, so CPU tests use fp16.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .triton_launch import available, compute_dtype, tuned

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: most tokens per window (the score rows of a query block are held on chip, padded to a power of two)
MAX_TOKENS = 256
#: widest head the kernels take (a power of two >= 16, the smallest ``tl.dot`` operand)
MAX_HEAD_DIM = 64
LOG2E = 1.4426950408889634


class RegionTables(NamedTuple):
    """Swin's shifted-window regions for the kernels: ``tok`` int32 ``[N]`` (bit ``j``: the token lies past the cut
    of shifted axis ``j`` inside its window), ``win`` int32 ``[W]`` (bit ``j``: the window is the last one along
    shifted axis ``j``, the only one that holds two regions there). Window ``s`` of a batch is window ``s % W``."""
    tok: torch.Tensor
    win: torch.Tensor


def region_bits(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                device: torch.device | None = None) -> RegionTables:
    """The two region tables of Swin's cyclic shift for a map ``dims`` (windows in ``window_partition`` order)."""
    counts = [g // w for g, w in zip(dims, window)]
    n = torch.arange(math.prod(window), device=device)
    wl = torch.arange(math.prod(counts), device=device)
    tok = torch.zeros_like(n, dtype=torch.int32)
    win = torch.zeros_like(wl, dtype=torch.int32)
    for j, a in enumerate(a for a in range(len(dims)) if shift[a]):
        offset = (n // math.prod(window[a + 1:])) % window[a]
        tok |= (offset >= window[a] - shift[a]).int() << j
        win |= (((wl // math.prod(counts[a + 1:])) % counts[a]) == counts[a] - 1).int() << j
    return RegionTables(tok, win)


@functools.lru_cache(maxsize=32)
def region_tables(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                  device: torch.device) -> RegionTables:
    """Cached :func:`region_bits` (build it outside compiled code and pass it in, as the encoder's stage loop does)."""
    return region_bits(dims, window, shift, device)


if triton is not None:

    @triton.jit
    def _attn_fwd_kernel(qkv_ptr, o_ptr, lse_ptr, tok_ptr, win_ptr, W, qk_scale, H: tl.constexpr, E: tl.constexpr,
                         N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr,
                         EVEN: tl.constexpr):
        """Program ``s * H + h``: window ``s``, head ``h``. ``lse`` is in log2 units (scores times ``qk_scale``,
        which includes log2(e)). With ``MASKED``, a token's region is ``tok & win[s % W]`` (one compare per score)."""
        pid = tl.program_id(0)
        s = pid // H
        h = pid % H
        D: tl.constexpr = H * E
        base = tl.cast(s, tl.int64) * (N * 3 * D) + h * E
        obase = tl.cast(s, tl.int64) * (N * D) + h * E
        rn = tl.arange(0, NP)
        re = tl.arange(0, E)
        nmask = rn < N
        kt = tl.load(qkv_ptr + base + D + rn[None, :] * (3 * D) + re[:, None], mask=nmask[None, :], other=0.0)
        v = tl.load(qkv_ptr + base + 2 * D + rn[:, None] * (3 * D) + re[None, :], mask=nmask[:, None], other=0.0)
        if MASKED:
            wbits = tl.load(win_ptr + s % W)
            rk = tl.load(tok_ptr + rn, mask=nmask, other=-1) & wbits
            if not EVEN:
                rk = tl.where(nmask, rk, -1)  # padded keys match no query
        for m0 in range(0, N, BM):
            rm = m0 + tl.arange(0, BM)
            mmask = rm < N
            q = tl.load(qkv_ptr + base + rm[:, None] * (3 * D) + re[None, :], mask=mmask[:, None], other=0.0)
            sc = tl.dot(q, kt) * qk_scale
            if MASKED:
                if wbits != 0:  # only windows at the end of a shifted axis hold several regions
                    rq = tl.load(tok_ptr + rm, mask=mmask, other=0) & wbits
                    sc = tl.where(rq[:, None] == rk[None, :], sc, float("-inf"))
                elif not EVEN:
                    sc = tl.where(nmask[None, :], sc, float("-inf"))
            elif not EVEN:
                sc = tl.where(nmask[None, :], sc, float("-inf"))
            m = tl.max(sc, 1)
            p = tl.math.exp2(sc - m[:, None])
            l = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v) / l[:, None]
            tl.store(o_ptr + obase + rm[:, None] * D + re[None, :], o.to(o_ptr.dtype.element_ty), mask=mmask[:, None])
            tl.store(lse_ptr + tl.cast(pid, tl.int64) * N + rm, m + tl.math.log2(l), mask=mmask)

    @triton.jit
    def _attn_bwd_kernel(qkv_ptr, o_ptr, do_ptr, lse_ptr, dqkv_ptr, tok_ptr, win_ptr, W, qk_scale, scale,
                         H: tl.constexpr, E: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                         MASKED: tl.constexpr, EVEN: tl.constexpr, DQT: tl.constexpr):
        """Program ``s * H + h``, in the transposed orientation (keys along rows), so that no register tile needs a
        transpose: per block of queries, P^T from the saved log-sum-exp, then dV += P^T dO,
        dS^T = P^T (V dO^T - rowsum(dO O)), dK += scale dS^T Q and dQ (stored) as ``scale K^T dS^T`` (``DQT``: a dot
        with only E rows) or ``scale (dS^T)^T K`` (one register transpose); dK and dV are stored at the end.
        Transposed operands are loaded transposed from memory."""
        pid = tl.program_id(0)
        s = pid // H
        h = pid % H
        D: tl.constexpr = H * E
        base = tl.cast(s, tl.int64) * (N * 3 * D) + h * E
        obase = tl.cast(s, tl.int64) * (N * D) + h * E
        rn = tl.arange(0, NP)
        re = tl.arange(0, E)
        nmask = rn < N
        k = tl.load(qkv_ptr + base + D + rn[:, None] * (3 * D) + re[None, :], mask=nmask[:, None], other=0.0)
        if DQT:
            kt = tl.load(qkv_ptr + base + D + rn[None, :] * (3 * D) + re[:, None], mask=nmask[None, :], other=0.0)
        v = tl.load(qkv_ptr + base + 2 * D + rn[:, None] * (3 * D) + re[None, :], mask=nmask[:, None], other=0.0)
        if MASKED:
            wbits = tl.load(win_ptr + s % W)
            rk = tl.load(tok_ptr + rn, mask=nmask, other=-1) & wbits
            if not EVEN:
                rk = tl.where(nmask, rk, -1)
        dk = tl.zeros((NP, E), dtype=tl.float32)
        dv = tl.zeros((NP, E), dtype=tl.float32)
        for m0 in range(0, N, BM):
            rm = m0 + tl.arange(0, BM)
            mmask = rm < N
            q = tl.load(qkv_ptr + base + rm[:, None] * (3 * D) + re[None, :], mask=mmask[:, None], other=0.0)
            qt = tl.load(qkv_ptr + base + rm[None, :] * (3 * D) + re[:, None], mask=mmask[None, :], other=0.0)
            orow = obase + rm[:, None] * D + re[None, :]
            do = tl.load(do_ptr + orow, mask=mmask[:, None], other=0.0)
            dot = tl.load(do_ptr + obase + rm[None, :] * D + re[:, None], mask=mmask[None, :], other=0.0)
            o = tl.load(o_ptr + orow, mask=mmask[:, None], other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            lse = tl.load(lse_ptr + tl.cast(pid, tl.int64) * N + rm, mask=mmask, other=0.0)
            pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # [keys, queries]
            if MASKED:
                if wbits != 0:
                    rq = tl.load(tok_ptr + rm, mask=mmask, other=0) & wbits
                    pt = tl.where(rk[:, None] == rq[None, :], pt, 0.0)
                elif not EVEN:
                    pt = tl.where(nmask[:, None], pt, 0.0)
            elif not EVEN:
                pt = tl.where(nmask[:, None], pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dst = (pt * (tl.dot(v, dot) - delta[None, :])).to(q.dtype)
            dk = tl.dot(dst, q, dk)
            if DQT:
                dqt = tl.dot(kt, dst) * scale  # [E, queries]
                tl.store(dqkv_ptr + base + rm[None, :] * (3 * D) + re[:, None], dqt.to(dqkv_ptr.dtype.element_ty),
                         mask=mmask[None, :])
            else:
                dq = tl.dot(tl.trans(dst), k) * scale  # [queries, E]
                tl.store(dqkv_ptr + base + rm[:, None] * (3 * D) + re[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                         mask=mmask[:, None])
        kv = base + rn[:, None] * (3 * D) + re[None, :]
        tl.store(dqkv_ptr + kv + D, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=nmask[:, None])
        tl.store(dqkv_ptr + kv + 2 * D, dv.to(dqkv_ptr.dtype.element_ty), mask=nmask[:, None])


#: launch configurations tried on the first call per shape and kernel (``_tuned``): query rows per block (BM), warps,
#: software-pipelining stages.
CONFIGS = {
    "fwd": [dict(BM=bm, num_warps=w, num_stages=st) for (bm, w, st) in
            ((64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 4, 2))],
    "bwd": [dict(BM=bm, num_warps=w, num_stages=st, DQT=dqt) for (bm, w, st, dqt) in
            ((32, 4, 3, True), (32, 4, 2, True), (32, 4, 4, True), (64, 4, 3, True), (32, 4, 3, False),
             (64, 4, 3, False), (64, 8, 2, False))],
}
_TUNED: dict = {}  # (kernel, shape key) -> the fastest configuration
TIMINGS: dict = {}  # (kernel, shape key) -> {configuration: ms}, for benchmarks


def _configs(kind: str, tokens: int) -> list[dict]:
    """``CONFIGS[kind]`` for windows of ``tokens``: query blocks no taller than the padded window."""
    np_ = max(16, triton.next_power_of_2(tokens))
    out = []
    for c in CONFIGS[kind]:
        c = {**c, "BM": min(c["BM"], np_)}
        if c not in out:
            out.append(c)
    return out


def _tuned(kind: str, key: tuple, run) -> dict:
    """The launch configuration for ``kind`` at ``key``: on CUDA the fastest of ``CONFIGS[kind]`` (timed once per
    shape), else the first."""
    return tuned(_TUNED, TIMINGS, (kind, key), _configs(kind, key[1]), run, f"window attention {kind} kernel",
                 key[-1])


def _check(qkv: torch.Tensor, num_heads: int, tok: Optional[torch.Tensor], win: Optional[torch.Tensor]) -> None:
    """The kernels index raw pointers: shapes that do not fit are refused here."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv shape {tuple(qkv.shape)}: expected [windows, tokens, 3 * heads * head_dim] with "
                         f"{num_heads} heads")
    S, N, C = qkv.shape
    E = C // (3 * num_heads)
    if not fits(max(N, 1), E):  # (no tokens: nothing to index)
        raise ValueError(f"{N} tokens per window and head dim {E}; the kernels take at most {MAX_TOKENS} tokens and "
                         f"a power-of-two head dim from 16 to {MAX_HEAD_DIM}")
    if (tok is None) != (win is None):
        raise ValueError("region tables: pass both tok and win, or neither")
    if tok is not None and (tok.shape != (N,) or win.dim() != 1 or S % win.shape[0]
                            or tok.dtype != torch.int32 or win.dtype != torch.int32):
        raise ValueError(f"region tables tok {tuple(tok.shape)} {tok.dtype}, win {tuple(win.shape)} {win.dtype}: "
                         f"expected int32 [{N}] and int32 [W] with W dividing the {S} windows")


def _launch_args(qkv: torch.Tensor, num_heads: int, tok, win) -> tuple:
    S, N, C = qkv.shape
    E = C // (3 * num_heads)
    masked = tok is not None
    dummy = qkv.new_zeros(1, dtype=torch.int32) if not masked else None
    NP = max(16, triton.next_power_of_2(N))
    key = (S, N, num_heads, E, masked, qkv.dtype, qkv.device.type)
    consts = dict(H=num_heads, E=E, N=N, NP=NP, MASKED=masked, EVEN=NP == N)
    tables = (tok, win, win.shape[0]) if masked else (dummy, dummy, 1)
    return S, N, E, key, consts, tables


def _forward(qkv: torch.Tensor, num_heads: int, scale: float, tok, win) -> tuple[torch.Tensor, torch.Tensor]:
    _check(qkv, num_heads, tok, win)
    S, N, E, key, consts, (tk, wn, W) = _launch_args(qkv, num_heads, tok, win)
    o = qkv.new_empty(S, N, num_heads * E)
    lse = torch.empty(S * num_heads, N, device=qkv.device, dtype=torch.float32)
    if S == 0:
        return o, lse

    def run(cfg):
        _attn_fwd_kernel[(S * num_heads,)](qkv, o, lse, tk, wn, W, scale * LOG2E, BM=cfg["BM"],
                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **consts)

    run(_tuned("fwd", key, run))
    return o, lse


def _backward(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float,
              tok, win) -> torch.Tensor:
    S, N, E, key, consts, (tk, wn, W) = _launch_args(qkv, num_heads, tok, win)
    dqkv = torch.empty_like(qkv)
    if S == 0:
        return dqkv

    def run(cfg):
        _attn_bwd_kernel[(S * num_heads,)](qkv, o, do, lse, dqkv, tk, wn, W, scale * LOG2E, scale, BM=cfg["BM"],
                                           DQT=cfg["DQT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                           **consts)

    run(_tuned("bwd", key, run))
    return dqkv


if triton is not None:

    @torch.library.custom_op("neurox::window_attn", mutates_args=())
    def window_attn_op(qkv: torch.Tensor, num_heads: int, scale: float, tok: Optional[torch.Tensor],
                       win: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(qkv, num_heads, scale, tok, win)

    @window_attn_op.register_fake
    def _(qkv, num_heads, scale, tok, win):
        S, N, C = qkv.shape
        return qkv.new_empty(S, N, C // 3), qkv.new_empty(S * num_heads, N, dtype=torch.float32)

    @torch.library.custom_op("neurox::window_attn_backward", mutates_args=())
    def window_attn_backward_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                num_heads: int, scale: float, tok: Optional[torch.Tensor],
                                win: Optional[torch.Tensor]) -> torch.Tensor:
        return _backward(do.contiguous(), qkv, o, lse, num_heads, scale, tok, win)

    @window_attn_backward_op.register_fake
    def _(do, qkv, o, lse, num_heads, scale, tok, win):
        return torch.empty_like(qkv)

    def _setup_context(ctx, inputs, output):
        qkv, num_heads, scale, tok, win = inputs
        o, lse = output
        ctx.save_for_backward(qkv, o, lse, tok, win)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.mark_non_differentiable(lse)

    def _backward_rule(ctx, do, dlse):
        qkv, o, lse, tok, win = ctx.saved_tensors
        return window_attn_backward_op(do, qkv, o, lse, ctx.num_heads, ctx.scale, tok, win), None, None, None, None

    window_attn_op.register_autograd(_backward_rule, setup_context=_setup_context)


def fits(tokens: int, head_dim: int) -> bool:
    """Whether the kernels take windows of ``tokens`` tokens and heads of ``head_dim``."""
    return 0 < tokens <= MAX_TOKENS and 16 <= head_dim <= MAX_HEAD_DIM and not head_dim & (head_dim - 1)


def usable(x: torch.Tensor, tokens: int, head_dim: int) -> bool:
    """Whether the kernels can run the window attention of input ``x`` (module docstring)."""
    return available(x.device) and compute_dtype(x) in (torch.bfloat16, torch.float16) and fits(tokens, head_dim)


def window_attention(qkv_SNC: torch.Tensor, num_heads: int, scale: float,
                     tables: RegionTables | None = None) -> torch.Tensor:
    """Attention within each of ``S`` windows: ``qkv`` ``[S, N, 3 * H * E]`` (the qkv projection's output, q, k, v
    each ``[H, E]`` per token) -> ``[S, N, H * E]`` in the compute dtype, masked to Swin's regions if ``tables``."""
    tok, win = (None, None) if tables is None else tables
    o, _ = window_attn_op(qkv_SNC.contiguous(), num_heads, float(scale), tok, win)
    return o
