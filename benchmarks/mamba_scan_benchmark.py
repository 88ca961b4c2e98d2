"""Fused Triton selective scan vs the chunked PyTorch scan: accuracy at the model's shapes, one layer's time, and
the NeuroMamba model's training throughput with each (issue #24, items 1-2).

Sections (each guarded by the time budget; the JSON is rewritten after every section):

1. ``check``: one layer's scan at the 3.1M model's shapes (E=384, N=16, the packed length of a batch of 4 samples at
   T=20 with background removal: 59,664 tokens, resets at each sample's first token after 3 gap tokens), inputs in
   the dtypes the model passes under bf16 autocast (u, B, C, z bf16; delta, A, D float32). The fused scan and the
   chunked scan against the float64 sequential reference on the same values: max abs error, that over the
   reference's max abs, and the relative L2 error of ``y`` and of every gradient.
2. ``scan``: forward and forward+backward time of that layer's scan, chunked vs fused (every launch configuration
   of ``CONFIGS``), peak memory, and the speed-up (target >= 20x).
3. ``model``: train steps (forward + backward + AdamW, bf16 autocast, batch 4, T=20, background removal) of the
   3.1M model with each scan: tokens/s, samples/s, peak memory (target >= 10x in tokens/s).
4. ``profile``: where a fused-scan train step goes (``torch.profiler``, top kernels by device time) -- item 2.
5. ``compiled``: the fused-scan model with every Mamba block ``torch.compile``-d (``fullgraph=True``: the scan is a
   custom op, so a block is one graph), tokens/s -- item 2.

Needs torch (+ Triton for the fused scan) and numpy only: the brain mask is ``benchmarks/mni152_brain_mask_96.npz``.

Usage::

    python benchmarks/mamba_scan_benchmark.py --out /tmp/mamba_scan                # H100: < 5 min
    TRITON_INTERPRET=1 python benchmarks/mamba_scan_benchmark.py --device cpu --tiny --out /tmp/ms  # checks the script
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mamba_benchmark import load_mask, synthetic_batch, time_train_steps  # noqa: E402

from _sections import Sections  # noqa: E402
from neuro_models import registry as R  # noqa: E402
from neuro_models.mamba.kernels import selective_scan as K  # noqa: E402
from neuro_models.mamba.scan import selective_scan  # noqa: E402
from neuro_models.mamba.tokens import keep_tokens  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def packed_layer_inputs(L: int, E: int, N: int, sample_lengths: list[int], gap: int, device, seed: int = 0):
    """One layer's scan inputs for a packed row of ``L`` tokens: ``(dict of leaves, starts [1, L], dy)``.

    Values as in a trained-from-init model: ``delta`` = softplus(...) around Mamba's dt range, ``A`` S4D-real
    (``-1..-N``), u/B/C/z unit normal, in bf16 (u, B, C, z) and float32 (delta, A, D)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    vals = {"u": torch.randn(1, L, E, generator=g), "z": torch.randn(1, L, E, generator=g),
            "delta": F.softplus(torch.randn(1, L, E, generator=g) - 3.0),
            "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1),
            "B": torch.randn(1, L, N, generator=g), "C": torch.randn(1, L, N, generator=g),
            "D": torch.ones(E)}
    low = {"u", "B", "C", "z"}
    leaves = {k: v.to(device=device, dtype=torch.bfloat16 if k in low else torch.float32) for k, v in vals.items()}
    starts = torch.zeros(1, L, dtype=torch.bool)
    pos = 0
    for n in sample_lengths:
        pos += gap
        starts[0, pos] = True
        pos += n
    assert pos <= L, (pos, L)
    dy = torch.randn(1, L, E, generator=g).to(device)
    return leaves, starts.to(device), dy


def fwd_bwd(impl: str, leaves: dict, starts, dy, config=None, grads=True):
    ins = [leaves[k].detach().requires_grad_(grads) for k in NAMES]
    if impl == "fused":
        y = K.fused_selective_scan(*ins, starts, config=config)
    else:
        y = selective_scan(*ins, starts, impl=impl)
    if not grads:
        return y, None
    return y, torch.autograd.grad((y * dy).sum(), ins)


