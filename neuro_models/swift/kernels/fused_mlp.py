"""Fused transformer MLP for CUDA: ``fc2(gelu(fc1(x)))`` with the hidden activations kept on chip.

Why: in the first stages of the SwiFT v1 reference configuration (51M, 96^3 x 20, batch 16) a block sees 1.3 M
tokens of width 96; the 4x wider hidden activation is 1 GB in bf16, and PyTorch's MLP writes and reads it (and its
GELU and gradient) about eleven times per step: fc1, GELU, fc2 forward, then fc2 dgrad, GELU backward, both
weight gradients and fc1 dgrad, each a separate memory-bound kernel (``swift_blocks.py`` profiles). Here

* the forward kernel computes, per tile of tokens and per chunk of hidden units, ``h = x W1^T + b1``,
  ``g = gelu(h)`` and accumulates ``g W2^T``: it reads x and writes y, nothing else;
* the backward kernel recomputes ``h`` from x (nothing but x is saved), and writes ``g = gelu(h)`` and
  ``dh = (dy W2) * gelu'(h)`` with the per-tile sums of ``dh`` (the fc1 bias gradient); the three matmuls left,
  ``dx = dh W1``, ``dW1 = dh^T x`` and ``dW2 = dy^T g``, are plain GEMMs (cuBLAS).

Measured (H100, that configuration, compiled blocks, bf16 residual; BENCHMARKS.md, session 8):

* it saves memory: the saved hidden activation of every fused block is gone. Full model at batch 16: peak
  18.3 -> 14.9 GiB; through ``train()`` (v2-ladder 51M): 10.0 -> 8.0 GiB;
* it does not save time, so it is off by default. A stage-1 block: 14.15 -> 13.98 ms (forward kernel 1.27 ms
  against 1.6 for fc1, GELU and fc2; backward kernel 1.93 ms, about twice its traffic because every hidden element
  needs an ``erf`` and an ``exp`` on the CUDA cores); a stage-2 block 3.68 -> 4.33 ms (width 192 padded to 256).
  Full model 235.2 -> 232.0 samples/s.
* A first version also fused the three GEMMs of the backward (input gradient per token tile; weight gradients per
  hidden chunk accumulated in registers): 1.97 + 2.90 ms against ~1.3 ms for cuBLAS; the stage-1 block went to
  15.4 ms. Removed.

Semantics equal ``nn.Linear -> nn.GELU() (exact) -> nn.Linear`` under autocast: inputs and weights in the compute
dtype (bf16 or fp16), products accumulated in float32, ``gelu(h)`` and ``dh`` rounded to the compute dtype before
their matmuls (as autocast rounds the hidden activation and its gradient), the output in the compute dtype, weight
gradients accumulated in float32 and returned in the weights' compute dtype. Used by ``Mlp`` when
``SwiftConfig.fused_mlp`` is on, the width is at most ``MAX_DIM``, the tensors are on CUDA (or the Triton
interpreter runs, for tests), the compute dtype is bf16/fp16 and the weights are not ZeRO-3 partitioned. It is a
``torch.library`` custom op, so ``torch.compile``d blocks call it as one opaque kernel.

Triton 3.9's interpreter computes ``tl.dot`` of bf16 tiles wrongly (fp16 and fp32 are right), so CPU tests run the
kernels in fp16; bf16 is checked on the GPU (``benchmarks/swift_blocks.py --check``).
"""
from __future__ import annotations

import torch

from .triton_launch import check_mlp_shapes, compute_dtype, mlp_usable, tuned

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: widest MLP input the kernels take: a program holds [rows, width] tiles of x (and dy) and [width, hidden chunk]
#: weight tiles, the width padded to a power of two (measured at the 51M's stage-1/2 widths, 96 and 192)
MAX_DIM = 256


