"""Per-block SwiFT timing: forward + backward of each encoder block kind of the 51M (SwiFT v1 configuration)
at its real shape, under each attention implementation, plus a GPU numerics check of FlexAttention.

Why: the full-model benchmark (``swift_benchmark.py``) gives one number per configuration and costs ~3 minutes
of compilation each; compiling one block takes seconds, so every kernel choice can be compared on one host in
one call. The step estimate weights each block kind by how often the 51M has it (stage 1: one regular, one
shifted; stage 2 likewise; stage 3: nine of each; stage 4: two full-attention blocks); patch embedding,
merging, decoder, loss and optimizer are not included.

Variants (``--variants``):

* ``sdpa``: ``attn_impl="sdpa"`` (shifted blocks split into mask-free boxes), PyTorch's SDPA kernel choice;
* ``sdpa-cudnn``: the same with cuDNN attention (the fastest SDPA kernel on H100 for these shapes);
* ``flex``: ``attn_impl="flex"`` (one FlexAttention call per block, Swin's regions as a block mask);
* ``triton``: ``attn_impl="triton"`` (the window-attention kernels of ``swift.kernels.window_attn``; their
  launch configurations, timed on the first call, are recorded in the row);
* ``auto``: ``attn_impl="auto"`` with cuDNN for the SDPA calls (what the full-model run uses);
* ``flex-bf16``: ``flex`` with the block's parameters and activations in bf16 (no autocast): the ceiling of a
  bf16 residual stream;
* ``-bf16res`` suffix (e.g. ``flex-bf16res``): autocast as usual, but the block's input (the residual stream) in
  bf16, as ``SwiftConfig.bf16_residual`` gives;
* ``-ko<A>+<B>`` suffix: FlexAttention ``kernel_options`` from ``KERNEL_OPTIONS`` (block sizes, warps, stages);
* ``-fmlp`` suffix: ``SwiftConfig.fused_mlp`` (the Triton MLP of ``swift.kernels.fused_mlp``; its launch
  configurations, timed on the first call, are recorded in the row);
* ``-gmlp`` suffix: ``SwiftConfig.mlp_impl="epilogue"`` (the MLP of ``swift.kernels.gelu_mlp``: GELU and the
  bias gradients in the matmul epilogues; its launch configurations, timed on the first call, are recorded in the
  row). Without it every variant (and every ``--check`` run without ``gmlp``) runs the PyTorch MLP
  (``mlp_impl="torch"``), as before session 10, so rows stay comparable with earlier sessions;
* ``-mat`` suffix: compiled with ``mode="max-autotune-no-cudagraphs"`` (Triton matmul templates with fused
  epilogues, autotuned).

``--check`` compares, on a reduced input (every stage-1 axis shifted), the compiled model's loss and gradients
under FlexAttention against SDPA in float32, and the bf16-autocast error of each against float32; and the same
with SimMIM's token selection (every region compiled) and with the PyTorch instead of the fused head.

Cases ``embed`` (patch embedding + first position embedding; variants ``dense``, ``select``: token selection,
``SimMIM``'s docstring) and ``head`` (decoder + loss; ``dense``, ``fused``) time the parts around the blocks.

Example (one GPU)::

    python benchmarks/swift_blocks.py --check --variants sdpa-cudnn,flex,auto --out blocks.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuro_models import registry as R  # noqa: E402
from neuro_models.layers import compile_regions  # noqa: E402
from swift_benchmark import V1_51M, _sdpa_context, _set_dynamo_limits  # noqa: E402  (this script's folder)

#: (case, stage, shifted, blocks of this kind in the 51M)
CASES = {"s1": (0, False, 1), "s1-shift": (0, True, 1), "s2": (1, False, 1), "s2-shift": (1, True, 1),
         "s3": (2, False, 9), "s3-shift": (2, True, 9), "s4-full": (3, False, 2)}
#: the SimMIM parts around the encoder blocks, timed with ``time_region``: ``embed`` with variants ``dense``/``select``
#: (token selection), ``head`` with ``dense``/``fused`` (``SwiftConfig.fused_head``, the Triton decoder tail + loss).
#: (Session 7 also timed a head that decoded only the masked tokens: slower, removed; BENCHMARKS.md.)
#: ``embed`` = patch embedding (mask token included) + first position embedding; ``head`` = decoder + loss
REGIONS = {"embed": (None, False, 1), "head": (None, False, 1)}
ALL_CASES = {**CASES, **REGIONS}


#: FlexAttention ``kernel_options`` sets for the ``-ko<name>`` variant suffix (e.g. ``flex-bf16res-koF1``): head dim
#: 16, 256-token windows. ``fwd_*`` apply to the forward kernel, ``bwd_*`` to the backward ones.
KERNEL_OPTIONS = {
    "F1": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=2),
    "F2": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=128, fwd_num_warps=4, fwd_num_stages=2),
    "F3": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=2),
    "B1": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=2),
    "B2": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "B3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=3),
    "B4": dict(bwd_BLOCK_M1=128, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=128, bwd_num_warps=8,
               bwd_num_stages=1),
    "B5": dict(bwd_BLOCK_M1=16, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=16, bwd_num_warps=4, bwd_num_stages=3),
    "B6": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=4),
    "B7": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "B8": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=256, bwd_BLOCK_M2=256, bwd_BLOCK_N2=32, bwd_num_warps=8, bwd_num_stages=2),
    "P": {},  # PyTorch's defaults (without ko: the model's, flex_kernel_options)
    "S": dict(ROWS_GUARANTEED_SAFE=True),  # every query attends at least to itself in every window and region
}


def _kernel_options(variant: str) -> dict | None:
    """Merged ``KERNEL_OPTIONS`` of a variant's ``-ko<A>+<B>...`` suffix, or None (the model's defaults)."""
    for part in variant.split("-"):
        if part.startswith("ko"):
            out: dict = {}
            for name in part[2:].split("+"):
                out.update(KERNEL_OPTIONS[name])
            return out
    return None


def _impl(variant: str) -> str:
    for impl in ("sdpa", "auto", "triton"):
        if variant.startswith(impl):
            return impl
    return "flex"


#: kernels listed per profiled row (``--top``)
TOP_KERNELS = 12


def _kernel_profile(fn, iters: int = 3, top: int | None = None) -> dict:
    """GPU time per iteration (sum of all kernels: launch gaps excluded) and the top kernels, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    top = top or TOP_KERNELS
    total = sum(e.self_device_time_total for e in ev) / 1e3 / iters
    return dict(gpu_ms=total, kernels=[[e.key[:90], round(e.self_device_time_total / 1e3 / iters, 3), e.count // iters]
                                       for e in ev[:top]])


def time_block(case: str, variant: str, batch: int, iters: int, warmup: int, device: torch.device,
               profile: bool = False) -> dict:
    stage, shifted, count = CASES[case]
    fmlp = "fmlp" in variant.split("-")
    gmlp = "gmlp" in variant.split("-")
    cfg = R.get_config("swift_v2", "51M", **V1_51M, attn_impl=_impl(variant), fused_mlp=fmlp,
                       mlp_impl="epilogue" if gmlp else "torch")
    enc = R.build_pretrain_model(cfg).encoder
    blk = enc.stages[stage].blocks[int(shifted)].to(device).train()
    grid = cfg.stage_grids()[stage]
    dim = cfg.stage_dims()[stage]
    bf16 = "bf16" in variant.replace("bf16res", "")
    dtype = torch.bfloat16 if bf16 or "bf16res" in variant else torch.float32
    if bf16:
        blk = blk.to(torch.bfloat16)
    full = stage == cfg.num_stages - 1
    shape = (batch, math.prod(grid), dim) if full else (batch, *grid, dim)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(shape, device=device, dtype=dtype)
    torch._dynamo.reset()
    from neuro_models.swift import layers as swift_layers

    swift_layers.FLEX_KERNEL_OPTIONS = _kernel_options(variant)  # read when the block is traced (first call)
    compile_regions(blk, **({"mode": "max-autotune-no-cudagraphs"} if "mat" in variant.split("-") else {}))
    autocast = contextlib.nullcontext() if bf16 else torch.autocast("cuda", dtype=torch.bfloat16)
    with autocast:  # as the stage loop, which builds it under autocast (the Triton kernels need a bf16 compute dtype)
        bm = blk.region_mask(x) if hasattr(blk, "region_mask") else None
    extra = () if bm is None else (bm,)
    row = dict(case=case, variant=variant, batch=batch, count=count, shape=list(shape), block_mask=bm is not None)

    def fwd_bwd():
        cudnn = "cudnn" in variant or variant.startswith("auto")
        with _sdpa_context("cudnn" if cudnn else "default"), autocast:
            y = blk(x, *extra)
        y.backward(g)

    row = _time(row, fwd_bwd, iters, warmup, profile)
    if fmlp:
        from neuro_models.swift.kernels import fused_mlp

        row["fused_mlp_tuning"] = {str(k): v for k, v in fused_mlp.TIMINGS.items()}
    if gmlp:
        from neuro_models.swift.kernels import gelu_mlp

        row["gelu_mlp_tuning"] = {str(k): v for k, v in gelu_mlp.TIMINGS.items()}
    if _impl(variant) == "triton":
        from neuro_models.swift.kernels import window_attn

        row["window_attn_tuning"] = {str(k): v for k, v in window_attn.TIMINGS.items()}
    return row


def time_region(case: str, variant: str, batch: int, iters: int, warmup: int, device: torch.device,
                profile: bool = False) -> dict:
    """Forward + backward of the SimMIM parts around the blocks (``REGIONS``) at the 51M's real shapes, compiled
    like the full-model run (bf16 autocast, bf16 residual): the patch embedding with (``select``) or without
    (``dense``) token selection, the head as PyTorch (``dense``) or the fused Triton kernel (``fused``)."""
    cfg = R.get_config("swift_v2", "51M", **V1_51M, bf16_residual=True, fused_head=variant == "fused")
    model = R.build_pretrain_model(cfg).to(device).train()
    x = torch.randn(batch, 1, *cfg.img_size, device=device)
    brain = torch.ones(batch, *cfg.img_size[:3], dtype=torch.bool, device=device)
    mask = model.make_mask(batch, generator=torch.Generator().manual_seed(0)).to(device)
    visible = None
    if variant == "select":
        from neuro_models.swift.masking import token_selection

        visible = token_selection(mask, model.num_masked)[0]
    torch._dynamo.reset()
    enc = model.encoder
    if case == "embed":
        compile_regions(enc.patch_embed), compile_regions(enc.pos_embeds[0])
        g = torch.randn(batch, *cfg.grid, cfg.embed_dim, device=device, dtype=torch.bfloat16)

        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = enc.pos_embeds[0](enc.patch_embed(x, mask, model.mask_token, visible))
            y.backward(g)
    else:
        compile_regions(model.decoder), compile_regions(model.criterion)
        grid = cfg.stage_grids()[-1]
        f = torch.randn(batch, *grid, cfg.stage_dims()[-1], device=device, requires_grad=True)

        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.head(f, x, mask, brain)[0]
            loss.backward()
    row = dict(case=case, variant=variant, batch=batch, count=1, shape=list(x.shape), block_mask=False)
    row = _time(row, fwd_bwd, iters, warmup, profile)
    if variant == "fused":  # the fused kernel's launch configurations, timed on its first call
        from neuro_models.swift.kernels import fused_head

        row["fused_head_tuning"] = {str(k[:2]): v for k, v in fused_head._TIMINGS.items()}
        print(json.dumps(row["fused_head_tuning"]), flush=True)
    return row


def _time(row: dict, fwd_bwd, iters: int, warmup: int, profile: bool) -> dict:
    """Warm-up (compilation), CUDA-event time per call, peak memory and optionally the kernel profile."""
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            fwd_bwd()
        torch.cuda.synchronize()
        row["compile_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fwd_bwd()
        end.record()
        torch.cuda.synchronize()
        row["ms"] = start.elapsed_time(end) / iters
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if profile:
            row.update(_kernel_profile(fwd_bwd))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(row), flush=True)
    return row


#: (attention, precision[-select][-torchhead]) runs of ``check_numerics``; the first is the reference. Session 6
#: checked sdpa/flex in bf16 without the bf16 residual (BENCHMARKS.md); ``--check-all`` adds them back.
CHECK_RUNS = [("sdpa", "fp32"), ("flex", "bf16res"), ("flex", "fp32-select"), ("flex", "bf16res-select"),
              ("flex", "fp32-torchhead"), ("flex", "bf16res-select-torchhead"), ("flex", "bf16res-select-fmlp")]
CHECK_ALL = CHECK_RUNS[:1] + [("sdpa", "bf16"), ("flex", "fp32"), ("flex", "bf16")] + CHECK_RUNS[1:]


def check_numerics(device: torch.device, runs: list | None = None) -> dict:
    """Numerics on the SimMIM model (51M widths, input 48^3 x 8: stage 1 shifts on all four axes, stages 2-3 on
    time only) against the float32 SDPA reference: gradient relative L2 error of each run in ``runs`` (FlexAttention,
    bf16 autocast with the bf16 residual, token selection, the PyTorch instead of the fused head). The window blocks
    are compiled under FlexAttention (with token selection every region, as training runs it), eager under SDPA."""
    cfg = R.get_config("swift_v2", "51M", **{**V1_51M, "img_size": (48, 48, 48, 8)}, drop_path_rate=0.0)
    x = torch.randn(2, 1, *cfg.img_size, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference, not TF32
    out: dict = {}
    grads: dict = {}
    for impl, prec in runs or CHECK_RUNS:
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = R.build_pretrain_model(cfg.replace(attn_impl=impl, bf16_residual="bf16res" in prec,
                                                   fused_head="torchhead" not in prec,
                                                   fused_mlp="fmlp" in prec,
                                                   mlp_impl="epilogue" if "gmlp" in prec else "torch")).to(device)
        select = "select" in prec
        if impl in ("flex", "triton", "auto"):  # the blocks; with token selection every region, as training runs it
            if select:
                compile_regions(model)
            for m in model.modules():
                if hasattr(m, "region_mask") and not select:
                    m.compile(dynamic=False)
        mask = model.make_mask(2, generator=torch.Generator().manual_seed(0), device=device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if not prec.startswith("fp32") else contextlib.nullcontext()
        with ctx:
            loss = model(x, mask=mask, exact_mask=select)["loss"]
        loss.backward()
        out[f"loss_{impl}_{prec}"] = float(loss)
        grads[(impl, prec)] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = grads[("sdpa", "fp32")]

    def rel(a: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    names = {("flex", "fp32"): "flex_fp32", ("sdpa", "bf16"): "sdpa_bf16", ("flex", "bf16"): "flex_bf16",
             ("flex", "bf16res"): "flex_bf16_residual",
             # token selection (compiled regions): the same loss over the same voxels, float32 agrees to rounding
             ("flex", "fp32-select"): "select_fp32", ("flex", "bf16res-select"): "select_bf16_residual",
             # the PyTorch decoder tail + loss instead of the fused Triton head (which every other run uses on CUDA)
             ("flex", "fp32-torchhead"): "torch_head_fp32",
             ("flex", "bf16res-select-torchhead"): "torch_head_bf16_residual_select",
             # the fused Triton MLP in stages 1-2 (bf16 only: float32 keeps the PyTorch MLP)
             ("flex", "bf16res-select-fmlp"): "fused_mlp_bf16_residual_select",
             # the Triton window-attention kernels instead of FlexAttention (bf16 only: float32 runs SDPA)
             ("triton", "bf16res-select"): "triton_attn_bf16_residual_select",
             ("auto", "bf16res-select"): "auto_bf16_residual_select",
             # the MLP with GELU and bias gradients in the matmul epilogues (bf16 only: float32 keeps PyTorch's)
             ("auto", "bf16res-select-gmlp"): "auto_gelu_mlp_bf16_residual_select"}
    for run, name in names.items():
        if run in grads:
            out[f"grad_rel_err_{name}"] = rel(grads[run])
    out.update(check_fused_mlp(device))
    out.update(check_window_attn(device))
    print(json.dumps(out), flush=True)
    return out


def check_window_attn(device: torch.device, samples: int = 2) -> dict:
    """The Triton window-attention kernels alone at the 51M's stage-1 shape (256-token windows, 6 heads of 16, the
    shifted block's regions), bf16: relative L2 error of the output and the q, k, v gradients against float64 on the
    same bf16 inputs, next to the error of SDPA (bf16, the regions as a boolean mask) on the same inputs."""
    from neuro_models.swift import layers as L
    from neuro_models.swift.kernels import window_attn as WA

    dims, win, shift, H, E = (16, 16, 16, 20), (4, 4, 4, 4), (2, 2, 2, 2), 6, 16
    mask = L.shifted_window_mask(dims, win, shift, device=device)
    W, N, _ = mask.shape
    S = samples * W
    torch.manual_seed(0)
    qkv = (torch.randn(S, N, 3 * H * E, device=device) * 1.5).to(torch.bfloat16)
    do = torch.randn(S, N, H * E, device=device).to(torch.bfloat16)
    scale = E ** -0.5
    tables = WA.region_bits(dims, win, shift, device)

    def sdpa(t):
        q, k, v = t.reshape(S, N, 3, H, E).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(samples, 1, 1)[:, None],
                                                             scale=scale)
        return o.transpose(1, 2).reshape(S, N, H * E)

    ref = qkv.double().requires_grad_()
    yr = sdpa(ref)
    yr.backward(do.double())
    out = {}
    for name, fn in (("triton", lambda t: WA.window_attention(t, H, scale, tables)), ("sdpa", sdpa)):
        xi = qkv.clone().requires_grad_()
        y = fn(xi)
        y.backward(do)
        D = H * E
        for label, a, b in (("o", y, yr), ("dq", xi.grad[..., :D], ref.grad[..., :D]),
                            ("dk", xi.grad[..., D:2 * D], ref.grad[..., D:2 * D]),
                            ("dv", xi.grad[..., 2 * D:], ref.grad[..., 2 * D:])):
            out[f"attn_{name}_{label}_rel_err"] = float((a.detach().double() - b.detach()).norm() / b.detach().norm())
    return out


def check_fused_mlp(device: torch.device, rows: int = 65536) -> dict:
    """The Triton MLPs alone (``fused``: ``fused_mlp``, widths 96 and 192; ``epilogue``: ``gelu_mlp``, the 51M's
    four widths 96-768), bf16: relative L2 error of the output and every gradient against float64 on the same bf16
    inputs, next to PyTorch's bf16 autocast MLP's error."""
    from neuro_models.swift.kernels.fused_mlp import MAX_DIM as FUSED_MAX_DIM
    from neuro_models.swift.kernels.fused_mlp import fused_mlp
    from neuro_models.swift.kernels.gelu_mlp import gelu_mlp

    out = {}
    for C in (96, 192, 384, 768):
        torch.manual_seed(0)
        fc1, fc2 = torch.nn.Linear(C, 4 * C).to(device), torch.nn.Linear(4 * C, C).to(device)
        x = torch.randn(rows, C, device=device).to(torch.bfloat16)
        dy = torch.randn(rows, C, device=device).to(torch.bfloat16)
        params = list(fc1.parameters()) + list(fc2.parameters())
        ref = [p.detach().to(torch.bfloat16).double().requires_grad_() for p in params]
        xr = x.double().requires_grad_()
        yr = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(xr, *ref[:2])), *ref[2:])
        yr.backward(dy.double())
        want = [yr.detach(), xr.grad] + [p.grad for p in ref]
        for name, fn in (("fused", lambda t: fused_mlp(t, fc1, fc2)), ("epilogue", lambda t: gelu_mlp(t, fc1, fc2)),
                         ("torch", lambda t: fc2(torch.nn.functional.gelu(fc1(t))))):
            if name == "fused" and C > FUSED_MAX_DIM:
                continue
            for p in params:
                p.grad = None
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(xi)
            y.backward(dy)
            got = [y.detach(), xi.grad] + [p.grad for p in params]
            for label, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, want):
                out[f"mlp{C}_{name}_{label}_rel_err"] = float((a.double() - b).norm() / b.norm())
    return out


