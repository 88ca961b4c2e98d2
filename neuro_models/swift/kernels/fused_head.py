"""Fused SimMIM head for CUDA: the pixel-shuffle decoder's tail (GELU, linear to voxels) and the masked
reconstruction loss in one Triton kernel that reads the input volume once, in its own layout.

Why: on the SwiFT v1 reference configuration (51M, 96^3 x 20, batch 16, H100) the PyTorch head moves the
1.1 GB float32 input through a patchify transpose twice (loss forward and backward) and writes and reads a
0.57 GB voxel prediction and its gradient: 4.5 ms of a 70 ms step (``benchmarks/swift_blocks.py`` case ``head``).
Here one program walks spatial patch columns (one patch position, every time token): it recomputes the prediction
from the decoder's 16-channel hidden state in registers, compares it with the input voxels (read contiguously:
a 6x6x6 patch is 36 runs of ``6 x T`` floats), and accumulates the loss and its gradients with respect to the
hidden state, the weight and the bias in the same pass. The L1/L2/Huber gradient is known in the forward, so
the backward only scales the saved gradients by ``grad_output / denominator``.

Measured (H100, that configuration, fwd + bwd): 4.24 ms against the PyTorch head's 4.53 (the kernel 3.66 ms); on
H200 4.22 against 3.82. Its traffic would allow ~0.4 ms: the loop body, not occupancy, chunking or the atomics,
limits it (``CONFIGS``; BENCHMARKS.md, session 7). Peak memory of the head 3.06 -> 1.60 GiB.

Semantics equal ``model.reconstruction_loss`` on ``decoder.out(decoder.act(h))`` (exact GELU), computed in
float32 accumulation (TF32 tensor-core dots for a bf16 hidden state or where PyTorch allows TF32; the PyTorch path
under autocast rounds the prediction to bf16). Used by ``SimMIM`` when
``SwiftConfig.fused_head`` is on, the decoder is the 4D family's ``PixelShuffleDecoder``, the tensors are on
CUDA, Triton imports and the call is not being traced by ``torch.compile``; everywhere else the PyTorch path runs.
"""
from __future__ import annotations

import functools

import torch

from ..layers import patchify
from .triton_launch import available, fastest

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

LOSS_CODES = {"l1": 0, "l2": 1, "huber": 2}

__all__ = ["LOSS_CODES", "available", "fused_head_loss"]  # available: whether the kernel can run on a device


