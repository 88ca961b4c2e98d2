"""NeuroMamba benchmark: background removal, scan implementations, throughput and memory per size.

Synthetic fMRI-like data inside the real MNI152 2 mm brain mask (nilearn's
``load_mni152_brain_mask(resolution=2)``, 99x117x95, centre-cropped/padded -- not stretched --
into the 96^3 grid as SwiFT preprocessing does; saved in ``benchmarks/mni152_brain_mask_96.npz``
so machines without nilearn can load it), T = 20 frames, zero outside the brain
(``znorm_zeroback``-like). Training steps are forward + backward + AdamW under bf16 autocast.

Sections (each guarded by a time budget, results written after every section):

1. ``flops``: analytic FLOPs per sample with and without background removal, and the dense part
   measured by ``torch.utils.flop_counter`` on one real forward.
2. ``removal``: train-step wall time with and without removal (same model, same batch).
3. ``scan``: one Mamba layer's selective scan (forward + backward) at the 3.1M model's shape with
   each implementation, plus agreement of the fast scan with the eager one.
4. ``sizes``: tokens/s, samples/s, peak memory and achieved FLOP/s per size (with removal).
5. ``removal_compiled`` (opt-in via ``--sections``): section 2 with the ``torch.compile``-d scan.

On the H100 (2026-11-26) the compiled scan took ~200 s to compile and ran slower than the eager
chunked scan with its hand-written backward, so the eager one is used for ``sizes``.

Usage::

    python benchmarks/mamba_benchmark.py --out /tmp/mamba            # GPU, full
    python benchmarks/mamba_benchmark.py --smoke --device cpu        # seconds, checks the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import Sections  # noqa: E402
from neuro_models import registry as R  # noqa: E402
from neuro_models.flops import measure_flops  # noqa: E402
from neuro_models.mamba.family import forward_flops_per_token  # noqa: E402
from neuro_models.mamba.scan import selective_scan  # noqa: E402
from neuro_models.mamba.tokens import keep_tokens  # noqa: E402

MASK_PATH = Path(__file__).resolve().parent / "mni152_brain_mask_96.npz"


def load_mask(T_grid=(96, 96, 96)) -> np.ndarray:
    m = np.load(MASK_PATH)["mask"].astype(bool)
    assert m.shape == tuple(T_grid), m.shape
    return m


def synthetic_batch(mask: np.ndarray, B: int, T: int, device, seed: int = 0):
    """Smooth random BOLD-like signal inside the mask, zero outside: ``x [B, 1, 96, 96, 96, T]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    X, Y, Z = mask.shape
    low = torch.randn(B, 1, X // 6, Y // 6, Z // 6, T, generator=g)
    x = low.repeat_interleave(6, 2).repeat_interleave(6, 3).repeat_interleave(6, 4)
    x = x + 0.3 * torch.randn(B, 1, X, Y, Z, T, generator=g)
    m = torch.from_numpy(mask)
    x = x * m[None, None, :, :, :, None]
    bm = m[None].expand(B, X, Y, Z).contiguous()
    return x.to(device), bm.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_steps(model, x, bm, device, steps: int, warmup: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dt = torch.bfloat16 if device.type == "cuda" else None
    out = None

    def step():
        nonlocal out
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=dt or torch.bfloat16, enabled=dt is not None):
            out = model(x, brain_mask=bm)
        out["loss"].backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": sec, "peak_mem_gib": peak, "num_tokens": out["num_tokens"], "loss": out["loss"].item(),
            "flops_forward_batch": out["flops_forward"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new sections after this")
    ap.add_argument("--sizes", default="1.4M,3.1M,12M,41M")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sections", default="flops,removal_chunked,scan,sizes",
                    help="comma-separated sections to run (fixed order: flops, removal_chunked, scan, sizes, "
                         "removal_compiled); removal_compiled is opt-in")
    ap.add_argument("--smoke", action="store_true", help="tiny run (debug size, 4 frames, 1 step) to check the script")
    ap.add_argument("--store", default=None, help="also append rows to the results store's 'benchmark' table here")
    ap.add_argument("--from-json", default=None, help="do not run: convert an earlier JSON (Markdown, --store rows)")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        print(to_markdown(res))
        if args.store:
            print(f"{store_rows(res, args.store)} rows appended to {args.store}")
        return 0
    t_start = time.perf_counter()
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.frames, args.batch, args.steps, args.sizes = 4, 1, 1, "debug"
        main_size = "debug"
    else:
        main_size = "3.1M"
    T = args.frames
    mask = load_mask()
    res: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "frames": T, "batch": args.batch, "mask": "MNI152 2mm brain mask in 96^3",
        "mask_voxel_fraction": float(mask.mean()), "main_size": main_size, "sections": {}, "errors": {},
    }

    def save():
        (out_dir / "mamba_benchmark.json").write_text(json.dumps(res, indent=2, default=float))
        (out_dir / "mamba_benchmark.md").write_text(to_markdown(res))

    sections = Sections(res, wanted=args.sections, budget_s=args.budget_s, save=save, device=device,
                        t_start=t_start)
    section, left = sections.run, sections.left

    x, bm = synthetic_batch(mask, args.batch, T, device)
    cfg = R.get_config("neuromamba", main_size, img_size=(96, 96, 96, T))

    # 1. FLOPs ------------------------------------------------------------------------------------
    def flops_section():
        keep = keep_tokens(bm[:1].cpu(), cfg.img_size, cfg.patch_size)
        n_keep, n_all = int(keep.sum()), keep.numel()
        per_tok = forward_flops_per_token(cfg)
        model = R.build_pretrain_model(cfg).to(device)
        counted = {}
        for remove in (True, False):
            model.remove_background = remove
            with torch.no_grad():
                counted[remove] = measure_flops(lambda: model(x[:1], brain_mask=bm[:1]))
        fwd_on, fwd_off = per_tok["total"] * n_keep, per_tok["total"] * n_all
        return {"size": main_size, "tokens_kept": n_keep, "tokens_all": n_all, "kept_fraction": n_keep / n_all,
                "forward_flops_removal": fwd_on, "forward_flops_full": fwd_off,
                "train_flops_removal": 3 * fwd_on, "train_flops_full": 3 * fwd_off,
                "flops_reduction": 1 - fwd_on / fwd_off,
                "dense_counted_removal": counted[True], "dense_counted_full": counted[False],
                "scan_share_of_forward": per_tok["scan"] / per_tok["total"],
                "dense_analytic_removal": per_tok["dense"] * n_keep, "dense_analytic_full": per_tok["dense"] * n_all}

    section("flops", flops_section, need_s=10)

    # 2. background removal: wall time -------------------------------------------------------------
    def removal_section(scan_impl):
        def run():
            torch.manual_seed(0)
            model = R.build_pretrain_model(R.get_config("neuromamba", main_size, img_size=(96, 96, 96, T),
                                                        scan_impl=scan_impl)).to(device)
            r = {}
            for remove in (True, False):
                model.remove_background = remove
                r["removal" if remove else "full"] = time_train_steps(model, x, bm, device, args.steps, warmup=2)
            r["speedup"] = r["full"]["step_s"] / r["removal"]["step_s"]
            r["samples_per_s_removal"] = args.batch / r["removal"]["step_s"]
            r["samples_per_s_full"] = args.batch / r["full"]["step_s"]
            return r
        return run

    section("removal_chunked", removal_section("chunked"), need_s=60)

    # 3. scan implementations ----------------------------------------------------------------------
    def scan_section():
        E, N = cfg.d_inner, cfg.d_state
        n_keep = res["sections"].get("flops", {}).get("tokens_kept", 1491 * (T // 2))
        L = args.batch * (n_keep + cfg.d_conv - 1)
        L += (-L) % cfg.scan_chunk  # exactly the packed length of the model's batch (reuses compiled code)
        g = torch.Generator(device="cpu").manual_seed(0)

        def mk(*s, pos=False):
            t = torch.randn(*s, generator=g)
            return (torch.nn.functional.softplus(t) * 0.1 if pos else t).to(device)

        u, delta, z = mk(1, L, E), mk(1, L, E, pos=True), mk(1, L, E)
        A = -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32))).repeat(E, 1).to(device)
        B, C, D = mk(1, L, N), mk(1, L, N), torch.ones(E, device=device)
        starts = torch.zeros(1, L, dtype=torch.bool, device=device)
        starts[0, torch.arange(args.batch) * (L // args.batch)] = True
        ins = [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]
        dy = mk(1, L, E)
        impls = ["chunked", "chunked_autograd"] + ([] if args.no_compile else ["compiled"])
        out, ref = {"L": L, "E": E, "N": N}, None
        for impl in impls:
            try:
                def fb():
                    y = selective_scan(*ins, starts, impl=impl)
                    grads = torch.autograd.grad((y * dy).sum(), ins)
                    return y, grads
                t0 = time.perf_counter()
                y, grads = fb()  # warm-up (compiles for "compiled")
                sync(device)
                first = time.perf_counter() - t0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                reps = 3
                t0 = time.perf_counter()
                for _ in range(reps):
                    y, grads = fb()
                sync(device)
                r = {"fwd_bwd_ms": (time.perf_counter() - t0) / reps * 1e3, "first_call_s": first,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
                if ref is None:
                    ref = (y.detach(), [gr.detach() for gr in grads])
                else:
                    r["max_abs_diff_y"] = (y.detach() - ref[0]).abs().max().item()
                    r["max_rel_diff_grads"] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                                  for a, b in zip(grads, ref[1]))
                out[impl] = r
            except torch.cuda.OutOfMemoryError as e:
                out[impl] = {"error": f"OOM: {str(e)[:200]}"}
            except Exception as e:
                out[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # float64 check of the chunked scan against the sequential reference on this device
        Ls, Es = 300, min(E, 64)
        d64 = [t.detach().double() for t in (u, delta, A, B, C, D, z)]
        args64 = [d64[0][:, :Ls, :Es], d64[1][:, :Ls, :Es], d64[2][:Es], d64[3][:, :Ls], d64[4][:, :Ls],
                  d64[5][:Es], d64[6][:, :Ls, :Es]]
        st = starts[:, :Ls].clone()
        st[0, 100] = True
        y_seq = selective_scan(*args64, st, impl="sequential")
        y_ch = selective_scan(*args64, st, impl="chunked")
        out["float64_chunked_vs_sequential_max_abs"] = float((y_seq - y_ch).abs().max())
        return out

    section("scan", scan_section, need_s=60)

    # 4. sizes --------------------------------------------------------------------------------------
    def sizes_section():
        impl = "chunked"  # eager with the hand-written backward: the fastest on the H100 (compiled was 2.3x slower)
        out = {"scan_impl": impl}
        # sizes of depth >= 24 recompute each block in backward (activation checkpointing) to fit
        runs = [(name, name, {"scan_impl": impl,
                              "checkpoint_blocks": R.get_config("neuromamba", name).depth >= 24})
                for name in args.sizes.split(",")]
        # Mamba-2 (SSD) at the seed's best width/depth, for comparison (its own parameter count)
        runs.append((f"{main_size} mamba2 (S=64, P=32)", main_size,
                     {"mixer": "mamba2", "d_state": 64, "headdim": 16 if args.smoke else 32, "scan_chunk": 64}))
        for label, name, over in runs:
            if left() < 25:
                out[label] = {"skipped": "budget"}
                continue
            try:
                torch.manual_seed(0)
                c = R.get_config("neuromamba", name, img_size=(96, 96, 96, T), **over)
                model = R.build_pretrain_model(c).to(device)
                r = time_train_steps(model, x, bm, device, max(2, args.steps // 2), warmup=1)
                r["params_encoder"] = R.param_counts(c)["encoder"]
                r["checkpoint_blocks"] = c.checkpoint_blocks
                r["tokens_per_s"] = r["num_tokens"] / r["step_s"]
                r["samples_per_s"] = args.batch / r["step_s"]
                r["train_tflops_per_s"] = 3 * r["flops_forward_batch"] / r["step_s"] / 1e12
                out[label] = r
                del model
            except torch.cuda.OutOfMemoryError as e:
                out[label] = {"error": f"OOM: {str(e)[:200]}"}
            except Exception as e:
                out[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
        return out

    section("sizes", sizes_section, need_s=25)
    if not args.no_compile:  # opt-in (compiles for minutes, and was slower than eager on the H100)
        section("removal_compiled", removal_section("compiled"), need_s=240)
    res["total_s"] = time.perf_counter() - t_start
    save()
    print(to_markdown(res))
    if args.store:
        print(f"{store_rows(res, args.store)} rows appended to {args.store}")
    return 0


def benchmark_rows(res: dict) -> list[dict]:
    """Rows for the results store's ``benchmark`` table (name, metric, value, unit, device, device_count, config)."""
    rows = []
    s = res["sections"]

    def add(metric, value, unit, config):
        if value is not None:
            rows.append({"name": "neuromamba", "metric": metric, "value": float(value), "unit": unit,
                         "device": res["device"], "device_count": 1, "config": config})

    base = f"T={res['frames']},batch={res['batch']}"
    if "flops" in s:
        f = s["flops"]
        add("flops_reduction", f["flops_reduction"], "fraction", f"{f['size']},{base}")
        add("train_flops_per_sample_removal", f["train_flops_removal"], "FLOP", f"{f['size']},{base}")
        add("train_flops_per_sample_full", f["train_flops_full"], "FLOP", f"{f['size']},{base}")
    for key in ("removal_chunked", "removal_compiled"):
        if key in s:
            r = s[key]
            cfg = f"{res.get('main_size', '3.1M')},{base},scan={key.split('_')[1]}"
            add("removal_speedup", r["speedup"], "x", cfg)
            add("samples_per_s_removal", r["samples_per_s_removal"], "samples/s", cfg)
            add("samples_per_s_full", r["samples_per_s_full"], "samples/s", cfg)
    if "scan" in s:
        for impl in ("chunked", "chunked_autograd", "compiled"):
            r = s["scan"].get(impl, {})
            if "fwd_bwd_ms" in r:
                add("scan_fwd_bwd_ms", r["fwd_bwd_ms"], "ms", f"L={s['scan']['L']},E={s['scan']['E']},impl={impl}")
    if "sizes" in s:
        for name, r in s["sizes"].items():
            if isinstance(r, dict) and "step_s" in r:
                cfg = f"{name},{base},scan={s['sizes']['scan_impl']}"
                add("tokens_per_s", r["tokens_per_s"], "tokens/s", cfg)
                add("samples_per_s", r["samples_per_s"], "samples/s", cfg)
                add("peak_mem_gib", r["peak_mem_gib"], "GiB", cfg)
    return rows


def store_rows(res: dict, store_dir: str) -> int:
    from analysis.store import append_rows  # only here: the benchmark runs without pandas otherwise

    rows = benchmark_rows(res)
    append_rows(store_dir, "benchmark", rows)
    return len(rows)


def _f(v, fmt="{:.3g}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def to_markdown(res: dict) -> str:
    s = res["sections"]
    lines = [f"# NeuroMamba benchmark ({res['device']}, torch {res['torch']})", "",
             f"Synthetic data inside the MNI152 2 mm brain mask in 96^3 (voxel fraction "
             f"{res['mask_voxel_fraction']:.3f}), T = {res['frames']}, batch {res['batch']}, bf16 autocast, "
             "train step = forward + backward + AdamW.", ""]
    if "flops" in s:
        f = s["flops"]
        lines += ["## FLOPs per sample (" + f["size"] + ")", "",
                  "| | tokens | forward FLOPs | train FLOPs | dense, analytic | dense, flop_counter |",
                  "|---|---|---|---|---|---|",
                  f"| full | {f['tokens_all']} | {f['forward_flops_full']:.4g} | {f['train_flops_full']:.4g} | "
                  f"{f.get('dense_analytic_full', float('nan')):.4g} | {f['dense_counted_full']:.4g} |",
                  f"| background removed | {f['tokens_kept']} | {f['forward_flops_removal']:.4g} | "
                  f"{f['train_flops_removal']:.4g} | {f.get('dense_analytic_removal', float('nan')):.4g} | "
                  f"{f['dense_counted_removal']:.4g} |", "",
                  "(The counter also sees the 3 gap tokens per sample and the round-up to the scan chunk.)", "",
                  f"FLOPs reduction: **{100 * f['flops_reduction']:.1f}%** (kept tokens {100 * f['kept_fraction']:.1f}%); "
                  f"the scan's elementwise math is {100 * f['scan_share_of_forward']:.1f}% of the analytic forward count.", ""]
    for key in ("removal_chunked", "removal_compiled"):
        if key in s:
            r = s[key]
            lines += [f"## Wall time with and without background removal, scan `{key.split('_')[1]}`", "",
                      "| | step s | samples/s | tokens/step | peak GiB |", "|---|---|---|---|---|"]
            for k in ("full", "removal"):
                lines.append(f"| {k} | {r[k]['step_s']:.3f} | {res['batch'] / r[k]['step_s']:.2f} | "
                             f"{r[k]['num_tokens']} | {_f(r[k]['peak_mem_gib'])} |")
            lines += ["", f"Speed-up from removal: **{r['speedup']:.2f}x**", ""]
    if "scan" in s:
        sc = s["scan"]
        lines += [f"## Selective scan, one layer, forward + backward (L={sc['L']}, E={sc['E']}, N={sc['N']})", "",
                  "| impl | ms | first call s | peak GiB | max abs diff y | max rel diff grads |",
                  "|---|---|---|---|---|---|"]
        for impl in ("chunked", "chunked_autograd", "compiled"):
            if impl in sc:
                r = sc[impl]
                if "error" in r:
                    lines.append(f"| {impl} | {r['error'][:80]} | | | | |")
                else:
                    lines.append(f"| {impl} | {r['fwd_bwd_ms']:.1f} | {r['first_call_s']:.1f} | {_f(r['peak_mem_gib'])} | "
                                 f"{_f(r.get('max_abs_diff_y'), '{:.2e}')} | {_f(r.get('max_rel_diff_grads'), '{:.2e}')} |")
        lines += ["", f"float64 chunked vs sequential on this device: max abs diff "
                      f"{sc['float64_chunked_vs_sequential_max_abs']:.2e}", ""]
    if "sizes" in s:
        z = s["sizes"]
        lines += [f"## Throughput and memory per size (background removed, scan `{z['scan_impl']}`; "
                  "depth >= 24 with activation checkpointing)", "",
                  "| size | encoder params | step s | samples/s | tokens/s | train TFLOP/s (analytic) | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in z.items():
            if name == "scan_impl":
                continue
            if "step_s" not in r:
                lines.append(f"| {name} | {r} | | | | | |")
                continue
            lines.append(f"| {name} | {r['params_encoder']:,} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | "
                         f"{r['tokens_per_s']:.3g} | {r['train_tflops_per_s']:.2f} | {_f(r['peak_mem_gib'])} |")
        lines.append("")
    if res["errors"]:
        lines += ["## Errors / skipped", ""] + [f"- {k}: {v.splitlines()[0][:200]}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