if triton is not None:

    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))

    @triton.jit
    def _mlp_fwd_kernel(x_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, y_ptr, M, C: tl.constexpr, H: tl.constexpr,
                        CP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        """y[m] = gelu(x[m] W1^T + b1) W2^T + b2 for the BM rows of this program; W1^T is [C, H], W2^T [H, C]."""
        rm = tl.cast(tl.program_id(0), tl.int64) * BM + tl.arange(0, BM)
        rc = tl.arange(0, CP)
        rh = tl.arange(0, BH)
        mmask = rm < M
        cmask = rc < C
        xmask = mmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * C + rc[None, :], mask=xmask, other=0.0)
        acc = tl.zeros((BM, CP), dtype=tl.float32)
        for h0 in range(0, H, BH):
            hh = h0 + rh
            hmask = hh < H
            w1t = tl.load(w1t_ptr + rc[:, None] * H + hh[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0)
            b1 = tl.load(b1_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
            g = _gelu(tl.dot(x, w1t) + b1[None, :])
            w2t = tl.load(w2t_ptr + hh[:, None] * C + rc[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(g.to(x.dtype), w2t, acc)
        b2 = tl.load(b2_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * C + rc[None, :], (acc + b2[None, :]).to(y_ptr.dtype.element_ty), mask=xmask)

    @triton.jit
    def _mlp_dh_kernel(x_ptr, dy_ptr, w1t_ptr, b1_ptr, w2_ptr, g_ptr, dh_ptr, db1_ptr, M, C: tl.constexpr,
                       H: tl.constexpr, CP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        """Program (j, i): rows [i BM, (i + 1) BM) and hidden units [j BH, (j + 1) BH): recompute
        h = x W1^T + b1, store g = gelu(h) and dh = (dy W2) * gelu'(h) (compute dtype) and the rows' sum of dh
        (float32) into row i of the partial bias gradient. The hidden chunk varies fastest, so the programs that
        read the same x and dy rows run together and share them through L2."""
        j = tl.program_id(0)
        i = tl.program_id(1)
        rm = tl.cast(i, tl.int64) * BM + tl.arange(0, BM)
        rc = tl.arange(0, CP)
        hh = j * BH + tl.arange(0, BH)
        mmask = rm < M
        cmask = rc < C
        hmask = hh < H
        xmask = mmask[:, None] & cmask[None, :]
        wmask = cmask[:, None] & hmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * C + rc[None, :], mask=xmask, other=0.0)
        dy = tl.load(dy_ptr + rm[:, None] * C + rc[None, :], mask=xmask, other=0.0)
        w1t = tl.load(w1t_ptr + rc[:, None] * H + hh[None, :], mask=wmask, other=0.0)
        b1 = tl.load(b1_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
        w2 = tl.load(w2_ptr + rc[:, None] * H + hh[None, :], mask=wmask, other=0.0)
        h = tl.dot(x, w1t) + b1[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        dh = tl.dot(dy, w2) * (cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h))  # rows past M: dy = 0
        omask = mmask[:, None] & hmask[None, :]
        out = rm[:, None] * H + hh[None, :]
        tl.store(g_ptr + out, (h * cdf).to(g_ptr.dtype.element_ty), mask=omask)
        dh = dh.to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + out, dh, mask=omask)
        tl.store(db1_ptr + tl.cast(i, tl.int64) * H + hh, tl.sum(dh.to(tl.float32), axis=0), mask=hmask)


#: launch configurations tried on the first call per shape and kernel (``_tuned``): token rows per tile (BM),
#: hidden units per chunk (BH), warps, software-pipelining stages. Picked on H100 (session 8; ``TIMINGS``, kept in
#: ``swift_blocks.py`` rows): width 96: forward 128 x 64 with 4 warps, backward 64 x 64 with 4 warps; width 192:
#: 128 x 64 with 8 warps for both.
CONFIGS = {
    "fwd": [dict(BM=bm, BH=bh, num_warps=w, num_stages=2) for (bm, bh, w) in
            ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8))],
    "dh": [dict(BM=bm, BH=bh, num_warps=w, num_stages=2) for (bm, bh, w) in
           ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 128, 4))],
}
_TUNED: dict = {}  # (kernel, shape key) -> the fastest configuration
TIMINGS: dict = {}  # (kernel, shape key) -> {configuration: ms}, for benchmarks