if triton is not None:

    @triton.jit
    def _head_loss_kernel(h_ptr, w_ptr, b_ptr, x_ptr, m_ptr, bm_ptr, dh_ptr, dw_part_ptr, db_part_ptr, loss_part_ptr,
                          n_patches, Xp, Yp, Zp, X, Y, Z, T, delta,
                          C: tl.constexpr, PX: tl.constexpr, PY: tl.constexpr, PZ: tl.constexpr, PT: tl.constexpr,
                          TP: tl.constexpr, CD: tl.constexpr, P: tl.constexpr, P_CHUNK: tl.constexpr,
                          TP_PAD: tl.constexpr, LOSS: tl.constexpr, HAS_BRAIN: tl.constexpr, PRECISION: tl.constexpr,
                          ATOMIC: tl.constexpr):
        """Program (pid, cid): patch columns pid, pid + nprog, ...; patch elements [cid * P_CHUNK, + P_CHUNK). The
        chunks of one column add their share of d loss / d h atomically (dh starts at zero)."""
        pid = tl.program_id(0)
        cid = tl.program_id(1)
        nprog = tl.num_programs(0)
        rp = cid * P_CHUNK + tl.arange(0, P_CHUNK)  # patch element p = (((c * PX + i) * PY + j) * PZ + k) * PT + f
        rt = tl.arange(0, TP_PAD)  # time token of the column
        rc = tl.arange(0, CD)
        pmask = rp < P
        tmask = rt < TP
        f = rp % PT
        s = rp // PT
        k = s % PZ
        j = (s // PZ) % PY
        i = (s // (PZ * PY)) % PX
        c = s // (PZ * PY * PX)
        W = tl.load(w_ptr + rp[:, None] * CD + rc[None, :], mask=pmask[:, None], other=0.0)  # [P_CHUNK, CD] fp32
        bias = tl.load(b_ptr + rp, mask=pmask, other=0.0)
        valid = pmask[:, None] & tmask[None, :]
        # offsets are split into a per-column scalar and a loop-invariant tile (int32), so the loop does no
        # per-element index arithmetic: x[b, c, x0 PX + i, y0 PY + j, z0 PZ + k, t PT + f]
        xin = (((tl.cast(c, tl.int64) * X + i) * Y + j) * Z + k) * T + f  # [P_CHUNK]
        xtile = xin[:, None] + rt[None, :] * PT  # [P_CHUNK, TP_PAD]
        htile = rt[:, None] * CD + rc[None, :]  # [TP_PAD, CD]
        if HAS_BRAIN:
            bin_ = (i * Y + j) * Z + k  # [P_CHUNK]
        dW = tl.zeros((P_CHUNK, CD), dtype=tl.float32)
        db = tl.zeros((P_CHUNK,), dtype=tl.float32)
        lsum = tl.zeros((P_CHUNK,), dtype=tl.float32)
        for patch in range(pid, n_patches, nprog):
            patch64 = tl.cast(patch, tl.int64)
            z0 = patch64 % Zp
            y0 = (patch64 // Zp) % Yp
            x0 = (patch64 // (Zp * Yp)) % Xp
            b = patch64 // (Zp * Yp * Xp)
            tok0 = patch64 * TP  # first token of the column in [B, Xp, Yp, Zp, Tp]
            hcol = h_ptr + tok0 * CD
            hpre = tl.load(hcol + htile, mask=tmask[:, None], other=0.0).to(tl.float32)  # [TP_PAD, CD]
            cdf = 0.5 * (1.0 + tl.math.erf(hpre * 0.7071067811865476))
            a = hpre * cdf  # exact GELU
            pred = tl.dot(W, tl.trans(a), input_precision=PRECISION) + bias[:, None]  # [P_CHUNK, TP_PAD]
            xcol = ((((b * C) * X + x0 * PX) * Y + y0 * PY) * Z + z0 * PZ) * T
            xv = tl.load(x_ptr + xcol + xtile, mask=valid, other=0.0).to(tl.float32)
            wgt = tl.where(valid, tl.load(m_ptr + tok0 + rt, mask=tmask, other=0.0)[None, :], 0.0)
            if HAS_BRAIN:
                bcol = ((b * X + x0 * PX) * Y + y0 * PY) * Z + z0 * PZ
                wgt = wgt * tl.load(bm_ptr + bcol + bin_, mask=pmask, other=0.0)[:, None]
            d = pred - xv
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            if LOSS == 0:
                loss = tl.abs(d)
                g = sgn
            elif LOSS == 1:
                loss = d * d
                g = 2.0 * d
            else:
                ad = tl.abs(d)
                small = ad < delta
                loss = tl.where(small, 0.5 * d * d, delta * (ad - 0.5 * delta))
                g = tl.where(small, d, delta * sgn)
            lsum += tl.sum(loss * wgt, axis=1)
            g = g * wgt
            dW += tl.dot(g, a, input_precision=PRECISION)  # [P_CHUNK, CD]
            db += tl.sum(g, axis=1)
            da = tl.dot(tl.trans(g), W, input_precision=PRECISION)  # [TP_PAD, CD]: this chunk's share
            pdf = 0.3989422804014327 * tl.exp(-0.5 * hpre * hpre)
            dhcol = dh_ptr + tok0 * CD
            if ATOMIC:  # several chunks share the column
                tl.atomic_add(dhcol + htile, da * (cdf + hpre * pdf), mask=tmask[:, None], sem="relaxed")
            else:
                tl.store(dhcol + htile, da * (cdf + hpre * pdf), mask=tmask[:, None])
        tl.store(dw_part_ptr + pid * P * CD + rp[:, None] * CD + rc[None, :], dW, mask=pmask[:, None])
        tl.store(db_part_ptr + pid * P + rp, db, mask=pmask)
        tl.store(loss_part_ptr + pid * tl.num_programs(1) + cid, tl.sum(lsum, axis=0))


#: Launch configurations tried on the first call per shape (``_tune``): patch elements per program (a column's
#: elements are split over programs, so the [P_CHUNK, T'] tiles stay in registers), warps, software-pipelining
#: stages of the column loop, programs per SM. The kernel is latency-bound (a serial loop of small loads, three
#: small dots and a store). H100, 51M head at batch 16 (BENCHMARKS.md): programs per SM 8 vs 32 made no
#: difference; 3 pipeline stages beat 1 (3.69 vs 5.41 ms); 64-row chunks were fastest: 32 rows 2x slower, 128 and
#: 256 rows (plain stores, no atomics) 5-60% slower. The fastest of these is picked per shape on the card in use.
CONFIGS = [dict(P_CHUNK=pc, num_warps=w, num_stages=st, PPS=8)
           for (pc, w, st) in ((64, 4, 3), (128, 4, 3), (128, 4, 4), (128, 4, 2), (128, 8, 3), (256, 8, 2),
                               (256, 8, 3))]
_TUNED: dict = {}  # shape key -> the fastest configuration
_TIMINGS: dict = {}  # shape key -> {configuration: ms}, for benchmarks


def _buffers(h, P: int, CD: int, n_sm: int, configs: list[dict]):
    """Zeroed outputs, sized for the largest grid of ``configs`` (unused partial rows stay zero and sum to zero)."""
    rows = max(_grid(h, P, n_sm, c)[0] for c in configs)
    chunks = max(_grid(h, P, n_sm, c)[1] for c in configs)
    dev = h.device
    return (torch.zeros(h.shape, device=dev, dtype=torch.float32), torch.zeros(rows, P, CD, device=dev),
            torch.zeros(rows, P, device=dev), torch.zeros(rows * chunks, device=dev))


def _grid(h, P: int, n_sm: int, cfg: dict) -> tuple[int, int]:
    B, Xp, Yp, Zp = h.shape[:4]
    chunks = triton.cdiv(P, cfg["P_CHUNK"])
    return max(1, min(B * Xp * Yp * Zp, triton.cdiv(cfg["PPS"] * n_sm, chunks))), chunks


def _launch(h, weight, bias, x, m, bm, patch, loss_type: str, delta: float):
    """Run the kernel: (loss sum, d sum / d h, d sum / d weight, d sum / d bias), all unnormalised."""
    B, Xp, Yp, Zp, Tp, CD = h.shape
    _, C, X, Y, Z, T = x.shape
    px, py, pz, pt = patch
    P = C * px * py * pz * pt
    if weight.shape != (P, CD):
        raise ValueError(f"weight shape {tuple(weight.shape)}; expected [C*px*py*pz*pt, decoder_dim] = {(P, CD)}")
    if CD < 16 or CD & (CD - 1):
        raise ValueError(f"decoder_dim={CD}; the fused head needs a power of two >= 16 (tl.dot)")
    dev = h.device
    cuda = dev.type == "cuda"
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 2
    w32, b32 = weight.float().contiguous(), bias.float().contiguous()
    # TF32 tensor cores for a bf16 hidden state (the autocast path) or where PyTorch allows TF32 matmuls
    prec = "tf32" if cuda and (h.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32) else "ieee"

    def run(cfg: dict, bufs) -> None:
        dh, dw_part, db_part, loss_part = bufs
        _head_loss_kernel[_grid(h, P, n_sm, cfg)](
            h, w32, b32, x, m, bm if bm is not None else m, dh, dw_part, db_part, loss_part,
            B * Xp * Yp * Zp, Xp, Yp, Zp, X, Y, Z, T, float(delta),
            C=C, PX=px, PY=py, PZ=pz, PT=pt, TP=Tp, CD=CD, P=P, P_CHUNK=cfg["P_CHUNK"],
            TP_PAD=max(16, triton.next_power_of_2(Tp)), LOSS=LOSS_CODES[loss_type], HAS_BRAIN=bm is not None,
            PRECISION=prec, ATOMIC=triton.cdiv(P, cfg["P_CHUNK"]) > 1, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])

    key = (tuple(h.shape), h.dtype, tuple(x.shape), x.dtype, patch, loss_type, bm is not None, str(dev), prec)
    cfg = _TUNED.get(key) or (_tune(key, run, lambda: _buffers(h, P, CD, n_sm, CONFIGS)) if cuda else CONFIGS[0])
    bufs = _buffers(h, P, CD, n_sm, [cfg])
    run(cfg, bufs)
    dh, dw_part, db_part, loss_part = bufs
    return loss_part.sum(), dh, dw_part.sum(0), db_part.sum(0)


def _tune(key, run, fresh) -> dict:
    """Time every launch configuration once per shape (fresh buffers each) and keep the fastest."""
    _TUNED[key], _TIMINGS[key] = fastest(CONFIGS, lambda cfg: functools.partial(run, cfg, fresh()),
                                         "fused head kernel")
    return _TUNED[key]


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, x, m, bm, denom, patch, loss_type, delta):
        total, dh, dw, db = _launch(h, weight, bias, x, m, bm, patch, loss_type, delta)
        ctx.save_for_backward(dh, dw, db, denom)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw, db, denom = ctx.saved_tensors
        scale = grad_out / denom
        th, tw, tb = ctx.dtypes
        return ((dh * scale).to(th), (dw * scale).to(tw), (db * scale).to(tb), None, None, None, None, None, None,
                None)


def fused_head_loss(h_BXYZTC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_BCXYZT: torch.Tensor,
                    mask_BXYZT: torch.Tensor, brain_mask_BXYZ: torch.Tensor | None, patch: tuple[int, int, int, int],
                    loss_type: str = "l1", delta: float = 1.0) -> torch.Tensor:
    """Mean reconstruction error over masked (and brain) voxels of ``linear(gelu(h))`` against ``x``.

    ``h``: the decoder's hidden state before GELU on the first-stage token grid, ``[B, X', Y', Z', T', c]``;
    ``weight`` ``[C*px*py*pz*pt, c]`` and ``bias``: its last linear layer (patch vector in (C, px, py, pz, pt)
    order, as ``patchify``); ``mask``: bool tokens (True = masked, counted); ``brain_mask``: voxel weights or None.
    """
    if loss_type not in LOSS_CODES:
        raise ValueError(f"loss_type={loss_type!r}; allowed: {sorted(LOSS_CODES)}")
    px, py, pz, pt = patch
    B, C = x_BCXYZT.shape[:2]
    h = h_BXYZTC.contiguous()
    x = x_BCXYZT.contiguous()
    m = mask_BXYZT.to(torch.float32).contiguous()
    bm = None
    if brain_mask_BXYZ is not None:
        bm = brain_mask_BXYZ.to(torch.float32).contiguous()
        # brain voxels per spatial patch, x the masked tokens of that patch column, x channels and frames
        per_patch = patchify(bm[:, None, ..., None], (px, py, pz, 1)).sum(-1)[..., 0]  # [B, X', Y', Z']
        denom = (m.sum(-1) * per_patch).sum() * (C * pt)
    else:
        denom = m.sum() * (C * px * py * pz * pt)
    return _FusedHeadLoss.apply(h, weight, bias, x, m, bm, denom.clamp_min(1.0), (px, py, pz, pt), loss_type,
                                float(delta))
