"""Training throughput and strong/weak scaling of SwiFT v2 through the real train function.

Each configuration runs :func:`study.train.train` under ``torchrun`` (one rank per GPU, DeepSpeed with
the given ZeRO stage, bf16 autocast) for ``--warmup + --steps`` optimizer steps and records the median
samples/s of the timed steps and the peak memory per GPU. Modes:

* ``strong``: fixed global batch (``--global-batch``), micro-batch per GPU with gradient accumulation;
* ``weak``: fixed per-GPU batch (``--micro-batch``), global batch = micro x GPUs.

Data: ``--data preloaded`` keeps a pool of finished inputs on the GPU (the model's own scaling);
``--data hdf5`` reads real subject files through the loader (``--loader-workers`` per rank) from a
synthetic 96^3 cohort under ``--cohort`` (generated once), to measure how input-bound training is.

One configuration per call (the driver loops over GPU counts)::

    torchrun --standalone --nproc-per-node 4 benchmarks/train_scaling.py --size 51M --mode strong \\
        --global-batch 64 --micro-batch 16 --out results/strong-51M-4.json

``--driver`` runs the whole matrix (sizes x GPU counts x modes) as subprocesses and writes JSON plus a
Markdown table with efficiencies from ``analysis.efficiency``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class PreloadedWindows:
    """``n`` finished inputs kept on the device; item ``i`` is window ``i % n`` (the WindowedDataset contract)."""

    def __init__(self, n: int, grid, T: int, device, seed: int = 0) -> None:
        import numpy as np
        import torch

        mask_file = REPO / "benchmarks" / "mni152_brain_mask_96.npz"
        mask = torch.from_numpy(np.load(mask_file)["mask"].astype(bool)) if mask_file.exists() else None
        if mask is None or tuple(mask.shape) != tuple(grid):
            mask = torch.ones(tuple(grid), dtype=torch.bool)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.mask = mask.to(device)
        self.x = [(torch.randn((1, *grid, T), generator=g) * mask[None, ..., None]).to(device) for _ in range(n)]
        self.n = n
        # checked once here, so the loader's per-window finite check (host-device syncs) is skipped per access
        from data.transforms import all_finite

        assert all(all_finite(x) for x in self.x)

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i % self.n], "brain_mask": self.mask, "cohort": "synthetic", "subject": f"s{i % self.n}",
                "finite": True}


def ensure_cohort(root: Path, n_subjects: int, frames: int) -> str:
    from data.synthetic import generate_cohort

    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest)
    return str(generate_cohort(root, n_subjects=n_subjects, grid=(96, 96, 96), n_frames=frames, seed=0,
                               workers=min(16, os.cpu_count() or 1), progress=False))


def run_one(args) -> dict:
    import torch

    from study.devices import context_from_env
    from study.reporters import MemoryReporter
    from study.spec import RunSpec
    from study.train import train

    ctx = context_from_env("cuda" if torch.cuda.is_available() else "cpu")
    world = ctx.world_size
    global_batch = args.global_batch if args.mode == "strong" else args.micro_batch * world
    micro = min(args.micro_batch, global_batch // world)
    overrides = {"attn_impl": args.attn_impl} if args.attn_impl else {}
    overrides.update(json.loads(args.overrides))
    if args.patch_t:
        overrides["patch_size"] = (6, 6, 6, args.patch_t)
        overrides["mask_patch_size"] = (12, 12, 12, args.patch_t)
    spec = RunSpec(study="bench", family=args.family, size=args.size, grid=(args.grid,) * 3, sequence_length=args.T,
                   batch_size=global_batch, micro_batch_size=micro, budget=args.warmup + args.steps,
                   eval_every=10**9, eval_windows=max(world, args.eval_windows), distributed=args.dist,
                   zero_stage=args.zero, seed=args.seed,
                   precision="bf16", num_workers=args.loader_workers if args.data == "hdf5" else 0,
                   manifest=args.manifest or "", model_overrides=overrides, log_every=args.log_every,
                   warmup_frac=args.warmup_frac, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                   **({"lr": args.lr} if args.lr else {}),
                   deepspeed_config=args.ds_config)
    if args.gc_every is not None:
        spec = spec.replace(gc_every=args.gc_every)
    datasets = None
    if args.data == "preloaded":
        pool = PreloadedWindows(8, (args.grid,) * 3, args.T, ctx.device, seed=ctx.rank)
        datasets = (pool, pool)
    torch.cuda.reset_peak_memory_stats() if ctx.device.type == "cuda" else None
    rep = MemoryReporter()
    prof = None
    if args.profile_dir and (ctx.rank == 0 or args.profile_all_ranks):
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])

        def write_tables(p) -> None:
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            keys = ("cuda_time_total", "cpu_time_total") if ctx.device.type == "cuda" else ("cpu_time_total",)
            for key in keys:
                table = p.key_averages().table(sort_by=key, row_limit=35, max_name_column_width=80)
                name = f"profile_{args.size}_{args.dist}_z{args.zero}_{key.split('_')[0]}.txt"
                if args.profile_all_ranks:
                    name = name.replace(".txt", f"_{args.mode}_g{world}_r{ctx.rank}.txt")
                Path(args.profile_dir, name).write_text(table)

        # one profiler step per log (every --log-every optimizer steps): skip the warm-up, then warm the
        # profiler for one log window and record 3 steps (log_every 1) or one window of log_every steps
        wait = -(-args.warmup // args.log_every)
        prof = profile(activities=acts, schedule=schedule(wait=wait, warmup=1, active=3 if args.log_every == 1 else 1,
                                                          repeat=1),
                       on_trace_ready=write_tables)
        prof.start()
        log = rep.log

        def log_and_step(row, _log=log):  # one profiler step per log
            _log(row)
            prof.step()

        rep.log = log_and_step
    t0 = time.perf_counter()
    train(spec, ctx, rep, datasets=datasets)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.stop()
    # throughput windows (log_every steps each) that start after the warm-up steps
    sps = [r["samples_per_s"] for r in rep.logs if r["step"] - args.log_every >= args.warmup]
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    peaks = torch.tensor([peak or 0.0], device=ctx.device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    from neuro_models import registry as R
    from study.run_math import model_config

    cfg = model_config(spec)
    fps = R.flops_per_sample(cfg)["train"]
    out = {"family": args.family, "size": args.size, "mode": args.mode, "gpus": world, "global_batch": global_batch,
           "micro_batch": micro, "accumulation": global_batch // (micro * world), "zero_stage": args.zero, "ds_config": args.ds_config,
           "dist": args.dist, "compile": args.compile, "attn_impl": getattr(cfg, "attn_impl", None), "overrides": args.overrides, "gc_every": spec.gc_every, "data": args.data, "loader_workers": spec.num_workers, "T": args.T,
           "patch_size": list(cfg.patch_size), "samples_per_s": statistics.median(sps) if sps else None,
           "samples_per_s_all": sps, "peak_mem_gib": float(peaks.item()), "wall_s": wall,
           "params": R.param_counts(cfg)["total"], "train_flops_per_sample": fps,
           "cuda_graphs": spec.cuda_graphs, "lr": spec.lr, "seed": spec.seed,
           "train_loss_all": [[r["step"], r["train_loss"]] for r in rep.logs if "train_loss" in r],
           "val_loss": next((r["val_loss"] for r in reversed(rep.reports) if "val_loss" in r), None)
           if hasattr(rep, "reports") else None,
           "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"}
    if out["samples_per_s"]:
        out["tflops_per_gpu"] = out["samples_per_s"] * fps / world / 1e12
    if ctx.rank == 0 and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps({**out, "samples_per_s_all": [round(v, 1) for v in sps]}), flush=True)
    return out


def driver(args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    n_gpu = torch.cuda.device_count()
    counts = [g for g in (args.gpu_counts or (1, 2, 4, 8)) if g <= n_gpu] or [1]
    results = []
    plans = []
    for size in args.sizes:
        micro = {"51M": args.micro_51m, "806M": args.micro_806m}.get(size, args.micro_batch)
        for mode in args.modes:
            for g in counts:
                plans.append((size, mode, g, micro, "preloaded"))
    if args.input_check:
        plans.append(("51M", "weak", 1, args.micro_51m, "hdf5"))
        plans.append(("51M", "weak", 1, args.micro_51m, "preloaded"))
    for size, mode, g, micro, data in plans:
        tag = f"{mode}-{size}-{g}gpu-{data}"
        f = out_dir / f"{tag}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(g),
               str(Path(__file__).resolve()), "--size", size, "--mode", mode, "--global-batch", str(args.global_batch),
               "--micro-batch", str(micro), "--zero", str(args.zero), "--dist", args.dist, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--T", str(args.T), "--data", data, "--out", str(f),
               "--loader-workers", str(args.loader_workers), "--patch-t", str(args.patch_t), "--grid", str(args.grid),
               "--log-every", str(args.log_every)] + ([] if args.gc_every is None else ["--gc-every", str(args.gc_every)]) + (["--compile"] if args.compile else []) \
            + (["--ds-config", args.ds_config] if args.ds_config else []) + (["--attn-impl", args.attn_impl] if args.attn_impl else []) \
            + (["--overrides", args.overrides] if args.overrides != "{}" else [])
        if data == "hdf5":
            cmd += ["--manifest", args.manifest]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode != 0 or not f.exists():
            print(f"{tag}: FAILED rc={p.returncode}\n{p.stderr[-2500:]}", flush=True)
            results.append({"size": size, "mode": mode, "gpus": g, "data": data, "error": p.stderr[-800:]})
            continue
        r = json.loads(f.read_text())
        results.append(r)
        print(f"{tag}: {r['samples_per_s']:.1f} samples/s, peak {r['peak_mem_gib']:.1f} GiB "
              f"({time.time() - t0:.0f}s)", flush=True)
    (out_dir / "train_scaling.json").write_text(json.dumps(results, indent=1))
    (out_dir / "train_scaling.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: list[dict]) -> str:
    """Per-configuration table; efficiency from ``analysis.efficiency.scaling_table`` (baseline: 1 GPU)."""
    from analysis.efficiency import scaling_table

    eff: dict[tuple, float] = {}
    ok = [r for r in results if not r.get("error") and r.get("data") == "preloaded"]
    for key in {(r["size"], r["mode"]) for r in ok}:
        rows = sorted((r for r in ok if (r["size"], r["mode"]) == key), key=lambda r: r["gpus"])
        if rows and rows[0]["gpus"] == 1:
            t = scaling_table([r["gpus"] for r in rows], [r["samples_per_s"] for r in rows], mode=key[1])
            col = [c for c in t.columns if c.startswith("efficiency")][0]
            for r, e in zip(rows, t[col]):
                eff[(key[0], key[1], r["gpus"])] = e
    lines = ["| size | mode | GPUs | global batch | micro x accum | samples/s | TFLOP/s/GPU | peak GiB | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['size']} | {r['mode']} | {r['gpus']} | - | - | FAILED | - | - | - |")
            continue
        e = eff.get((r["size"], r["mode"], r["gpus"])) if r["data"] == "preloaded" else None
        lines.append(f"| {r['size']} | {r['mode']}{'' if r['data'] == 'preloaded' else ' (hdf5 loader)'} | {r['gpus']} | "
                     f"{r['global_batch']} | {r['micro_batch']} x {r['accumulation']} | {r['samples_per_s']:.1f} | "
                     f"{r.get('tflops_per_gpu', 0):.0f} | {r['peak_mem_gib']:.1f} | "
                     f"{'' if e is None or e != e else f'{e:.1%}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--driver", action="store_true")
    ap.add_argument("--family", default="swift_v2")
    ap.add_argument("--size", default="51M")
    ap.add_argument("--sizes", nargs="+", default=["51M", "806M"])
    ap.add_argument("--mode", choices=["strong", "weak"], default="strong")
    ap.add_argument("--modes", nargs="+", default=["strong", "weak"])
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--micro-51m", type=int, default=16)
    ap.add_argument("--micro-806m", type=int, default=4)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--dist", default="deepspeed", choices=["deepspeed", "ddp"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=1,
                    help="log (and read the loss on the host) every N steps; throughput is per N-step window")
    ap.add_argument("--profile-dir", default=None,
                    help="rank 0: kernel/CPU tables of 3 steps (or one --log-every window) after warm-up")
    ap.add_argument("--profile-all-ranks", action="store_true",
                    help="profile every rank (file names carry mode, GPU count and rank): a rank that waits for "
                         "a slower one shows it as collective-kernel time")
    ap.add_argument("--gpu-counts", type=int, nargs="+", default=None, help="GPU counts to run (default 1 2 4 8)")
    ap.add_argument("--ds-config", default="", help="JSON merged over the DeepSpeed config (RunSpec.deepspeed_config)")
    ap.add_argument("--gc-every", type=int, default=None,
                    help="RunSpec.gc_every: collect garbage by hand every N steps on all ranks (0: Python's automatic "
                         "collector; default: RunSpec's)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile (RunSpec.compile)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="RunSpec.cuda_graphs=False (compiled runs)")
    ap.add_argument("--lr", type=float, default=0.0, help="peak LR (0: RunSpec's default)")
    ap.add_argument("--warmup-frac", type=float, default=0.0, help="RunSpec.warmup_frac")
    ap.add_argument("--eval-windows", type=int, default=2, help="validation windows at the end (RunSpec.eval_windows)")
    ap.add_argument("--seed", type=int, default=0, help="RunSpec.seed (data order, masks, init)")
    ap.add_argument("--attn-impl", default=None, choices=["sdpa", "flex", "triton", "auto"],
                    help="SwiftConfig.attn_impl (model override; default: the config's)")
    ap.add_argument("--overrides", default="{}", help='JSON of model config overrides (RunSpec.model_overrides), '
                    'e.g. \'{"bf16_residual": true, "fused_mlp": true}\'')
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--grid", type=int, default=96)
    ap.add_argument("--patch-t", type=int, default=0, help="temporal patch (0: the size's default)")
    ap.add_argument("--data", choices=["preloaded", "hdf5"], default="preloaded")
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--input-check", action="store_true", help="also run 51M on 1 GPU with the hdf5 loader")
    ap.add_argument("--out", default=None)
    ap.add_argument("--out-dir", default="benchmarks/results/train_scaling")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    if args.driver:
        driver(args)
    else:
        run_one(args)


if __name__ == "__main__":
    main()