def errors(got, ref) -> dict:
    got, ref = got.detach().double(), ref.detach().double()
    err = (got - ref).abs()
    m = float(ref.abs().max())
    return {"max_abs_err": float(err.max()), "max_abs_ref": m, "max_err_over_max_ref": float(err.max()) / max(m, 1e-300),
            "rel_l2": float((got - ref).norm() / ref.norm().clamp_min(1e-300))}


def worst_over_tolerance(errs: dict) -> float:
    """The largest relative L2 error over its tolerance: float32 tensors within 1e-4, bf16 gradients (returned in
    bf16) within 2^-7. Below 1 is within tolerance."""
    dt = errs["grad_dtypes"]
    return max(v["rel_l2"] / (2.0 ** -7 if dt.get(k) == "torch.bfloat16" else 1e-4)
               for k, v in errs.items() if isinstance(v, dict) and "rel_l2" in v)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Mean ms of ``fn()`` over ``reps`` calls after ``warmup`` (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="chunked", choices=["chunked", "sequential"],
                    help="float64 reference scan for the accuracy check (chunked: equal to sequential to ~1e-12, "
                         "tested; sequential: the per-token loop, minutes at the model's length)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                    help="JSON file (*.json) or folder (mamba_scan_benchmark.json and .md written there)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="3.1M")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed train steps per model (after 2 warm-up steps)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the layer's scan")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no section after this many seconds")
    ap.add_argument("--sections", default="check,scan,model,profile,compiled")
    ap.add_argument("--candidates", default="[]",
                    help="JSON list of launch configurations to check and time beside CONFIGS (as cand0, cand1, ...); "
                         "one enters CONFIGS only once measured, e.g. '[{\"T_CHUNK\": 256, \"BLOCK_E\": 16, "
                         "\"num_warps\": 1}]'")
    ap.add_argument("--tiny", action="store_true",
                    help="small shapes (for CPU under TRITON_INTERPRET=1): checks the script's code path")
    args = ap.parse_args(argv)
    try:
        candidates = json.loads(args.candidates)
        if not isinstance(candidates, list):
            raise ValueError("not a JSON list")
        for c in candidates:
            K.check_config(c)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        ap.error(f"--candidates: a JSON list of launch configurations: {e}")
    t_start = time.perf_counter()
    device = torch.device(args.device)
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / "mamba_scan_benchmark.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    T, Bsz = args.frames, args.batch
    mask = load_mask()
    if args.tiny:  # a 12^3 brain crop (8 tokens a sample), 2 frames, the debug model, short loops
        T, Bsz, args.steps, args.reps, args.size = 2, 2, 1, 1, "debug"
        mask = mask[42:54, 42:54, 42:54]
        args.budget_s = max(args.budget_s, 3600.0)  # the interpreter is slow; the point is the code path
    img = (*mask.shape, T)
    cfg = R.get_config("neuromamba", args.size, img_size=img)
    layer_cfg = R.get_config("neuromamba", "3.1M", img_size=img)  # the layer of the issue's target: E=384, N=16
    E, N, gap = layer_cfg.d_inner, layer_cfg.d_state, layer_cfg.d_conv - 1
    n_keep = int(keep_tokens(torch.from_numpy(mask)[None], img, cfg.patch_size).sum())
    L = Bsz * (n_keep + gap)
    L += (-L) % cfg.scan_chunk  # the model's packed length for this batch
    if args.tiny:
        E = 20
    res: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "triton": getattr(K.triton, "__version__", None),
                 "interpreter": K.INTERPRET, "size": args.size, "frames": T, "batch": Bsz,
                 "layer": {"L": L, "E": E, "N": N, "samples": Bsz, "tokens_per_sample": n_keep, "gap": gap},
                 "configs": K.CONFIGS, "candidates": candidates, "default_config": K.default_config(), "sections": {}, "errors": {}}

    def save():
        json_path.write_text(json.dumps(res, indent=2, default=float))
        json_path.with_suffix(".md").write_text(to_markdown(res))

    sections = Sections(res, wanted=args.sections, budget_s=args.budget_s, save=save, device=device,
                        t_start=t_start)
    section, left = sections.run, sections.left

    if not K.available(device):
        res["errors"]["fused"] = f"the fused scan cannot run on {device} (Triton: {K.triton is not None}, " \
                                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    leaves, starts, dy = packed_layer_inputs(L, E, N, [n_keep] * Bsz, gap, device)

    # 1. accuracy at the model's shapes -------------------------------------------------------------------------
    def check_section():
        t0 = time.perf_counter()
        ref_in = [leaves[k].double().requires_grad_() for k in NAMES]
        # the float64 chunked scan: equal to the float64 sequential loop to ~1e-12 (tests/models/test_mamba_scan.py),
        # and minutes faster at 59,664 tokens (the sequential loop's autograd graph has a node per token and op;
        # the first GPU attempt spent its whole 320 s there without output)
        print(f"[{time.perf_counter() - t_start:6.1f}s] check: float64 reference ...", flush=True)
        y_ref = selective_scan(*ref_in, starts, impl=args.reference)
        g_ref = torch.autograd.grad((y_ref * dy.double()).sum(), ref_in)
        del ref_in
        r = {"reference": f"float64 {args.reference}", "reference_s": time.perf_counter() - t0}
        for impl, config in [("fused", K.default_config()), ("chunked", None)]:
            y, g = fwd_bwd(impl, leaves, starts, dy, config)
            r[impl] = {"y": errors(y, y_ref)} | {f"d{k}": errors(a, b) for k, a, b in zip(NAMES, g, g_ref)}
            r[impl]["grad_dtypes"] = {f"d{k}": str(a.dtype) for k, a in zip(NAMES, g)}
            del y, g
        r["worst_over_tolerance"] = {impl: worst_over_tolerance(r[impl]) for impl in ("fused", "chunked")}
        r["fused_ok"] = r["worst_over_tolerance"]["fused"] < 1.0
        # every candidate launch configuration against the same reference: timed below only if within tolerance
        r["candidates"] = {}
        for i, config in enumerate(candidates):
            try:
                y, g = fwd_bwd("fused", leaves, starts, dy, config)
                c = {"y": errors(y, y_ref)} | {f"d{k}": errors(a, b) for k, a, b in zip(NAMES, g, g_ref)}
                c["grad_dtypes"] = {f"d{k}": str(a.dtype) for k, a in zip(NAMES, g)}
                w = worst_over_tolerance(c)
                r["candidates"][f"cand{i}"] = {"config": config, "worst_over_tolerance": w, "ok": w < 1.0,
                                               "y_rel_l2": c["y"]["rel_l2"]}
                del y, g
            except Exception as e:  # e.g. out of registers or shared memory on this card
                r["candidates"][f"cand{i}"] = {"config": config, "ok": False,
                                               "error": f"{type(e).__name__}: {str(e)[:400]}"}
        del y_ref, g_ref
        return r

    section("check", check_section, need_s=60)

    # 2. one layer's scan: time -----------------------------------------------------------------------------------
    def scan_section():
        r = {}
        runs = [("chunked", None)] + [(f"fused{i}", c) for i, c in enumerate(K.CONFIGS)]
        checked = res["sections"].get("check", {}).get("candidates", {})
        runs += [(f"cand{i}", c) for i, c in enumerate(candidates) if checked.get(f"cand{i}", {}).get("ok")]
        for name, config in runs:
            impl = "fused" if config is not None else name
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fwd_bwd(impl, leaves, starts, dy, config)  # compiles the kernels
                sync(device)
                first = time.perf_counter() - t0
                fb = timed(lambda: fwd_bwd(impl, leaves, starts, dy, config), device, args.reps, warmup=0)
                with torch.no_grad():
                    fw = timed(lambda: fwd_bwd(impl, leaves, starts, dy, config, grads=False), device, args.reps)
                r[name] = {"config": config, "fwd_ms": fw, "fwd_bwd_ms": fb, "first_call_s": first,
                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            except Exception as e:  # e.g. out of shared memory for one configuration on this card
                r[name] = {"config": config, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fused = {k: v for k, v in r.items() if k.startswith("fused") and "fwd_bwd_ms" in v}
        cands = {k: v for k, v in r.items() if k.startswith("cand") and "fwd_bwd_ms" in v}
        if cands and "fwd_bwd_ms" in r["chunked"]:
            r["best_candidate"] = min(cands, key=lambda k: cands[k]["fwd_bwd_ms"])
            r["speedup_fwd_bwd_best_candidate"] = r["chunked"]["fwd_bwd_ms"] / cands[r["best_candidate"]]["fwd_bwd_ms"]
        if fused and "fwd_bwd_ms" in r["chunked"]:
            best = min(fused, key=lambda k: fused[k]["fwd_bwd_ms"])
            r["best_fused"] = best
            r["speedup_fwd_bwd"] = r["chunked"]["fwd_bwd_ms"] / fused[best]["fwd_bwd_ms"]
            d = f"fused{K.DEFAULT_CONFIG}"
            r["speedup_fwd_bwd_default_config"] = r["chunked"]["fwd_bwd_ms"] / fused[d]["fwd_bwd_ms"] \
                if d in fused else None
            r["target_20x_met"] = r["speedup_fwd_bwd"] >= 20
        return r

    section("scan", scan_section, need_s=30)

    x, bm = synthetic_batch(mask, Bsz, T, device)

    def build(impl: str):
        torch.manual_seed(0)
        return R.build_pretrain_model(R.get_config("neuromamba", args.size, img_size=img, scan_impl=impl)).to(device)

    # 3. the model with each scan ---------------------------------------------------------------------------------
    def model_section():
        sc = res["sections"].get("scan", {})
        best, cand = sc.get("best_fused"), sc.get("best_candidate")
        if best:  # the model runs the layer's fastest configuration (default_config reads the variable per call)
            os.environ[K._ENV_CONFIG] = best.removeprefix("fused")
            if cand and sc[cand]["fwd_bwd_ms"] < sc[best]["fwd_bwd_ms"]:  # a candidate, as JSON
                os.environ[K._ENV_CONFIG] = json.dumps(sc[cand]["config"])
        r = {"fused_config": K.default_config()}
        for impl in ("chunked", "fused"):
            model = build(impl)
            t = time_train_steps(model, x, bm, device, args.steps, warmup=1 if args.tiny else 2)
            t["tokens_per_s"] = t["num_tokens"] / t["step_s"]
            t["samples_per_s"] = Bsz / t["step_s"]
            r[impl] = t
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["speedup_tokens_per_s"] = r["fused"]["tokens_per_s"] / r["chunked"]["tokens_per_s"]
        r["target_10x_met"] = r["speedup_tokens_per_s"] >= 10
        r["loss_chunked_vs_fused"] = [r["chunked"]["loss"], r["fused"]["loss"]]
        return r

    section("model", model_section, need_s=40)

    # 4. where a fused-scan step goes -----------------------------------------------------------------------------
    def profile_section():
        from torch.profiler import ProfilerActivity, profile

        model = build("fused")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dt = torch.bfloat16

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=dt, enabled=device.type == "cuda"):
                loss = model(x, brain_mask=bm)["loss"]
            loss.backward()
            opt.step()

        step()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        evs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
        total = sum(getattr(e, key, 0.0) for e in evs)
        top = [{"name": e.key[:120], "ms": getattr(e, key, 0.0) / 1e3, "share": getattr(e, key, 0.0) / max(total, 1e-9),
                "calls": e.count} for e in evs[:20]]
        return {"metric": key, "total_ms": total / 1e3, "top": top}

    section("profile", profile_section, need_s=30)

    # 5. compiled blocks with the fused scan ----------------------------------------------------------------------
    def compiled_section():
        model = build("fused")
        for blk in model.encoder.blocks:
            blk.compile(fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        t = time_train_steps(model, x, bm, device, args.steps, warmup=1 if args.tiny else 2)
        t["first_steps_s"] = time.perf_counter() - t0 - t["step_s"] * args.steps
        t["tokens_per_s"] = t["num_tokens"] / t["step_s"]
        t["samples_per_s"] = Bsz / t["step_s"]
        ch = res["sections"].get("model", {}).get("chunked")
        if ch:
            t["speedup_tokens_per_s_vs_chunked"] = t["tokens_per_s"] / ch["tokens_per_s"]
        return t

    section("compiled", compiled_section, need_s=120 if device.type == "cuda" else 10)
    res["total_s"] = time.perf_counter() - t_start
    save()
    print(to_markdown(res))
    return 0


def _f(v, fmt="{:.3g}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def to_markdown(res: dict) -> str:
    s = res["sections"]
    ly = res["layer"]
    lines = [f"# Fused selective scan ({res['device']}, torch {res['torch']}, triton {res['triton']}"
             f"{', interpreter' if res['interpreter'] else ''})", "",
             f"Layer: L={ly['L']} packed tokens ({ly['samples']} samples x {ly['tokens_per_sample']} + {ly['gap']} gap), "
             f"E={ly['E']}, N={ly['N']}; model {res['size']}, T={res['frames']}, batch {res['batch']}.", ""]
    if "check" in s:
        c = s["check"]
        lines += [f"## Accuracy against the {c['reference']} reference ({c['reference_s']:.1f} s)", "",
                  "| tensor | fused max err / max ref | fused rel L2 | chunked max err / max ref | chunked rel L2 |",
                  "|---|---|---|---|---|"]
        for k in ["y"] + [f"d{n}" for n in NAMES]:
            f, ch = c["fused"][k], c["chunked"][k]
            lines.append(f"| {k} | {f['max_err_over_max_ref']:.2e} | {f['rel_l2']:.2e} | "
                         f"{ch['max_err_over_max_ref']:.2e} | {ch['rel_l2']:.2e} |")
        lines += ["", f"Fused within tolerance: **{c['fused_ok']}** (worst error / tolerance {c['worst_over_tolerance']})",
                  ""]
    if "scan" in s:
        sc = s["scan"]
        lines += ["## One layer's scan", "", "| impl | config | fwd ms | fwd+bwd ms | first call s | peak GiB |",
                  "|---|---|---|---|---|---|"]
        for k, v in sc.items():
            if not isinstance(v, dict) or "config" not in v:
                continue
            if "error" in v:
                lines.append(f"| {k} | {v['config']} | {v['error'][:100]} | | | |")
            else:
                lines.append(f"| {k} | {v['config'] or ''} | {v['fwd_ms']:.3f} | {v['fwd_bwd_ms']:.3f} | "
                             f"{v['first_call_s']:.1f} | {_f(v['peak_mem_gib'])} |")
        if "speedup_fwd_bwd" in sc:
            lines += ["", f"Speed-up fwd+bwd (best fused, {sc['best_fused']}): **{sc['speedup_fwd_bwd']:.1f}x** "
                          f"(target 20x met: {sc['target_20x_met']})", ""]
        if "best_candidate" in sc:
            lines += [f"Best candidate launch configuration ({sc['best_candidate']}, not in CONFIGS): "
                      f"{sc['speedup_fwd_bwd_best_candidate']:.1f}x", ""]
        bad = {k: v for k, v in s.get("check", {}).get("candidates", {}).items() if not v["ok"]}
        if bad:
            lines += ["Candidates not timed (failed the check): " + "; ".join(
                f"{k} {v['config']}: {v.get('error') or 'worst error / tolerance %.3g' % v['worst_over_tolerance']}"
                for k, v in bad.items()), ""]
    if "model" in s:
        m = s["model"]
        lines += [f"## {res['size']} train step (bf16 autocast, background removal, packed)", "",
                  f"Fused scan configuration: {m['fused_config']}", "",
                  "| scan | step s | tokens/s | samples/s | peak GiB | loss |", "|---|---|---|---|---|---|"]
        for k in ("chunked", "fused"):
            v = m[k]
            lines.append(f"| {k} | {v['step_s']:.4f} | {v['tokens_per_s']:.4g} | {v['samples_per_s']:.3g} | "
                         f"{_f(v['peak_mem_gib'])} | {v['loss']:.5g} |")
        lines += ["", f"Speed-up in tokens/s: **{m['speedup_tokens_per_s']:.1f}x** (target 10x met: "
                      f"{m['target_10x_met']})", ""]
    if "compiled" in s:
        v = s["compiled"]
        lines += ["## Fused scan + compiled blocks", "",
                  f"step {v['step_s']:.4f} s, {v['tokens_per_s']:.4g} tokens/s, peak {_f(v['peak_mem_gib'])} GiB, "
                  f"compile+warm-up {v['first_steps_s']:.1f} s, vs chunked "
                  f"{_f(v.get('speedup_tokens_per_s_vs_chunked'), '{:.1f}')}x", ""]
    if "profile" in s:
        p = s["profile"]
        lines += [f"## Profile of a fused-scan step ({p['metric']}, total {p['total_ms']:.1f} ms)", "",
                  "| op / kernel | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| {e['name'][:80]} | {e['ms']:.3f} | {100 * e['share']:.1f}% | {e['calls']} |" for e in p["top"][:15]]
        lines.append("")
    if res["errors"]:
        lines += ["## Errors / skipped", ""] + [f"- {k}: {v.splitlines()[0][:300]}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
