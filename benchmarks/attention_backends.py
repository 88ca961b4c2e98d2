"""Fused attention backends on the SwiFT window-attention shapes: forward + backward time per backend.

The SwiFT v1 reference configuration has head dim 16 in every stage (embed 96, heads 6-12-24-48) and
windows of 4x4x4x4 = 256 tokens; FlashAttention-2 pads head dims below 32, so which SDPA kernel runs
matters. For each attention call of one (unshifted) block per stage, at the given batch, this times
``scaled_dot_product_attention`` forward + backward in bf16 under each backend (flash,
memory-efficient, cuDNN) and compiled ``flex_attention`` (Triton kernels generated for the head dim, no
padding to 32), and reports ms per call and the best backend. Writes JSON and a Markdown table.

    python benchmarks/attention_backends.py --batch 16 --out attn.json --md attn.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuro_models import registry as R  # noqa: E402
from neuro_models.swift.config import stage_window  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swift_benchmark import V1_51M  # noqa: E402  (the reference configuration the SwiFT benchmark times)


def attention_shapes(cfg, batch: int) -> list[dict]:
    """(stage, S sequences, H heads, N tokens, E head dim, calls per step) of each stage's unshifted blocks."""
    out = []
    for s, (g, d, h, depth) in enumerate(zip(cfg.stage_grids(), cfg.stage_dims(), cfg.num_heads, cfg.depths)):
        full = cfg.last_layer_full_attention and s == cfg.num_stages - 1
        if full:
            S, N = batch, math.prod(g)
        else:
            win, _ = stage_window(tuple(g), tuple(cfg.window_size))
            N = math.prod(win)
            S = batch * math.prod(gi // wi for gi, wi in zip(g, win))
        out.append(dict(stage=s + 1, S=S, H=h, N=N, E=d // h, calls=depth))
    return out


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def time_backend(shape: dict, backend, device, iters: int) -> float | str:
    import contextlib

    from torch.nn.attention import sdpa_kernel

    S, H, N, E = shape["S"], shape["H"], shape["N"], shape["E"]
    q, k, v = (torch.randn(S, H, N, E, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(S, H, N, E, device=device, dtype=torch.bfloat16)
    attn = _flex() if backend == "flex" else F.scaled_dot_product_attention
    try:
        with contextlib.nullcontext() if backend == "flex" else sdpa_kernel([backend]):
            for i in range(iters + 2):
                if i == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                o = attn(q, k, v)
                o.backward(g)
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters * 1e3
    except Exception as e:  # backend refuses the shape (RuntimeError; Inductor/Triton errors for flex)
        return f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="attention_backends.json")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend

    torch.backends.cuda.enable_cudnn_sdp(True)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "flex": "flex"}
    device = torch.device("cuda")
    cfg = R.get_config("swift_v2", "51M", **V1_51M)
    rows = []
    for b in args.batch:
        for shp in attention_shapes(cfg, b):
            row = dict(batch=b, **shp)
            for name, be in backends.items():
                row[name] = time_backend(shp, be, device, args.iters)
            times = {n: row[n] for n in backends if isinstance(row[n], float)}
            row["best"] = min(times, key=times.get) if times else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"Device: {meta['device']}, torch {meta['torch']}", "",
             "| batch | stage | sequences | heads | tokens | head dim | blocks | " + " | ".join(f"{n} ms" for n in backends)
             + " | best | per step, flash -> best ms |", "|" + "---|" * (9 + len(backends))]
    for r in rows:
        cell = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)[:30]  # noqa: E731
        gain = (r["flash"] - r[r["best"]]) * r["calls"] if r["best"] and isinstance(r["flash"], float) else float("nan")
        lines.append(f"| {r['batch']} | {r['stage']} | {r['S']} | {r['H']} | {r['N']} | {r['E']} | {r['calls']} | "
                     + " | ".join(cell(r[n]) for n in backends) + f" | {r['best']} | {gain:.1f} |")
    md = "\n".join(lines) + "\n"
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
