"""SwiFT v2 training benchmark: samples/s, MFU and peak memory on one GPU (or CPU for a smoke run).

Measures full pre-training steps (SimMIM forward + backward + fused AdamW) under bf16 autocast on
synthetic input, for:

* ``target``: the SwiFT v1 reference configuration (51M: embed 96, depths 2-2-18-2, heads
  6-12-24-48, patch 6x6x6x1, windows 4x4x4x4, input 96^3 x 20) at batch 16 and 8, the case the
  issue's >= 262 samples/s and <= half-memory targets refer to;
* ``ladder``: the SwiFT v2 sizes (patch 6x6x6x2) that fit one GPU;
* ``seqlen``: peak memory vs sequence length T = 20/40/80/160 for both variants at batch 1 and 8
  (51M; v1 windows 4x4x4x4 at patch 6x6x6x1, revised windows 4x4x4 x 10 frames).

MFU uses the analytic train FLOPs per sample (``registry.flops_per_sample``) against both the
measured dense bf16 matmul rate of an H100 (780 TFLOP/s) and its datasheet peak (989 TFLOP/s).
Needs only torch (no mup, no ray). Writes JSON and a Markdown table.

Examples
--------
On a GPU machine::

    python benchmarks/swift_benchmark.py --suite target,seqlen --out results.json --md results.md

CPU smoke run (tiny sizes, eager)::

    python benchmarks/swift_benchmark.py --suite smoke --compile none --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuro_models import registry as R  # noqa: E402
from neuro_models.layers import compile_regions  # noqa: E402
from neuro_models.swift.config import ATTN_IMPLS, MLP_IMPLS  # noqa: E402

PEAK_MEASURED = 780e12
PEAK_DATASHEET = 989e12
V1_51M = dict(patch_size=(6, 6, 6, 1), window_size=(4, 4, 4, 4), mask_patch_size=(12, 12, 12, 2))
REVISED_51M = dict(window_size=(4, 4, 4, 10))


def _set_dynamo_limits() -> None:
    from neuro_models.layers import raise_recompile_limits

    raise_recompile_limits()


def small_regions(cfg, batch: int):
    """``region_kwargs`` for ``compile_regions``: CUDA graphs for the small (launch-bound) stages only, the policy
    ``study.train`` uses (``neuro_models.swift.compile_policy``)."""
    from neuro_models.swift.compile_policy import small_stage_graphs

    return small_stage_graphs(cfg, batch)


def compile_model(model: torch.nn.Module, mode: str, cfg=None, batch: int = 0) -> torch.nn.Module:
    """``none``: eager; ``block`` (``block-cg``: with CUDA graphs, ``mode="reduce-overhead"``; ``block-cgs``: CUDA
    graphs for the small stages only, ``small_regions``): regional compilation (``neuro_models.layers.compile_regions``:
    every encoder block, patch embedding and merging, the decoder and the loss, static shapes; blocks of one shape
    share compiled code); ``model``: ``torch.compile`` of the whole model."""
    if mode == "none":
        return model
    _set_dynamo_limits()
    if mode == "model":
        return torch.compile(model, dynamic=False)
    if mode == "block-cgs":
        compile_regions(model, small_regions(cfg, batch))
    else:
        compile_regions(model, **({"mode": "reduce-overhead"} if mode == "block-cg" else {}))
    return model


def _sdpa_context(sdpa: str):
    """``default``: PyTorch's kernel choice (flash first; the model turns cuDNN off); ``cudnn``: prefer cuDNN
    attention only; ``efficient``: the memory-efficient kernel only (flash and cuDNN off). Global backend flags,
    so a compiled region traced inside the context uses the same kernel."""
    import contextlib

    if sdpa == "default":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def flags(flash: bool, efficient: bool, cudnn: bool):
        b = torch.backends.cuda
        old = (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled())
        b.enable_flash_sdp(flash), b.enable_mem_efficient_sdp(efficient), b.enable_cudnn_sdp(cudnn)
        try:
            yield
        finally:
            b.enable_flash_sdp(old[0]), b.enable_mem_efficient_sdp(old[1]), b.enable_cudnn_sdp(old[2])

    if sdpa == "efficient":
        return flags(False, True, False)
    return flags(False, False, True) if sdpa == "cudnn" else contextlib.nullcontext()


def run_case(name: str, family: str, size: str, overrides: dict, batch: int, *, compile_mode: str, steps: int,
             warmup: int, device: torch.device, variant: str = "", sdpa: str = "default",
             profile_dir: str | None = None, select: bool = False) -> dict:
    """Time ``steps`` training steps after ``warmup``; returns a result row (``status`` OOM on OOM).

    ``variant="noshift"`` turns every shifted block into a regular one (an ablation that shows the
    cost of the Swin region mask; not a valid model); ``"split"``/``"mask"`` pick ``shift_impl``;
    ``"ckpt"`` turns on activation checkpointing. ``profile_dir`` writes a kernel table there. ``select``: SimMIM's
    token selection (``exact_mask=True``: the masks come from ``make_mask``).
    """
    if variant in ("split", "mask"):
        overrides = {**overrides, "shift_impl": variant}
    if variant == "ckpt":
        overrides = {**overrides, "use_checkpoint": True}
    cfg = R.get_config(family, size, **overrides)
    row = dict(name=name + (f"-{variant}" if variant else "") + (f"-{sdpa}" if sdpa != "default" else ""),
               family=family, size=size, batch=batch, img_size=list(cfg.img_size),
               patch_size=list(cfg.patch_size), window_size=list(cfg.window_size), compile=compile_mode,
               shift_impl=cfg.shift_impl, attn_impl=cfg.attn_impl, bf16_residual=cfg.bf16_residual,
               use_checkpoint=cfg.use_checkpoint, params=R.param_counts(cfg)["total"],
               encoder_params=R.param_counts(cfg)["encoder"], train_flops_per_sample=R.flops_per_sample(cfg)["train"],
               token_select=select, fused_head=getattr(cfg, "fused_head", None),
               fused_mlp=getattr(cfg, "fused_mlp", None), mlp_impl=getattr(cfg, "mlp_impl", None))
    if select:
        row["train_flops_selected"] = R.flops_per_sample(cfg).get("train_selected")
    model = opt = None
    try:
        torch.manual_seed(0)
        if compile_mode != "none":
            torch._dynamo.reset()
        model = R.build_pretrain_model(cfg).to(device)
        if variant == "noshift":
            for m in model.modules():
                if hasattr(m, "shifted"):
                    m.shifted = False
        net = compile_model(model, compile_mode, cfg, batch)
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
        x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device)
        brain = torch.ones(batch, *cfg.img_size[:3], dtype=torch.bool, device=device)
        mask = model.make_mask(batch, generator=torch.Generator().manual_seed(0), device=device)

        def step() -> float:
            if compile_mode.startswith("block-cg"):
                torch.compiler.cudagraph_mark_step_begin()
            with _sdpa_context(sdpa), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                out = net(x, brain_mask=brain, mask=mask, **({"exact_mask": True} if select else {}))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out["loss"]

        t_compile = time.perf_counter()
        for i in range(warmup):
            loss = step()
            _sync(device)
            print(f"  [{name}] warmup step {i} done at {time.perf_counter() - t_compile:.1f}s", file=sys.stderr,
                  flush=True)
        row["warmup_s"] = time.perf_counter() - t_compile
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = step()  # the first step after a sync: the host's time to issue one step (launch-bound if ~ step_s)
        row["host_step_ms"] = (time.perf_counter() - t0) * 1e3
        for _ in range(steps - 1):
            loss = step()
        _sync(device)
        dt = time.perf_counter() - t0
        row["loss"] = float(loss)
        row["step_s"] = dt / steps
        row["samples_per_s"] = batch * steps / dt
        fl = row["train_flops_per_sample"] * row["samples_per_s"]
        row["tflops"] = fl / 1e12
        row["mfu_measured_780"] = fl / PEAK_MEASURED
        row["mfu_datasheet_989"] = fl / PEAK_DATASHEET
        if device.type == "cuda":
            row["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            if compile_mode.startswith("block-cg"):  # CUDA-graph pools are reserved, not counted as allocated: report reserved
                row["peak_alloc_gib"] = row["peak_reserved_gib"]
        row["status"] = "ok" if torch.isfinite(torch.tensor(row["loss"])) else "nonfinite"
        if profile_dir:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(2):
                    step()
                _sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
            Path(profile_dir, f"profile_{row['name']}.txt").write_text(table)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cases(suite: str) -> list[tuple]:
    """(name, family, size, overrides, batch) of a suite."""
    out: list[tuple] = []
    if suite == "smoke":
        out += [("smoke-v1", "swift_v2", "debug", {}, 2), ("smoke-revised", "swift_v2_revised", "debug", {}, 2)]
    if suite == "target":
        for b in (16, 8):
            out.append((f"v1cfg-51M-b{b}", "swift_v2", "51M", V1_51M, b))
    if suite == "ladder":
        for size, b in (("51M", 16), ("202M", 8), ("806M", 4), ("3B", 1)):
            out.append((f"ladder-{size}-b{b}", "swift_v2", size, {}, b))
    if suite.startswith("seqlen"):
        fams = (("swift_v2_revised", REVISED_51M), ("swift_v2", V1_51M))
        fams = fams[:1] if suite == "seqlen_revised" else fams[1:] if suite == "seqlen_v1" else fams
        for fam, ov in fams:
            for b in (1, 8):
                for T in (20, 40, 80, 160):
                    out.append((f"seqlen-{fam}-T{T}-b{b}", fam, "51M", {**ov, "img_size": (96, 96, 96, T)}, b))
    if suite == "revised":
        for b in (16, 8):
            out.append((f"revised-51M-b{b}", "swift_v2_revised", "51M", REVISED_51M, b))
    return out


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"Device: {device_name}", "",
             "| case | batch | T | compile | shift | attention | samples/s | TFLOP/s | MFU (780) | MFU (989) | peak alloc GiB | "
             "peak reserved GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k, fmt="{:.1f}"):
            return fmt.format(r[k]) if k in r else "-"
        lines.append(f"| {r['name']} | {r['batch']} | {r['img_size'][3]} | {r['compile']} | {r.get('shift_impl', '-')} | {r.get('attn_impl', '-')} | {f('samples_per_s')} | "
                     f"{f('tflops')} | {f('mfu_measured_780', '{:.1%}')} | {f('mfu_datasheet_989', '{:.1%}')} | "
                     f"{f('peak_alloc_gib')} | {f('peak_reserved_gib')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="target", help="comma list of: smoke, target, revised, ladder, seqlen "
                    "(seqlen_revised / seqlen_v1: one variant)")
    ap.add_argument("--compile", default="block", choices=["none", "block", "block-cg", "block-cgs", "model"])
    ap.add_argument("--seqlen-compile", default="none", choices=["none", "block", "model"],
                    help="compile mode for the seqlen (memory) suite")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="skip cases after this many seconds")
    ap.add_argument("--variants", default="", help="comma list of extra runs of the target cases: "
                    "eager, noshift, cudnn, efficient, split, mask, ckpt")
    ap.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing in every case")
    ap.add_argument("--batches", default="", help="comma list: only cases with these batch sizes")
    ap.add_argument("--shift-impl", default=None, choices=["mask", "split"], help="shift_impl for every case")
    ap.add_argument("--attn-impl", default=None, choices=list(ATTN_IMPLS),
                    help="SwiftConfig.attn_impl for every case (4D family)")
    ap.add_argument("--bf16-residual", action="store_true", help="SwiftConfig.bf16_residual in every case")
    ap.add_argument("--select", action="store_true", help="SimMIM token selection (exact_mask=True) in every case")
    ap.add_argument("--no-fused-head", action="store_true", help="SwiftConfig.fused_head=False (the PyTorch decoder "
                    "tail and loss) in every case")
    ap.add_argument("--fused-mlp", action="store_true", help="SwiftConfig.fused_mlp=True (Triton MLP in stages 1-2) "
                    "in every case")
    ap.add_argument("--mlp-impl", default=None, choices=list(MLP_IMPLS),
                    help="SwiftConfig.mlp_impl for every case (4D family)")
    ap.add_argument("--flex-options", default="model", choices=["model", "pytorch"],
                    help="FlexAttention kernel_options: the model's tuned defaults or PyTorch's")
    ap.add_argument("--sdpa", default="default", choices=["default", "efficient", "cudnn"],
                    help="attention kernel for every case (see _sdpa_context)")
    ap.add_argument("--profile", default="", help="comma list of case names to profile (kernel tables)")
    ap.add_argument("--out", default="swift_benchmark.json")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.flex_options == "pytorch":
        from neuro_models.swift import layers as swift_layers

        swift_layers.FLEX_KERNEL_OPTIONS = {}
    t_start = time.perf_counter()
    rows: list[dict] = []
    oom_series: set = set()
    for suite in args.suite.split(","):
        for name, fam, size, ov, b in cases(suite):
            if args.shift_impl:
                ov = {**ov, "shift_impl": args.shift_impl}
            if args.bf16_residual:
                ov = {**ov, "bf16_residual": True}
                name += "-bf16res"
            if args.attn_impl and fam == "swift_v2":
                ov = {**ov, "attn_impl": args.attn_impl}
                name += f"-{args.attn_impl}"
            if args.use_checkpoint:
                ov = {**ov, "use_checkpoint": True}
                name += "-ckpt"
            if args.select:
                name += "-select"
            if args.no_fused_head:
                ov = {**ov, "fused_head": False}
                name += "-torchhead"
            if args.fused_mlp:
                ov = {**ov, "fused_mlp": True}
                name += "-fmlp"
            if args.mlp_impl and fam == "swift_v2":
                ov = {**ov, "mlp_impl": args.mlp_impl}
                name += f"-mlp{args.mlp_impl}"
            if args.flex_options == "pytorch":
                name += "-ptflex"
            if args.batches and str(b) not in args.batches.split(","):
                continue
            skip = None
            if time.perf_counter() - t_start > args.time_budget:
                skip = "skipped (time budget)"
            elif suite.startswith("seqlen") and (fam, b) in oom_series:
                skip = "skipped (OOM at a shorter T)"  # a seqlen series stops growing T after its first OOM
            if skip:
                rows.append(dict(name=name, family=fam, size=size, batch=b, img_size=list(ov.get("img_size", (0,) * 4)),
                                 compile="-", status=skip))
                continue
            mode = args.seqlen_compile if suite.startswith("seqlen") else args.compile
            steps = max(2, args.steps // 3) if suite.startswith("seqlen") else args.steps
            prof_dir = str(Path(args.out).parent) if name in args.profile.split(",") else None
            rows.append(run_case(name, fam, size, ov, b, compile_mode=mode, steps=steps,
                                 warmup=args.warmup if mode != "none" else 1, device=device, profile_dir=prof_dir,
                                 sdpa=args.sdpa, select=args.select))
            if rows[-1]["status"] == "OOM":
                oom_series.add((fam, b))
            if suite == "target":
                for v in filter(None, args.variants.split(",")):
                    if time.perf_counter() - t_start > args.time_budget:
                        break
                    vdir = str(Path(args.out).parent) if f"{name}-{v}" in args.profile.split(",") else None
                    rows.append(run_case(name, fam, size, ov, b, device=device, steps=args.steps,
                                         compile_mode="none" if v == "eager" else mode,
                                         warmup=1 if v == "eager" else args.warmup,
                                         variant="" if v in ("eager", "cudnn", "efficient") else v,
                                         sdpa=v if v in ("cudnn", "efficient") else "default", profile_dir=vdir,
                                         select=args.select))
                    _write(args, rows, device_name, t_start)
            _write(args, rows, device_name, t_start)
    print(_write(args, rows, device_name, t_start))
    return 0


def _write(args, rows: list[dict], device_name: str, t_start: float) -> str:
    """Write JSON and Markdown after every case, so a run cut short keeps what it measured."""
    meta = dict(device=device_name, torch=torch.__version__, peak_measured=PEAK_MEASURED,
                peak_datasheet=PEAK_DATASHEET, wall_s=time.perf_counter() - t_start)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(rows, device_name)
    if args.md:
        Path(args.md).write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
