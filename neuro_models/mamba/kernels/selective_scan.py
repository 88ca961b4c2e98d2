"""Fused Mamba-1 selective scan in Triton (forward and backward), with packed-sequence resets.

Semantics are those of :func:`neuro_models.mamba.scan.selective_scan` (per channel ``e``, state ``n``)::

    a_t = exp(delta_t * A) (0 where starts_t: the state resets at each packed sample's first token)
    h_t = a_t * h_{t-1} + delta_t * u_t * B_t
    y_t = (sum_n C_t[n] h_t[e, n] + D u_t) * silu(z_t)

Gap tokens (the ``d_conv - 1`` zero tokens before each packed sample, and the row's round-up) are ordinary
tokens to the scan, exactly as in the chunked scan; the reset at the next sample's first token cuts them off.

Layout: ``u, delta, z`` are ``[R, L, E]``, ``B, C`` are ``[R, L, N]``, ``A`` is ``[E, N]``; inputs may be
bf16/fp16/fp32 (mixed: the model passes an fp32 ``delta`` with bf16 ``u``), the state and every sum are fp32,
the output ``y`` is fp32 (like the chunked scan's) and each gradient comes back in its input's dtype.

Algorithm (time is cut into chunks of ``T_CHUNK`` tokens; programs are (row x chunk, channel block); each
program loops over its chunk's tokens with the state ``h[BLOCK_E, N]`` in registers):

forward
  1. ``_chunk_fwd``: each chunk's end state from a zero start, and the product of its decays ``P``.
  2. ``_carry``: a short loop over chunks per (row, channel block): ``h_in[c+1] = P[c] h_in[c] + end[c]``.
  3. ``_scan_out``: each chunk again from ``h_in[c]``, writing ``y``. Saved for backward: the ``[R, L, E]``
     inputs and ``h_in`` (``[R, L / T_CHUNK, E, N]`` fp32, 1/T_CHUNK of the states).
backward (``dh_t = g_t + a_{t+1} dh_{t+1}``, ``g_t = C_t dy_t silu(z_t)``)
  1. ``_chunk_bwd``: each chunk's reverse scan from a zero carry: ``a_first dh_first`` and ``P``.
  2. ``_carry`` in reverse: the carry ``a_{t+1} dh_{t+1}`` entering each chunk from the right.
  3. ``_scan_bwd``: per chunk, a forward loop from ``h_in[c]`` writes the chunk's states into a scratch
     buffer (read back by the same program, so mostly from L2), then a reverse loop forms every gradient;
     ``dA, dD`` are summed per program and ``dB, dC`` per channel block, then reduced in PyTorch
     (deterministic, no atomics).

The scratch buffer holds ``R L E N`` fp32 values (1.5 GB for one 3.1M-model layer at 59,664 tokens) for the
duration of one layer's backward. A configuration with ``BWD_BLOCK_E`` replaces step 3 by ``_scan_bwd_tile``: each
chunk as ``[channels, tokens]`` tiles, per state ``n`` the states from an associative scan from ``h_in[c]`` and
``dh`` from one over the reversed tokens (flipped back), no scratch buffer. On one H100 (session 17, that layer) it
is 5.03-5.07 ms fwd+bwd against 4.56-4.90 for the token loop, at 1.34 GiB peak against 2.25; through ``train()`` at
91M the two ran at the same rate (6.39 / 6.41 samples/s), so the token loop stays the default and the tile
backward is the memory-lean choice (``NEUROMAMBA_SCAN_CONFIG=4``).

Registered as ``torch.library`` custom ops (``neuromamba::selective_scan_fwd`` / ``_bwd``) with fake
(meta) implementations and autograd, so ``torch.compile`` keeps one graph around them.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: the Triton interpreter is on (read once, at import: Triton reads it when it decorates the kernels)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: launch configurations. Every one is checked against the float64 reference under the interpreter
#: (tests/models/test_mamba_scan_triton.py) and timed by benchmarks/mamba_scan_benchmark.py. On one H100 (session
#: 15, the 3.1M model's layer: 59,664 packed tokens, E=384, N=16) forward+backward took 4.99 / 4.93 / 4.64 / 4.69 ms
#: for these four (the chunked scan: 80.2 ms): :data:`DEFAULT_CONFIG` is the fastest.
CONFIGS: list[dict] = [
    {"T_CHUNK": 128, "BLOCK_E": 32, "num_warps": 4},
    {"T_CHUNK": 64, "BLOCK_E": 32, "num_warps": 4},
    {"T_CHUNK": 256, "BLOCK_E": 16, "num_warps": 2},
    {"T_CHUNK": 32, "BLOCK_E": 64, "num_warps": 4},
    # the memory-lean backward (``_scan_bwd_tile``: associative scans over each chunk, no state buffer): on one H100
    # (session 17, same layer) 5.03-5.07 ms against 4.56-4.90 for the four above, at 1.34 GiB peak against 2.25
    {"T_CHUNK": 32, "BLOCK_E": 64, "num_warps": 4, "BWD_BLOCK_E": 8, "BWD_WARPS": 1},
    # one warp per program (session 19): no cross-warp barriers in the token loops' reductions. Same layer, one H100,
    # beside the chunked scan's 80.4 ms: 3.51 ms fwd+bwd (0.81 fwd) against 4.54 for index 2 (1.02 fwd), 22.9x.
    # Other one-warp shapes measured: {128, 16} 3.53, {128, 32} 3.70, {256, 32} 3.70, {512, 32} 4.42 ms
    {"T_CHUNK": 256, "BLOCK_E": 16, "num_warps": 1},
]

#: index of the default configuration in :data:`CONFIGS` (measured fastest on an H100, above)
DEFAULT_CONFIG = 5

#: ``NEUROMAMBA_SCAN_CONFIG=<index into CONFIGS>`` picks another default configuration; a JSON object (e.g.
#: ``{"T_CHUNK": 256, "BLOCK_E": 32, "num_warps": 1}``) gives a launch configuration not in CONFIGS, for timing a
#: candidate through the model and ``train()`` before it enters the list
_ENV_CONFIG = "NEUROMAMBA_SCAN_CONFIG"
_KEYS = {"T_CHUNK", "BLOCK_E", "num_warps"}
_OPTIONAL_KEYS = {"BWD_BLOCK_E", "BWD_WARPS"}


def available(device: torch.device) -> bool:
    """Whether the fused scan can run for tensors on ``device``: CUDA with Triton installed, or CPU tensors under
    the Triton interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def check_config(cfg: dict) -> dict:
    """``cfg`` if it is a launch configuration: ``T_CHUNK``, ``BLOCK_E`` and ``num_warps`` (and optionally
    ``BWD_BLOCK_E``, ``BWD_WARPS``), each a power-of-two int (``BWD_BLOCK_E`` may be 0: the state-buffer
    backward); raises ``ValueError`` naming the problem otherwise."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a scan launch configuration is a dict, got {type(cfg).__name__}")
    missing, unknown = _KEYS - set(cfg), set(cfg) - _KEYS - _OPTIONAL_KEYS
    if missing or unknown:
        raise ValueError(f"scan launch configuration {cfg}: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                         f"keys: {sorted(_KEYS)} and optionally {sorted(_OPTIONAL_KEYS)}")
    for k, v in cfg.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v & (v - 1)) or (v == 0 and k != "BWD_BLOCK_E"):
            raise ValueError(f"scan launch configuration {cfg}: {k}={v!r} must be a power of two")
    return cfg


def default_config() -> dict:
    """``CONFIGS[DEFAULT_CONFIG]``, or what ``$NEUROMAMBA_SCAN_CONFIG`` names: an index into CONFIGS or a JSON
    launch configuration (:func:`check_config`)."""
    k = os.environ.get(_ENV_CONFIG)
    if k is None:
        return CONFIGS[DEFAULT_CONFIG]
    if k.lstrip().startswith("{"):
        try:
            return check_config(json.loads(k))
        except json.JSONDecodeError as e:
            raise ValueError(f"{_ENV_CONFIG}={k!r}: not JSON ({e})") from None
    if not k.isdigit() or int(k) >= len(CONFIGS):
        raise ValueError(f"{_ENV_CONFIG}={k!r}: must be an index into CONFIGS (0..{len(CONFIGS) - 1}) or a JSON "
                         f"launch configuration")
    return CONFIGS[int(k)]


if triton is not None:

    @triton.jit
    def _decay(d, A, st_ptr, row, mE, HAS_STARTS: tl.constexpr):
        """``exp(delta A)`` for one token, 0 at a sequence start (the flag is read as a ``[BLOCK_E]`` vector of
        one address: the Triton interpreter rejects masks made from a scalar comparison)."""
        a = tl.exp(d[:, None] * A)
        if HAS_STARTS:
            s = tl.load(st_ptr + row + 0 * mE.to(tl.int64), mask=mE, other=0)
            a = tl.where(s[:, None] != 0, 0.0, a)
        return a

    @triton.jit
    def _chunk_fwd(u_ptr, dl_ptr, A_ptr, B_ptr, st_ptr, end_ptr, P_ptr, L, E, N, nC,
                   HAS_STARTS: tl.constexpr, T_CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (r * nC + c, e block): the chunk's end state from a zero start, and its decay product."""
        rc = tl.program_id(0)
        r = rc // nC
        c = rc % nC
        re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        rn = tl.arange(0, BLOCK_N)
        me = re < E
        mn = rn < N
        men = me[:, None] & mn[None, :]
        A = tl.load(A_ptr + re[:, None] * N + rn[None, :], mask=men, other=0.0).to(tl.float32)
        h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        P = tl.full((BLOCK_E, BLOCK_N), 1.0, dtype=tl.float32)
        for i in range(T_CHUNK):
            t = c * T_CHUNK + i
            mE = me & ((t + 0 * re) < L)  # vector masks (see _decay)
            mN = mn & ((t + 0 * rn) < L)
            row = (r * L + t).to(tl.int64)
            u = tl.load(u_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            d = tl.load(dl_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            a = _decay(d, A, st_ptr, row, mE, HAS_STARTS)
            h = a * h + (d * u)[:, None] * b[None, :]
            P = P * a
        off = rc.to(tl.int64) * E * N + re[:, None] * N + rn[None, :]
        tl.store(end_ptr + off, h, mask=men)
        tl.store(P_ptr + off, P, mask=men)

    @triton.jit
    def _carry_load(loc_ptr, P_ptr, r, k, nC, E, N, tile, men, re, REVERSE: tl.constexpr):
        """Offsets, mask, ``P`` and ``loc`` of the ``k``-th chunk in walking order (masked past the last chunk)."""
        if REVERSE:
            c = nC - 1 - k
        else:
            c = k
        m = men & ((k + 0 * re) < nC)[:, None]  # vector mask (see _decay)
        off = (r * nC + c).to(tl.int64) * E * N + tile
        return off, m, tl.load(P_ptr + off, mask=m, other=0.0), tl.load(loc_ptr + off, mask=m, other=0.0)

    @triton.jit
    def _carry(loc_ptr, P_ptr, out_ptr, E, N, nC, REVERSE: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_N: tl.constexpr):
        """Program (r, e block): ``out[c] = carry entering chunk c``; ``carry' = P[c] carry + loc[c]``, over chunks
        in order (states) or in reverse (the backward's ``a dh`` carry). Four chunks per iteration: their loads
        are issued together, so the serial loop waits for one memory latency per four chunks, not per chunk."""
        r = tl.program_id(0)
        re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        rn = tl.arange(0, BLOCK_N)
        men = (re < E)[:, None] & (rn < N)[None, :]
        tile = re[:, None] * N + rn[None, :]
        run = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        for k in range(0, nC, 4):
            o0, m0, p0, l0 = _carry_load(loc_ptr, P_ptr, r, k, nC, E, N, tile, men, re, REVERSE)
            o1, m1, p1, l1 = _carry_load(loc_ptr, P_ptr, r, k + 1, nC, E, N, tile, men, re, REVERSE)
            o2, m2, p2, l2 = _carry_load(loc_ptr, P_ptr, r, k + 2, nC, E, N, tile, men, re, REVERSE)
            o3, m3, p3, l3 = _carry_load(loc_ptr, P_ptr, r, k + 3, nC, E, N, tile, men, re, REVERSE)
            tl.store(out_ptr + o0, run, mask=m0)
            run = p0 * run + l0
            tl.store(out_ptr + o1, run, mask=m1)
            run = p1 * run + l1
            tl.store(out_ptr + o2, run, mask=m2)
            run = p2 * run + l2
            tl.store(out_ptr + o3, run, mask=m3)
            run = p3 * run + l3

    @triton.jit
    def _scan_out(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, st_ptr, hin_ptr, y_ptr, L, E, N, nC,
                  HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_STARTS: tl.constexpr, T_CHUNK: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (r * nC + c, e block): the chunk's outputs from its entering state ``h_in[c]``."""
        rc = tl.program_id(0)
        r = rc // nC
        c = rc % nC
        re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        rn = tl.arange(0, BLOCK_N)
        me = re < E
        mn = rn < N
        men = me[:, None] & mn[None, :]
        A = tl.load(A_ptr + re[:, None] * N + rn[None, :], mask=men, other=0.0).to(tl.float32)
        h = tl.load(hin_ptr + rc.to(tl.int64) * E * N + re[:, None] * N + rn[None, :], mask=men, other=0.0)
        if HAS_D:
            Dv = tl.load(D_ptr + re, mask=me, other=0.0).to(tl.float32)
        for i in range(T_CHUNK):
            t = c * T_CHUNK + i
            mE = me & ((t + 0 * re) < L)  # vector masks (see _decay)
            mN = mn & ((t + 0 * rn) < L)
            row = (r * L + t).to(tl.int64)
            u = tl.load(u_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            d = tl.load(dl_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            cc = tl.load(C_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            a = _decay(d, A, st_ptr, row, mE, HAS_STARTS)
            h = a * h + (d * u)[:, None] * b[None, :]
            y = tl.sum(h * cc[None, :], axis=1)
            if HAS_D:
                y = y + Dv * u
            if HAS_Z:
                zz = tl.load(z_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(y_ptr + row * E + re, y, mask=mE)

    @triton.jit
    def _chunk_bwd(dy_ptr, dl_ptr, A_ptr, C_ptr, z_ptr, st_ptr, loc_ptr, P_ptr, L, E, N, nC,
                   HAS_Z: tl.constexpr, HAS_STARTS: tl.constexpr, T_CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """Program (r * nC + c, e block): the chunk's reverse scan of ``dh`` from a zero carry: ``a_first dh_first``
        and the decay product."""
        rc = tl.program_id(0)
        r = rc // nC
        c = rc % nC
        re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        rn = tl.arange(0, BLOCK_N)
        me = re < E
        mn = rn < N
        men = me[:, None] & mn[None, :]
        A = tl.load(A_ptr + re[:, None] * N + rn[None, :], mask=men, other=0.0).to(tl.float32)
        carry = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        P = tl.full((BLOCK_E, BLOCK_N), 1.0, dtype=tl.float32)
        for i in range(T_CHUNK):
            t = c * T_CHUNK + (T_CHUNK - 1 - i)
            mE = me & ((t + 0 * re) < L)  # vector masks (see _decay)
            mN = mn & ((t + 0 * rn) < L)
            row = (r * L + t).to(tl.int64)
            d = tl.load(dl_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
                g = g * zz * tl.sigmoid(zz)
            cc = tl.load(C_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            a = _decay(d, A, st_ptr, row, mE, HAS_STARTS)
            carry = a * (carry + g[:, None] * cc[None, :])
            P = P * a
        off = rc.to(tl.int64) * E * N + re[:, None] * N + rn[None, :]
        tl.store(loc_ptr + off, carry, mask=men)
        tl.store(P_ptr + off, P, mask=men)

    @triton.jit
    def _scan_bwd(dy_ptr, u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, st_ptr, hin_ptr, carry_ptr, hbuf_ptr,
                  du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, R, L, E, N, nC,
                  HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_STARTS: tl.constexpr, T_CHUNK: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (r * nC + c, e block): every gradient of the chunk's tokens. A forward loop from ``h_in[c]``
        writes the states into ``hbuf`` (this program's rows only); a reverse loop then walks them back."""
        rc = tl.program_id(0)
        eb = tl.program_id(1)
        r = rc // nC
        c = rc % nC
        re = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        rn = tl.arange(0, BLOCK_N)
        me = re < E
        mn = rn < N
        men = me[:, None] & mn[None, :]
        tile = re[:, None] * N + rn[None, :]
        A = tl.load(A_ptr + tile, mask=men, other=0.0).to(tl.float32)
        h0 = tl.load(hin_ptr + rc.to(tl.int64) * E * N + tile, mask=men, other=0.0)
        if HAS_D:
            Dv = tl.load(D_ptr + re, mask=me, other=0.0).to(tl.float32)
        h = h0
        for i in range(T_CHUNK):
            t = c * T_CHUNK + i
            mE = me & ((t + 0 * re) < L)  # vector masks (see _decay)
            mN = mn & ((t + 0 * rn) < L)
            row = (r * L + t).to(tl.int64)
            u = tl.load(u_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            d = tl.load(dl_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            a = _decay(d, A, st_ptr, row, mE, HAS_STARTS)
            h = a * h + (d * u)[:, None] * b[None, :]
            tl.store(hbuf_ptr + row * E * N + tile, h, mask=mE[:, None] & mn[None, :])
        tl.debug_barrier()  # the states written above are read back below by other threads of this program
        carry = tl.load(carry_ptr + rc.to(tl.int64) * E * N + tile, mask=men, other=0.0)  # a_{t+1} dh_{t+1}
        dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        dD = tl.zeros((BLOCK_E,), dtype=tl.float32)
        t_last = c * T_CHUNK + T_CHUNK - 1
        h_t = tl.load(hbuf_ptr + (r * L + t_last).to(tl.int64) * E * N + tile,
                      mask=men & ((t_last + 0 * re) < L)[:, None], other=0.0)
        for i in range(T_CHUNK):
            j = T_CHUNK - 1 - i
            t = c * T_CHUNK + j
            mE = me & ((t + 0 * re) < L)  # vector masks (see _decay)
            mN = mn & ((t + 0 * rn) < L)
            row = (r * L + t).to(tl.int64)
            # h_{t-1}: this program's previous row, or the entering state at the chunk's first token
            first = ((j + 0 * re) == 0)[:, None]
            h_prev = tl.load(hbuf_ptr + (row - 1) * E * N + tile, mask=men & ((t - 1 + 0 * re) < L)[:, None] & ~first,
                             other=0.0)
            h_prev = tl.where(first, h0, h_prev)
            u = tl.load(u_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            d = tl.load(dl_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            cc = tl.load(C_ptr + row * N + rn, mask=mN, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
            a = _decay(d, A, st_ptr, row, mE, HAS_STARTS)
            if HAS_Z:
                zz = tl.load(z_ptr + row * E + re, mask=mE, other=0.0).to(tl.float32)
                y = tl.sum(h_t * cc[None, :], axis=1)
                if HAS_D:
                    y = y + Dv * u
                sg = tl.sigmoid(zz)
                tl.store(dz_ptr + row * E + re, g * y * sg * (1.0 + zz * (1.0 - sg)), mask=mE)
                g = g * zz * sg
            du = tl.zeros((BLOCK_E,), dtype=tl.float32)
            if HAS_D:
                dD += g * u
                du = g * Dv
            tl.store(dC_ptr + (eb * R * L + row) * N + rn, tl.sum(g[:, None] * h_t, axis=0), mask=mN)
            dh = carry + g[:, None] * cc[None, :]
            dlog = dh * h_prev * a  # d loss / d (delta A); 0 at a reset
            dA += dlog * d[:, None]
            dBu = tl.sum(dh * b[None, :], axis=1)  # d loss / d (delta u)
            tl.store(ddl_ptr + row * E + re, tl.sum(dlog * A, axis=1) + dBu * u, mask=mE)
            tl.store(du_ptr + row * E + re, du + dBu * d, mask=mE)
            tl.store(dB_ptr + (eb * R * L + row) * N + rn, tl.sum(dh * (d * u)[:, None], axis=0), mask=mN)
            carry = a * dh
            h_t = h_prev
        tl.store(dA_ptr + rc.to(tl.int64) * E * N + tile, dA, mask=men)
        if HAS_D:
            tl.store(dD_ptr + rc.to(tl.int64) * E + re, dD, mask=me)


    @triton.jit
    def _affine(a1, b1, a2, b2):
        """Composition of ``x -> a1 x + b1`` then ``x -> a2 x + b2`` (the scan's associative operator)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan_bwd_tile(dy_ptr, u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, st_ptr, hin_ptr, carry_ptr,
                       du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, R, L, E, N, nC,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_STARTS: tl.constexpr, T_CHUNK: tl.constexpr,
                       BLOCK_E: tl.constexpr):
        """Program (r * nC + c, e block): every gradient of the chunk's tokens, the chunk held as ``[BLOCK_E,
        T_CHUNK]`` tiles (time last) and the state dimension walked one ``n`` at a time. Per ``n`` the states come
        from an associative scan from ``h_in[c]`` and ``dh`` from a second one over the tokens in reverse order
        (loaded reversed, then flipped back), so no state is written to memory and no loop runs token by token.
        ``a_t h_{t-1}`` is ``h_t - delta_t u_t B_t`` (no division by ``a``)."""
        rc = tl.program_id(0)
        eb = tl.program_id(1)
        r = rc // nC
        c = rc % nC
        re = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        me = re < E
        k = tl.arange(0, T_CHUNK)
        tt = c * T_CHUNK + k  # the chunk's tokens in order
        tr = c * T_CHUNK + (T_CHUNK - 1 - k)  # and reversed
        mt = tt < L
        mr = tr < L
        rowt = (r * L + tt).to(tl.int64)
        rowr = (r * L + tr).to(tl.int64)
        mt2 = me[:, None] & mt[None, :]
        mr2 = me[:, None] & mr[None, :]
        offt = rowt[None, :] * E + re[:, None]
        offr = rowr[None, :] * E + re[:, None]
        u = tl.load(u_ptr + offt, mask=mt2, other=0.0).to(tl.float32)
        d = tl.load(dl_ptr + offt, mask=mt2, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offt, mask=mt2, other=0.0).to(tl.float32)
        gr = tl.load(dy_ptr + offr, mask=mr2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offt, mask=mt2, other=0.0).to(tl.float32)
            sg = tl.sigmoid(z)
            g = dy * z * sg
            zr = tl.load(z_ptr + offr, mask=mr2, other=0.0).to(tl.float32)
            gr = gr * zr * tl.sigmoid(zr)
        else:
            g = dy
        # a_{t+1} in reversed order: the next token's delta and start; the chunk's last token takes the carry
        # (a_{t+1} dh_{t+1} from the right) instead, as a coefficient 1 on it
        mx = (tr + 1 < L) & (k > 0)
        dnx = tl.load(dl_ptr + offr + E, mask=me[:, None] & mx[None, :], other=0.0).to(tl.float32)
        first = (k == 0)[None, :]
        if HAS_STARTS:
            st = tl.load(st_ptr + rowt, mask=mt, other=0)
            snx = tl.load(st_ptr + rowr + 1, mask=mx, other=0)
        du_ = d * u
        zero = tl.zeros((BLOCK_E, T_CHUNK), dtype=tl.float32)
        y = zero
        dBu = zero
        dlA = zero
        if HAS_D:
            Dv = tl.load(D_ptr + re, mask=me, other=0.0).to(tl.float32)
            y = Dv[:, None] * u
        state = rc.to(tl.int64) * E * N + re * N
        for n in range(N):
            An = tl.load(A_ptr + re * N + n, mask=me, other=0.0).to(tl.float32)
            Bn = tl.load(B_ptr + rowt * N + n, mask=mt, other=0.0).to(tl.float32)
            Cn = tl.load(C_ptr + rowt * N + n, mask=mt, other=0.0).to(tl.float32)
            Cr = tl.load(C_ptr + rowr * N + n, mask=mr, other=0.0).to(tl.float32)
            h0 = tl.load(hin_ptr + state + n, mask=me, other=0.0)
            cy = tl.load(carry_ptr + state + n, mask=me, other=0.0)
            a = tl.exp(d * An[:, None])
            an = tl.exp(dnx * An[:, None])
            if HAS_STARTS:
                a = tl.where(st[None, :] != 0, 0.0, a)
                an = tl.where(snx[None, :] != 0, 0.0, an)
            an = tl.where(first, 1.0, an)
            bx = du_ * Bn[None, :]
            Pa, Sh = tl.associative_scan((a, bx), 1, _affine)
            h = Pa * h0[:, None] + Sh
            Pr, Sr = tl.associative_scan((an, gr * Cr[None, :]), 1, _affine)
            dh = tl.flip(Pr * cy[:, None] + Sr, 1)
            y += h * Cn[None, :]
            tl.store(dC_ptr + (eb * R * L + rowt) * N + n, tl.sum(g * h, axis=0), mask=mt)
            dlog = dh * (h - bx)  # d loss / d (delta A); 0 at a reset
            tl.store(dA_ptr + state + n, tl.sum(dlog * d, axis=1), mask=me)
            dlA += dlog * An[:, None]
            dBu += dh * Bn[None, :]
            tl.store(dB_ptr + (eb * R * L + rowt) * N + n, tl.sum(dh * du_, axis=0), mask=mt)
        tl.store(ddl_ptr + offt, dlA + dBu * u, mask=mt2)
        du = dBu * d
        if HAS_D:
            du += g * Dv[:, None]
            tl.store(dD_ptr + rc.to(tl.int64) * E + re, tl.sum(g * u, axis=1), mask=me)
        tl.store(du_ptr + offt, du, mask=mt2)
        if HAS_Z:
            tl.store(dz_ptr + offt, dy * y * sg * (1.0 + z * (1.0 - sg)), mask=mt2)


def _check(u, delta, A, B, C, D, z, starts) -> None:
    """The kernels index raw pointers: refuse shapes that would read out of bounds, naming the tensor."""
    if u.dim() != 3:
        raise ValueError(f"u must be [R, L, E], got shape {tuple(u.shape)}")
    R, L, E = u.shape
    N = A.shape[-1]
    want = {"delta": (delta, (R, L, E)), "A": (A, (E, N)), "B": (B, (R, L, N)), "C": (C, (R, L, N)),
            "D": (D, (E,)), "z": (z, (R, L, E)), "starts": (starts, (R, L))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape} for u of shape {(R, L, E)}")


def _n_chunks(L: int, t_chunk: int) -> int:
    return max(1, -(-L // t_chunk))


def _starts_u8(starts):
    return None if starts is None else starts.contiguous().view(torch.uint8) if starts.dtype == torch.bool \
        else starts.contiguous().to(torch.uint8)


@torch.library.custom_op("neuromamba::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], starts: Optional[torch.Tensor], t_chunk: int,
                 block_e: int, num_warps: int, bwd_block_e: int, bwd_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [R, L, E] fp32, h_in [R, nC, E, N] fp32)``: the output and the state entering each chunk
    (``bwd_block_e``, ``bwd_warps``: the backward's launch, kept for it)."""
    R, L, E = u.shape
    N = A.shape[1]
    nC = _n_chunks(L, t_chunk)
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    A = A.contiguous().float()
    z = None if z is None else z.contiguous()
    st = _starts_u8(starts)
    f32 = dict(dtype=torch.float32, device=u.device)
    end = torch.empty(R, nC, E, N, **f32)
    P = torch.empty(R, nC, E, N, **f32)
    h_in = torch.empty(R, nC, E, N, **f32)
    y = torch.empty(R, L, E, **f32)
    BN = triton.next_power_of_2(N)
    nEB = triton.cdiv(E, block_e)
    meta = dict(T_CHUNK=t_chunk, BLOCK_E=block_e, BLOCK_N=BN, num_warps=num_warps)
    _chunk_fwd[(R * nC, nEB)](u, delta, A, B, st, end, P, L, E, N, nC, HAS_STARTS=st is not None, **meta)
    _carry[(R, nEB)](end, P, h_in, E, N, nC, REVERSE=False, BLOCK_E=block_e, BLOCK_N=BN, num_warps=num_warps)
    _scan_out[(R * nC, nEB)](u, delta, A, B, C, D, z, st, h_in, y, L, E, N, nC, HAS_D=D is not None,
                             HAS_Z=z is not None, HAS_STARTS=st is not None, **meta)
    return y, h_in


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, starts, t_chunk, block_e, num_warps, bwd_block_e, bwd_warps):
    R, L, E = u.shape
    nC = _n_chunks(L, t_chunk)
    return (u.new_empty(R, L, E, dtype=torch.float32), u.new_empty(R, nC, E, A.shape[1], dtype=torch.float32))


@torch.library.custom_op("neuromamba::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                 starts: Optional[torch.Tensor], h_in: torch.Tensor, t_chunk: int, block_e: int,
                 num_warps: int, bwd_block_e: int, bwd_warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """``(du, ddelta, dA, dB, dC, dD, dz)`` in the inputs' dtypes; ``dD``/``dz`` are empty when ``D``/``z`` are None.
    ``bwd_block_e > 0`` forms the gradients with ``_scan_bwd_tile`` (channel blocks of that width, ``bwd_warps``
    warps); 0 with ``_scan_bwd`` (token loop, states through a scratch buffer)."""
    R, L, E = u.shape
    N = A.shape[1]
    nC = _n_chunks(L, t_chunk)
    dy, u, delta, B, C, h_in = (t.contiguous() for t in (dy, u, delta, B, C, h_in))
    Af = A.contiguous().float()
    z = None if z is None else z.contiguous()
    st = _starts_u8(starts)
    f32 = dict(dtype=torch.float32, device=u.device)
    BN = triton.next_power_of_2(N)
    nEB = triton.cdiv(E, block_e)
    meta = dict(T_CHUNK=t_chunk, BLOCK_E=block_e, BLOCK_N=BN, num_warps=num_warps)
    loc = torch.empty(R, nC, E, N, **f32)
    P = torch.empty(R, nC, E, N, **f32)
    carry = torch.empty(R, nC, E, N, **f32)
    _chunk_bwd[(R * nC, nEB)](dy, delta, Af, C, z, st, loc, P, L, E, N, nC, HAS_Z=z is not None,
                              HAS_STARTS=st is not None, **meta)
    _carry[(R, nEB)](loc, P, carry, E, N, nC, REVERSE=True, BLOCK_E=block_e, BLOCK_N=BN, num_warps=num_warps)
    del loc, P
    if bwd_block_e > 0:
        nEB = triton.cdiv(E, bwd_block_e)
    du = torch.empty(R, L, E, **f32)
    ddl = torch.empty(R, L, E, **f32)
    dz = torch.empty(R, L, E, **f32) if z is not None else None
    dA = torch.empty(R * nC, E, N, **f32)
    dD = torch.empty(R * nC, E, **f32) if D is not None else None
    dB = torch.empty(nEB, R, L, N, **f32)
    dC = torch.empty(nEB, R, L, N, **f32)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_STARTS=st is not None)
    if bwd_block_e > 0:
        _scan_bwd_tile[(R * nC, nEB)](dy, u, delta, Af, B, C, D, z, st, h_in, carry, du, ddl, dz, dA, dD, dB, dC,
                                      R, L, E, N, nC, T_CHUNK=t_chunk, BLOCK_E=bwd_block_e, num_warps=bwd_warps,
                                      **flags)
    else:
        hbuf = torch.empty(R, L, E, N, **f32)
        _scan_bwd[(R * nC, nEB)](dy, u, delta, Af, B, C, D, z, st, h_in, carry, hbuf, du, ddl, dz, dA, dD, dB, dC,
                                 R, L, E, N, nC, **flags, **meta)
        del hbuf
    return (du.to(u.dtype), ddl.to(delta.dtype), dA.sum(0).to(A.dtype), dB.sum(0).to(B.dtype),
            dC.sum(0).to(C.dtype), u.new_empty(0) if D is None else dD.sum(0).to(D.dtype),
            u.new_empty(0) if z is None else dz.to(z.dtype))  # distinct empties: outputs may not alias


@_scan_bwd_op.register_fake
def _(dy, u, delta, A, B, C, D, z, starts, h_in, t_chunk, block_e, num_warps, bwd_block_e, bwd_warps):
    like = (lambda t: t.new_empty(t.shape))  # contiguous, as the kernels return them
    return (like(u), like(delta), like(A), like(B), like(C), u.new_empty(0) if D is None else like(D),
            u.new_empty(0) if z is None else like(z))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, starts, t_chunk, block_e, num_warps, bwd_block_e, bwd_warps = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, starts, output[1])
    ctx.has_D, ctx.has_z = D is not None, z is not None
    ctx.launch = (t_chunk, block_e, num_warps, bwd_block_e, bwd_warps)


def _backward(ctx, dy, _dh_in):
    u, delta, A, B, C, D, z, starts, h_in = ctx.saved_tensors
    du, ddl, dA, dB, dC, dD, dz = torch.ops.neuromamba.selective_scan_bwd(dy, u, delta, A, B, C, D, z, starts, h_in,
                                                                          *ctx.launch)
    return (du, ddl, dA, dB, dC, dD if ctx.has_D else None, dz if ctx.has_z else None, None, None, None, None, None,
            None)


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_selective_scan(u_RLE: torch.Tensor, delta_RLE: torch.Tensor, A_EN: torch.Tensor, B_RLN: torch.Tensor,
                         C_RLN: torch.Tensor, D_E: torch.Tensor | None = None, z_RLE: torch.Tensor | None = None,
                         starts_RL: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """The selective scan in the fused Triton kernels; same arguments and result as
    :func:`neuro_models.mamba.scan.selective_scan` (``y [R, L, E]`` in float32).

    ``config`` is one of :data:`CONFIGS` (default :func:`default_config`). Raises ``RuntimeError`` where the
    kernels cannot run (see :func:`available`) and ``ValueError`` on mismatched shapes or float64 inputs (use the
    chunked scan for float64).
    """
    if not available(u_RLE.device):
        raise RuntimeError(f"the fused selective scan needs Triton and CUDA tensors (got {u_RLE.device}, Triton "
                           f"{'missing' if triton is None else 'installed'}); use scan impl 'chunked'")
    if torch.float64 in {t.dtype for t in (u_RLE, delta_RLE, B_RLN, C_RLN, z_RLE) if t is not None}:
        raise ValueError("the fused selective scan computes in float32; float64 inputs need scan impl 'chunked'")
    _check(u_RLE, delta_RLE, A_EN, B_RLN, C_RLN, D_E, z_RLE, starts_RL)
    cfg = config or default_config()
    y, _ = torch.ops.neuromamba.selective_scan_fwd(u_RLE, delta_RLE, A_EN, B_RLN, C_RLN, D_E, z_RLE, starts_RL,
                                                   cfg["T_CHUNK"], cfg["BLOCK_E"], cfg["num_warps"],
                                                   cfg.get("BWD_BLOCK_E", 0), cfg.get("BWD_WARPS", cfg["num_warps"]))
    return y


__all__ = ["CONFIGS", "available", "check_config", "default_config", "fused_selective_scan"]