def _cp(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _tuned(kind: str, key: tuple, run) -> dict:
    """The launch configuration for ``kind`` at ``key``: on CUDA the fastest of ``CONFIGS[kind]`` (timed once per
    shape with CUDA events, three runs each; a configuration the card cannot run is skipped), else the first."""
    return tuned(_TUNED, TIMINGS, (kind, key), CONFIGS[kind], run, f"fused MLP {kind} kernel", key[-1])


def _forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    check_mlp_shapes(x, w1, b1, w2, b2)
    M, C = x.shape
    H = w1.shape[0]
    if M == 0:  # no tokens (no launch: a grid of zero programs is an error)
        return torch.empty_like(x)
    w1t, w2t = w1.t().contiguous(), w2.t().contiguous()
    y = torch.empty_like(x)
    key = (M, C, H, x.dtype, x.device.type)

    def run(cfg):
        _mlp_fwd_kernel[(triton.cdiv(M, cfg["BM"]),)](x, w1t, b1, w2t, b2, y, M, C=C, H=H, CP=_cp(C), BM=cfg["BM"],
                                                        BH=cfg["BH"], num_warps=cfg["num_warps"],
                                                        num_stages=cfg["num_stages"])

    run(_tuned("fwd", key, run))
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, C = x.shape
    H = w1.shape[0]
    if M == 0:
        return (torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2),
                w2.new_zeros(w2.shape[0]))
    w1t = w1.t().contiguous()
    g = torch.empty(M, H, device=x.device, dtype=x.dtype)
    dh = torch.empty_like(g)
    key = (M, C, H, x.dtype, x.device.type)
    parts: dict = {}

    def run(cfg):
        tiles = triton.cdiv(M, cfg["BM"])
        parts["db1"] = torch.empty(tiles, H, device=x.device, dtype=torch.float32)
        _mlp_dh_kernel[(triton.cdiv(H, cfg["BH"]), tiles)](x, dy, w1t, b1, w2, g, dh, parts["db1"], M, C=C, H=H,
                                                            CP=_cp(C), BM=cfg["BM"], BH=cfg["BH"],
                                                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    run(_tuned("dh", key, run))
    # the three matmuls that remain are plain GEMMs (cuBLAS on CUDA), in the compute dtype with float32 accumulation
    dx = dh @ w1
    dw1 = dh.t() @ x
    dw2 = dy.t() @ g
    return dx, dw1, parts["db1"].sum(0).to(b1.dtype), dw2, dy.sum(0, dtype=torch.float32).to(w2.dtype)


if triton is not None:

    @torch.library.custom_op("neurox::fused_mlp", mutates_args=())
    def fused_mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                     ) -> torch.Tensor:
        return _forward(x, w1, b1, w2, b2)

    @fused_mlp_op.register_fake
    def _(x, w1, b1, w2, b2):
        return torch.empty_like(x)

    @torch.library.custom_op("neurox::fused_mlp_backward", mutates_args=())
    def fused_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                              w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
        return _backward(dy.contiguous(), x, w1, b1, w2)

    @fused_mlp_backward_op.register_fake
    def _(dy, x, w1, b1, w2):
        return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2),
                x.new_empty(w2.shape[0], dtype=w2.dtype))

    def _setup_context(ctx, inputs, output):
        x, w1, b1, w2, _ = inputs
        ctx.save_for_backward(x, w1, b1, w2)

    def _backward_rule(ctx, dy):
        x, w1, b1, w2 = ctx.saved_tensors
        return fused_mlp_backward_op(dy, x, w1, b1, w2)

    fused_mlp_op.register_autograd(_backward_rule, setup_context=_setup_context)


def usable(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> bool:
    """Whether ``fused_mlp`` can replace ``fc2(gelu(fc1(x)))`` here (module docstring)."""
    return mlp_usable(x, fc1, fc2) and fc1.in_features <= MAX_DIM


def fused_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` over the last axis of ``x`` in the compute dtype (:func:`compute_dtype`)."""
    dt = compute_dtype(x)
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        y = fused_mlp_op(x.reshape(-1, shape[-1]).to(dt).contiguous(), fc1.weight.to(dt), fc1.bias.to(dt),
                         fc2.weight.to(dt), fc2.bias.to(dt))
    return y.reshape(shape)
