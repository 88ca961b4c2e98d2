"""The transformer MLP ``fc2(gelu(fc1(x)))`` with the GELU and the bias gradients in the epilogues of its matmuls
(Triton, CUDA; ``SwiftConfig.mlp_impl``, "auto" by default).

Why: in the first stages of the SwiFT v1 reference configuration (51M, 96^3 x 20, batch 16) a block's MLP sees
1.3 M tokens of width 96; its 4x wider hidden activation is 1 GB in bf16, and the matmuls have K = 96, so every
kernel that touches the hidden activation is bound by memory, not by the tensor cores. PyTorch (and Inductor, which
fuses pointwise ops but not into cuBLAS calls) passes over it: fc1 writes ``h``; a GELU kernel reads ``h`` and
writes ``g``; fc2's input-gradient GEMM writes ``dg``; a GELU-backward kernel reads ``dg`` and ``h`` and writes
``dh``; a reduction reads ``dh`` again for fc1's bias gradient (``swift_blocks.py`` profiles, H100, per stage-1
block: 0.73 + 1.03 + 0.34 ms for the three passes that are not matmuls). Here

* the forward kernel computes ``h = x W1^T + b1`` per tile of tokens and hidden units and, from its epilogue,
  writes ``g = gelu(h)`` and ``d = gelu'(h)`` (no separate GELU pass); fc2 is cuBLAS;
* the backward kernel computes ``dg = dy W2`` per tile and writes ``dh = dg * d`` from its epilogue, with the
  tile's column sums of ``dh`` (fc1's bias gradient) and of ``dy`` (fc2's); ``dg`` never reaches memory, and the
  backward needs no transcendental function (the GELU's erf and exp run once, in the forward);
* the three other matmuls of the backward, ``dx = dh W1``, ``dW1 = dh^T x`` and ``dW2 = dy^T g``, are cuBLAS.

GELU and its slope share one exponential: ``Phi(h)`` from Abramowitz & Stegun 7.1.26 (``erfc(z) = p(t) exp(-z^2)``,
|error| <= 1.5e-7) and ``phi(h)`` both take ``exp(-h^2 / 2)``. A first version computed ``erf`` (libdevice) in both
kernels and saved ``h``: its kernels were slower than PyTorch's passes (backward 2.05 ms against 1.73), bound by
the arithmetic of the epilogue.

Measured (H100, that configuration, compiled blocks, bf16 residual; BENCHMARKS.md, session 10): stage-1 block
13.10 -> 12.33 ms fwd + bwd (forward kernel 1.11 ms against 1.09 for fc1 + GELU, backward kernel 1.14 ms against
1.73 for the input-gradient GEMM, GELU backward and bias reduction); stage-2 block 3.53 -> 3.50 ms; stage-3 block
1.10 -> 1.18 ms (width 384: the matmuls dominate there), hence ``MAX_DIM``. Whole model 256.0 -> 262.9 samples/s on
one host; peak memory 17.2 -> 18.3 GiB (``g`` and ``d`` are saved, where Inductor saved ``h`` and recomputed ``g``).

Semantics equal ``nn.Linear -> nn.GELU() (exact) -> nn.Linear`` under autocast: inputs and weights in the compute
dtype (bf16 or fp16), products accumulated in float32, ``h`` rounded to the compute dtype before the GELU (as
autocast's fc1 output is), ``g``, ``d`` and ``dh`` rounded before their matmuls; ``dg`` stays float32 in the epilogue
where autocast rounds it; bias gradients are float32 sums of the rounded ``dh`` and ``dy``. bf16 error against
float64 (width 96, 65,536 tokens): the input gradient 2.96e-3 against PyTorch's 2.93e-3. Used by ``Mlp`` where
:func:`usable` holds: CUDA (or the Triton interpreter, for tests), bf16/fp16 compute, width a multiple of
``K_STEP`` and at most ``MAX_DIM``, both biases, weights not ZeRO-3 partitioned. Both passes are ``torch.library``
custom ops, so compiled blocks call them as opaque kernels. Triton 3.9's interpreter computes ``tl.dot`` of bf16
tiles wrongly, so CPU tests run fp16; bf16 is checked on the GPU (``swift_blocks.py --check-kernels``).
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

#: the kernels step through the width (the matmuls' K) in chunks of 32 without masks: the width must be a multiple
#: of 32 (every width of the v2 ladder is)
K_STEP = 32
#: widest MLP the model runs through the kernels: on H100 they won at width 96 (stage-1 block 13.10 -> 12.33 ms),
#: tied at 192 (3.53 -> 3.50 ms) and lost at 384 (stage-3 block 1.10 -> 1.18 ms), where the matmuls, not the
#: passes over the hidden activation, dominate (session 10, BENCHMARKS.md)
MAX_DIM = 256


if triton is not None:

    @triton.jit
    def _gelu_and_slope(h):
        """``gelu(h) = h Phi(h)`` and ``gelu'(h) = Phi(h) + h phi(h)`` (float32) with one exponential: ``Phi`` from
        Abramowitz & Stegun 7.1.26 (``erfc(z) = p(t) exp(-z^2)``, ``t = 1 / (1 + 0.3275911 z)``, |error| <= 1.5e-7),
        whose ``exp(-z^2)`` at ``z = h / sqrt(2)`` is ``exp(-h^2 / 2)``, the factor of ``phi(h)`` too. ``Phi`` of a
        negative ``h`` is ``erfc / 2`` directly, without the cancellation of ``1 + erf``."""
        z = h * 0.7071067811865476
        e = tl.exp2(-1.4426950408889634 * z * z)
        t = 1.0 / (1.0 + 0.3275911 * tl.abs(z))
        half_erfc = 0.5 * e * t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                                                + t * 1.061405429))))
        cdf = tl.where(h >= 0, 1.0 - half_erfc, half_erfc)
        return h * cdf, cdf + h * e * 0.3989422804014327

    @triton.jit
    def _linear_gelu_kernel(x_ptr, w_ptr, b_ptr, g_ptr, d_ptr, M, C: tl.constexpr, H: tl.constexpr,
                            BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
        """Program (j, i): rows [i BM, (i + 1) BM), hidden units [j BH, (j + 1) BH): ``h = x W^T + b`` (``W`` is
        fc1's ``[H, C]`` weight, read transposed), rounded to the compute dtype, then ``g = gelu(h)`` and
        ``d = gelu'(h)``, both stored rounded (``d`` is all the backward needs of ``h``). The hidden chunk varies
        fastest, so programs that read the same rows of x run together and share them in L2."""
        j = tl.program_id(0)
        i = tl.program_id(1)
        rm = tl.cast(i, tl.int64) * BM + tl.arange(0, BM)
        hh = j * BH + tl.arange(0, BH)
        rk = tl.arange(0, BK)
        mmask = rm < M
        hmask = hh < H
        xp = x_ptr + rm[:, None] * C + rk[None, :]
        wp = w_ptr + hh[None, :] * C + rk[:, None]
        acc = tl.zeros((BM, BH), dtype=tl.float32)
        for _ in range(0, C, BK):
            a = tl.load(xp, mask=mmask[:, None], other=0.0)
            b = tl.load(wp, mask=hmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            xp += BK
            wp += BK
        bias = tl.load(b_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
        h = (acc + bias[None, :]).to(g_ptr.dtype.element_ty).to(tl.float32)
        g, d = _gelu_and_slope(h)
        out = rm[:, None] * H + hh[None, :]
        omask = mmask[:, None] & hmask[None, :]
        tl.store(g_ptr + out, g.to(g_ptr.dtype.element_ty), mask=omask)
        tl.store(d_ptr + out, d.to(d_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _gelu_dgrad_kernel(dy_ptr, w_ptr, d_ptr, dh_ptr, db1_ptr, db2_ptr, M, C: tl.constexpr, H: tl.constexpr,
                           BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
        """Program (j, i): ``dh = (dy W) * d`` (``d = gelu'(h)`` from the forward) for rows [i BM, (i + 1) BM) and
        hidden units [j BH, (j + 1) BH) (``W`` is fc2's ``[C, H]`` weight), stored rounded, with the rows' sums of
        the rounded ``dh`` in row i of the partial fc1 bias gradient; programs j == 0 also store the rows' sums of
        ``dy`` in row i of the partial fc2 bias gradient. Rows past M load dy = 0, so they add nothing. (Loading the
        tile of ``d`` before the matmul instead, to overlap its latency, was slower on H100: 1.29 vs 1.18 ms at
        stage 1.)"""
        j = tl.program_id(0)
        i = tl.program_id(1)
        rm = tl.cast(i, tl.int64) * BM + tl.arange(0, BM)
        hh = j * BH + tl.arange(0, BH)
        rk = tl.arange(0, BK)
        mmask = rm < M
        hmask = hh < H
        dyp = dy_ptr + rm[:, None] * C + rk[None, :]
        wp = w_ptr + rk[:, None] * H + hh[None, :]
        db2p = db2_ptr + tl.cast(i, tl.int64) * C + rk
        out = rm[:, None] * H + hh[None, :]
        omask = mmask[:, None] & hmask[None, :]
        acc = tl.zeros((BM, BH), dtype=tl.float32)
        for _ in range(0, C, BK):
            a = tl.load(dyp, mask=mmask[:, None], other=0.0)
            tl.store(db2p, tl.sum(a.to(tl.float32), axis=0), mask=rk + j * BK < BK)  # j == 0 only
            b = tl.load(wp, mask=hmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            dyp += BK
            wp += BK * H
            db2p += BK
        d = tl.load(d_ptr + out, mask=omask, other=0.0)
        dh = (acc * d.to(tl.float32)).to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + out, dh, mask=omask)
        tl.store(db1_ptr + tl.cast(i, tl.int64) * H + hh, tl.sum(dh.to(tl.float32), axis=0), mask=hmask)


#: launch configurations tried on the first call per shape and kernel (``triton_launch.tuned``): token rows per tile
#: (BM), hidden units per tile (BH), width chunk (BK), warps, pipeline stages. H100, torch 2.11's Triton (session 10;
#: timings in ``swift_blocks.py`` rows): at width 96 the 64 x 128 tiles with 4 warps and 3 stages were fastest in
#: both passes (forward 1.13 ms, backward 1.18 ms at stage 1). Left out because they computed wrong results on that
#: card (correct under the interpreter): 8-warp 128 x 128 tiles (input gradients 2.8x PyTorch's error at width 96)
#: and BK = 64 (relative error 0.15 at width 768).
CONFIGS = {
    kind: [dict(BM=bm, BH=bh, BK=32, num_warps=w, num_stages=s) for (bm, bh, w, s) in
           ((64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 2, 2), (32, 128, 4, 2))]
    for kind in ("fwd", "bwd")
}
_TUNED: dict = {}  # (kernel, shape key) -> the fastest configuration
TIMINGS: dict = {}  # (kernel, shape key) -> {configuration: ms}, for benchmarks


def _check_shapes(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    """The MLPs' shape rule (``triton_launch.check_mlp_shapes``), and a width the kernels step through without masks."""
    check_mlp_shapes(x, w1, b1, w2, b2)
    if x.shape[1] % K_STEP:
        raise ValueError(f"width {x.shape[1]} is not a multiple of {K_STEP}")


def _grid(M: int, H: int, cfg: dict) -> tuple[int, int]:
    return triton.cdiv(H, cfg["BH"]), triton.cdiv(M, cfg["BM"])


def _forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_shapes(x, w1, b1, w2, b2)
    M, C = x.shape
    H = w1.shape[0]
    g = x.new_empty(M, H)
    d = x.new_empty(M, H)

    def run(cfg):
        _linear_gelu_kernel[_grid(M, H, cfg)](x, w1, b1, g, d, M, C=C, H=H, BM=cfg["BM"], BH=cfg["BH"], BK=cfg["BK"],
                                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if M:  # a grid of zero programs is an error
        key = (M, C, H, x.dtype, x.device.type)
        run(tuned(_TUNED, TIMINGS, ("fwd", key), CONFIGS["fwd"], run, "GELU MLP fwd kernel", key[-1]))
    return torch.addmm(b2, g, w2.t()), g, d


def _backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, g: torch.Tensor,
              d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, C = x.shape
    H = w1.shape[0]
    if M == 0:
        return (torch.zeros_like(x), torch.zeros_like(w1), w1.new_zeros(H), torch.zeros_like(w2), w2.new_zeros(C))
    dh = torch.empty_like(d)
    key = (M, C, H, x.dtype, x.device.type)
    parts: dict = {}

    def run(cfg):
        tiles = triton.cdiv(M, cfg["BM"])
        parts["db1"] = torch.empty(tiles, H, device=x.device, dtype=torch.float32)
        parts["db2"] = torch.empty(tiles, C, device=x.device, dtype=torch.float32)
        _gelu_dgrad_kernel[_grid(M, H, cfg)](dy, w2, d, dh, parts["db1"], parts["db2"], M, C=C, H=H, BM=cfg["BM"],
                                             BH=cfg["BH"], BK=cfg["BK"], num_warps=cfg["num_warps"],
                                             num_stages=cfg["num_stages"])

    run(tuned(_TUNED, TIMINGS, ("bwd", key), CONFIGS["bwd"], run, "GELU MLP bwd kernel", key[-1]))
    # the three matmuls that remain are plain GEMMs (cuBLAS on CUDA), in the compute dtype with float32 accumulation
    return (dh @ w1, dh.t() @ x, parts["db1"].sum(0).to(w1.dtype), dy.t() @ g, parts["db2"].sum(0).to(w2.dtype))


if triton is not None:

    @torch.library.custom_op("neurox::gelu_mlp", mutates_args=())
    def gelu_mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, w1, b1, w2, b2)

    @gelu_mlp_op.register_fake
    def _(x, w1, b1, w2, b2):
        M, H = x.shape[0], w1.shape[0]
        return torch.empty_like(x), x.new_empty(M, H), x.new_empty(M, H)

    @torch.library.custom_op("neurox::gelu_mlp_backward", mutates_args=())
    def gelu_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, g: torch.Tensor,
                             d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
        return _backward(dy.contiguous(), x, w1, w2, g, d)

    @gelu_mlp_backward_op.register_fake
    def _(dy, x, w1, w2, g, d):
        return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
                w2.new_empty(w2.shape[0]))

    def _setup_context(ctx, inputs, output):
        x, w1, _, w2, _ = inputs
        _, g, d = output
        ctx.save_for_backward(x, w1, w2, g, d)
        ctx.mark_non_differentiable(g, d)
        ctx.set_materialize_grads(False)  # no zero gradients of g and d (1 GB each at stage 1)

    def _backward_rule(ctx, dy, dg, dd):
        x, w1, w2, g, d = ctx.saved_tensors
        return gelu_mlp_backward_op(dy, x, w1, w2, g, d)

    gelu_mlp_op.register_autograd(_backward_rule, setup_context=_setup_context)


def usable(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> bool:
    """Whether :func:`gelu_mlp` can replace ``fc2(gelu(fc1(x)))`` here (module docstring)."""
    return mlp_usable(x, fc1, fc2) and fc1.in_features % K_STEP == 0 and fc1.in_features <= MAX_DIM


def gelu_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` over the last axis of ``x`` in the compute dtype (``triton_launch.compute_dtype``)."""
    dt = compute_dtype(x)
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        y, _, _ = gelu_mlp_op(x.reshape(-1, shape[-1]).to(dt).contiguous(), fc1.weight.to(dt), fc1.bias.to(dt),
                              fc2.weight.to(dt), fc2.bias.to(dt))
    return y.reshape(shape)