def markdown(rows: list[dict], device_name: str, variants: list[str]) -> str:
    lines = [f"Device: {device_name}; fwd + bwd ms per block call (batch {rows[0]['batch'] if rows else '-'}); "
             "in parentheses GPU (kernel) time per call; the step sum uses GPU time where measured", "",
             "| block | count in 51M | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    by = {(r["case"], r["variant"]): r for r in rows}
    totals = dict.fromkeys(variants, 0.0)
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for v in variants:
            r = by.get((case, v))
            ok = r is not None and r["status"] == "ok"
            gpu = f" ({r['gpu_ms']:.2f})" if ok and "gpu_ms" in r else ""
            cells.append(f"{r['ms']:.2f}{gpu}" if ok else (r["status"][:40] if r else "-"))
            if ok:
                totals[v] += r.get("gpu_ms", r["ms"]) * r["count"]
        lines.append(f"| {case} | {ALL_CASES[case][2]} | " + " | ".join(cells) + " |")
    lines.append("| **blocks per step** | | " + " | ".join(f"**{totals[v]:.1f}**" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(ALL_CASES)}")
    ap.add_argument("--variants", default="sdpa-cudnn,flex,auto")
    ap.add_argument("--plan", default="", help="comma list of case:variant pairs to run instead of cases x variants "
                    "(none: only --check)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="record GPU time per call and the top kernels")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per profiled row")
    ap.add_argument("--check", action="store_true", help="run the numerics check first (CHECK_RUNS)")
    ap.add_argument("--check-all", action="store_true", help="the check with session 6's runs too (CHECK_ALL)")
    ap.add_argument("--check-kernels", action="store_true", help="only the kernel-level checks (fused MLP, window "
                    "attention against float64), no model runs")
    ap.add_argument("--check-runs", default="", help="the check with these impl:precision runs only (the first "
                    "must be sdpa:fp32, the reference), e.g. sdpa:fp32,flex:bf16res-select,flex:bf16res-select-fmlp")
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="skip cases once this many seconds of "
                    "case timing have passed (the numerics check does not count)")
    ap.add_argument("--out", default="swift_blocks.json")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (FlexAttention has no CPU backward in torch 2.13)")
    device = torch.device("cuda")
    global TOP_KERNELS
    TOP_KERNELS = args.top
    torch.backends.cuda.matmul.allow_tf32 = True
    _set_dynamo_limits()
    t_start = time.perf_counter()
    meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__)
    result: dict = dict(meta=meta, rows=[])
    variants = args.variants.split(",")

    def write() -> str:
        meta["wall_s"] = time.perf_counter() - t_start
        Path(args.out).write_text(json.dumps(result, indent=1))
        md = markdown(result["rows"], meta["device"], variants)
        if args.md:
            Path(args.md).write_text(md)
        return md

    if args.check_kernels and not (args.check or args.check_all or args.check_runs):
        try:
            result["check"] = {**check_fused_mlp(device), **check_window_attn(device)}
        except Exception as e:  # noqa: BLE001
            result["check"] = dict(status=f"error: {type(e).__name__}: {str(e)[:500]}")
        print(json.dumps(result["check"]), flush=True)
        write()
    if args.check or args.check_all or args.check_runs:
        runs = ([tuple(r.split(":")) for r in args.check_runs.split(",")] if args.check_runs
                else CHECK_ALL if args.check_all else CHECK_RUNS)
        try:
            result["check"] = check_numerics(device, runs)
        except Exception as e:  # noqa: BLE001
            result["check"] = dict(status=f"error: {type(e).__name__}: {str(e)[:500]}")
            print(json.dumps(result["check"]), flush=True)
        write()
    t_cases = time.perf_counter()  # the budget covers the cases only: a long check cannot starve them
    plan = ([] if args.plan == "none" else [tuple(p.split(":")) for p in args.plan.split(",")] if args.plan
            else [(c, v) for c in args.cases.split(",") for v in variants])
    if args.plan:
        variants = list(dict.fromkeys(v for _, v in plan))
    for case, v in plan:
        if time.perf_counter() - t_cases > args.time_budget:
            result["rows"].append(dict(case=case, variant=v, batch=args.batch, count=ALL_CASES[case][2],
                                       status="skipped (time budget)"))
            continue
        timer = time_region if case in REGIONS else time_block
        result["rows"].append(timer(case, v, args.batch, args.iters, args.warmup, device, args.profile))
        torch.cuda.empty_cache()
        write()
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
