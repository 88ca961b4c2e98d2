"""Run a scaling-law study end to end: plan -> Ray Tune trials of Ray Train runs -> results store -> fit.

On a laptop or CI (embedded local Ray, synthetic cohort, tiny sizes; minutes on 2 cores)::

    python study/scaling_law.py

On a cluster (inside a PBS job that bootstrapped Ray, see pbs/)::

    ray job submit --working-dir . -- python study/scaling_law.py --preset polaris \\
        --manifest /lus/.../manifest.parquet --storage /lus/.../studies --study-name swift-v2-ladder

Rerunning the same command with the same ``--study-name`` and ``--storage`` resumes: finished runs
are skipped, interrupted runs continue from their last checkpoint, and no result row is duplicated.
If the code or the data changed since the study started, it refuses (or, with
``--on-change new-version``, starts ``<name>-v2``) rather than silently mixing results.

Everything that must outlive a job (cohort cache, results store, checkpoints, offline W&B runs,
report) lives under ``--storage``: ``ray job submit --working-dir`` runs in a throwaway copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python study/scaling_law.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.runner import add_common_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="demo | smoke | smoke-gpu | polaris | aurora | pkg.module:function")
    add_common_args(ap)
    ap.add_argument("--lr-search", type=int, default=0, metavar="N",
                    help="Optuna search of the LR per run group with N trials each (0: use the plan's LRs)")
    ap.add_argument("--parametrization", choices=["mup", "sp"], default=None,
                    help="ladder presets (polaris, aurora): muP (default) or SP; SP trains every size at one LR")
    ap.add_argument("--lr-from", default=None, metavar="STUDY_OR_FILE",
                    help="ladder presets: take the muP base width and base LR from a µTransfer study "
                         "(its folder, its name under --storage, or its report/lr_transfer.json)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="device memory for the --dry-run fit check")
    ap.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="per-device peak for GPU-hour estimates")
    ap.add_argument("--assumed-mfu", type=float, default=0.35, help="MFU assumed by the GPU-hour estimate")
    return ap.parse_args(argv)


def print_plan(plan, args) -> None:
    from study.plans import memory_estimate_gib, run_summary

    world = plan.num_workers
    print(f"study plan {plan.name!r}: {len(plan.specs)} runs, {world} worker(s)/trial, "
          f"{'GPU' if plan.use_gpu else 'CPU'}")
    hdr = (f"{'run_id':58s} {'params':>10s} {'steps':>7s} {'samples':>9s} {'FLOPs':>10s} {'GPU-h':>8s} "
           f"{'ZeRO':>4s} {'mem GiB':>8s} fits {'param':>5s} {'base w':>6s} {'lr':>9s}")
    print(hdr)
    total_gpu_h = 0.0
    for s in plan.specs:
        r = run_summary(s)
        gpu_h = r["flops"] / (args.gpu_peak_tflops * 1e12 * args.assumed_mfu) / 3600
        total_gpu_h += gpu_h
        mem = memory_estimate_gib(s, world)
        fits = "yes" if mem < args.gpu_mem_gib else "NO"
        zero = s.zero_stage if s.distributed == "deepspeed" else "-"
        base_w = s.mup_base_width if s.parametrization == "mup" and s.mup_base_width else "-"
        print(f"{r['run_id']:58s} {r['params']:10.3g} {r['steps']:7d} {r['samples']:9d} {r['flops']:10.3g} "
              f"{gpu_h:8.3g} {zero!s:>4s} {mem:8.2f} {fits:>4s} {s.parametrization:>5s} {base_w!s:>6s} {s.lr:9.3g}")
    print(f"LR: {lr_source(plan)}")
    print(f"total: {total_gpu_h:.3g} GPU-hours at {args.assumed_mfu:.0%} MFU of {args.gpu_peak_tflops:g} TFLOP/s "
          f"(mem: model-state memory per device under each run's ZeRO stage; '-' = DDP)")


def lr_source(plan) -> str:
    """Where the plan's LRs come from: a ladder's rule, or the preset's own values (not transferred)."""
    if plan.extra.get("lr_source"):
        return plan.extra["lr_source"]
    lrs = sorted({s.lr for s in plan.specs})
    pars = sorted({s.parametrization for s in plan.specs})
    return (f"{', '.join(f'{x:g}' for x in lrs)} ({'/'.join(pars)}) as set by preset {plan.name!r}; "
            "not transferred from a µTransfer study")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo_root = Path(__file__).resolve().parent.parent
    from study.plans import LRSearch, load_plan
    from study.runner import fail, run_plan

    try:
        plan = load_plan(args.preset, args)
    except ValueError as exc:
        return fail(str(exc))
    if args.dry_run:
        print_plan(plan, args)
        return 0
    print(f"LR: {lr_source(plan)}", flush=True)
    try:
        run = run_plan(plan, args, repo_root=repo_root,
                       lr_search=LRSearch(n_trials=args.lr_search) if args.lr_search else None)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    if not args.no_report:
        from analysis.report import summarize_study

        out_dir = run.study_dir / "report"
        summary = summarize_study(run.store_dir, out_dir)
        print(f"report: {out_dir}")
        md = out_dir / "summary.md"
        print(md.read_text() if md.exists() else json.dumps(summary, indent=1, default=str))
    return 1 if run.remaining and not run.stop_file.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
