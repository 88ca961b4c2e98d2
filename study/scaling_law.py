"""Run a scaling-law study end to end: plan -> Ray Tune trials of Ray Train runs -> results store -> fit.

On a laptop or CI (embedded local Ray, synthetic cohort, tiny sizes; minutes on 2 cores)::

    python study/scaling_law.py

On a cluster (inside a PBS job that bootstrapped Ray, see pbs/)::

    ray job submit --working-dir . -- python study/scaling_law.py --preset ladder --site polaris \\
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
    from study.cli_args import HelpFormatter
    from study.runner import add_common_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="demo",
                    help="named plan: demo | smoke | smoke-gpu | ladder | ladder-xl | mamba-ladder | mamba-demo, or "
                         "pkg.module:function returning a StudyPlan; ladder presets are planned for --site's hardware")
    add_common_args(ap)
    ap.add_argument("--lr-search", type=int, default=0, metavar="N",
                    help="Optuna search of the LR per run group with N trials each (0: use the plan's LRs)")
    ap.add_argument("--parametrization", choices=["mup", "sp"], default=None,
                    help="ladder presets (ladder, ladder-xl, mamba-ladder): muP (default) or SP; SP trains every size "
                         "at one LR")
    ap.add_argument("--lr-from", default=None, metavar="STUDY_OR_FILE",
                    help="ladder presets: take the muP base width and base LR from a µTransfer study "
                         "(its folder, its name under --storage, or its report/lr_transfer.json)")
    ap.add_argument("--site", default=None, metavar="NAME",
                    help="ladder presets: plan each run for one node of this site, a profile pbs/profiles/NAME.sh "
                         "(device kind, devices per node, CPU cores per device); default: $NEUROX_SITE, which "
                         "pbs/ray_cluster.sh sets to its --profile")
    ap.add_argument("--device-kind", default=None,
                    help="GPU presets: plan the runs for this device kind (study/device_kinds.json: h100-80gb, "
                         "h200-141gb, a100-40gb, a100-80gb, max1550-tile, mi250x-gcd); default: the site's")
    ap.add_argument("--cpus-per-device", type=int, default=None,
                    help="GPU presets: CPU cores the allocation gives each device (sets loader workers); "
                         "default: the site's")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (a table, or JSON with --json) and exit")
    ap.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per run, then a summary")
    from study.adaptive import add_adaptive_args, add_prediction_args

    add_adaptive_args(ap)  # --adaptive --target --budget-gpu-hours (issue #26)
    add_prediction_args(ap)  # --preregister-above (issue #26 item 2)
    return ap.parse_args(argv)


def plan_rows(plan, device_kind: str | None = None) -> list[dict]:
    """One row per run with the planner's fields (``study.planner.RunPlan``) plus params, steps and FLOPs. GPU plans
    carry their run plans; a plan without them is assessed as configured for ``device_kind`` (if given)."""
    from dataclasses import asdict

    from study.planner import assess_run
    from study.plans import run_summary

    rows = []
    for s in plan.specs:
        r = run_summary(s)
        rp = plan.run_plans.get(s.run_id)
        micro = s.micro_batch_size or s.batch_size // plan.num_workers
        if rp is None and device_kind and plan.use_gpu:
            rp = assess_run(s, device_kind, workers=plan.num_workers)
        base = dict(run_id=s.run_id, family=s.family, size=s.size, parametrization=s.parametrization, lr=s.lr,
                    device_kind=None, global_batch=s.batch_size, micro_batch=micro,
                    accumulation=s.batch_size // plan.num_workers // micro, workers=plan.num_workers,
                    activation_checkpointing=s.activation_checkpointing,
                    zero_stage=s.zero_stage if s.distributed == "deepspeed" else None, compile=s.compile,
                    loader_workers=s.num_workers, predicted_peak_gib=None, device_memory_gib=None,
                    predicted_samples_per_s=None, throughput_source="CPU plan: not predicted", gpu_hours=None,
                    fits=None, reason="")
        rows.append({**base, **(asdict(rp) if rp else {}), "mup_base_width": s.mup_base_width if s.parametrization ==
                     "mup" else None, "params": r["params"], "steps": r["steps"], "flops": r["flops"],
                     "remove_background": r["remove_background"]})
    return rows


def print_plan(plan, args) -> None:
    rows = plan_rows(plan, args.device_kind)
    gpu_h = [r["gpu_hours"] for r in rows if r["gpu_hours"] is not None]
    summary = {"summary": True, "study": plan.name, "runs": len(rows), "device_kind": rows[0]["device_kind"] if rows
               else None, "workers_per_run": plan.num_workers, "gpu_hours": sum(gpu_h) if gpu_h else None,
               "all_fit": all(r["fits"] is not False for r in rows), "lr_source": lr_source(plan),
               "throughput_sources": sorted({r["throughput_source"] for r in rows})}
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        print(json.dumps(summary, default=str))
        return
    print(f"study plan {plan.name!r}: {len(rows)} runs, {plan.num_workers} worker(s)/run, "
          f"{summary['device_kind'] or ('GPU' if plan.use_gpu else 'CPU')}")
    if plan.extra.get("hardware"):  # a ladder's: the site (or --device-kind) it was planned for
        print(f"planned for {plan.extra['hardware']}")
    print(f"{'run_id':46s} {'params':>8s} {'steps':>7s} {'FLOPs':>8s} {'param':>5s} {'base w':>6s} {'lr':>8s} "
          f"{'mb x acc':>8s} {'ckpt':>4s} {'ZeRO':>4s} {'comp':>4s} {'load':>4s} {'GiB/dev':>11s} {'fits':>4s} "
          f"{'samples/s':>9s} {'GPU-h':>8s}")
    for r in rows:
        mem = (f"{r['predicted_peak_gib']:.1f}/{r['device_memory_gib']:.0f}" if r["predicted_peak_gib"] is not None
               else "-")
        fits = {True: "yes", False: "NO", None: "-"}[r["fits"]]
        print(f"{r['run_id']:46s} {r['params']:8.3g} {r['steps']:7d} {r['flops']:8.2g} {r['parametrization']:>5s} "
              f"{r['mup_base_width'] or '-'!s:>6s} {r['lr']:8.3g} {str(r['micro_batch']) + ' x ' + str(r['accumulation']):>8s} "
              f"{'yes' if r['activation_checkpointing'] else 'no':>4s} "
              f"{'-' if r['zero_stage'] is None else r['zero_stage']!s:>4s} {'yes' if r['compile'] else 'no':>4s} "
              f"{r['loader_workers']:4d} {mem:>11s} {fits:>4s} "
              f"{'-' if r['predicted_samples_per_s'] is None else format(r['predicted_samples_per_s'], '9.1f'):>9s} "
              f"{'-' if r['gpu_hours'] is None else format(r['gpu_hours'], '8.3g'):>8s}")
        if r["reason"]:
            print(f"    {r['reason']}")
    print(f"LR: {summary['lr_source']}")
    bg = {r["remove_background"] for r in rows} - {None}
    if bg:  # families that can drop background tokens (NeuroMamba): say whether these runs do
        print("background removal: " + " / ".join(
            f"{'on' if b else 'off'} (remove_background={b}) in {sum(r['remove_background'] is b for r in rows)} runs"
            for b in sorted(bg, reverse=True)))
    for src in summary["throughput_sources"]:
        print(f"samples/s: {src}")
    if summary["gpu_hours"] is not None:
        print(f"total: {summary['gpu_hours']:.3g} GPU-hours on {summary['device_kind']} "
              f"(GiB/dev: predicted peak per device / the device's memory; study/planner.py)")


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
        if args.dry_run and args.manifest and not Path(args.manifest).is_file():
            raise ValueError(f"--manifest {args.manifest} does not exist")
    except ValueError as exc:
        return fail(str(exc))
    if args.json and not args.dry_run:
        return fail("--json goes with --dry-run")
    if args.dry_run:
        print_plan(plan, args)
        return 0
    print(f"LR: {lr_source(plan)}", flush=True)
    if args.adaptive:
        from study.adaptive import main_adaptive

        return main_adaptive(plan, args, repo_root)
    try:
        from study.runner import check_plan

        check_plan(plan, args)  # every subject file the runs read, before any trial starts
        lr_search = LRSearch(n_trials=args.lr_search) if args.lr_search else None
        if args.preregister_above is not None:  # small runs, fit, predictions of the large ones, then the rest
            from study.adaptive import run_plan_preregistered

            run = run_plan_preregistered(plan, args, repo_root=repo_root, lr_search=lr_search)
        else:
            run = run_plan(plan, args, repo_root=repo_root, lr_search=lr_search)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    if not args.no_report:
        from analysis.report import summarize_study

        out_dir = run.study_dir / "report"
        summary = summarize_study(run.store_dir, out_dir)
        md = out_dir / "summary.md"
        if run.failed:  # the report says what failed: it is not a finished study's report
            from study.runner import failure_summary

            note = ["# INCOMPLETE STUDY", "", *[f"    {x}" for x in failure_summary(run)], "",
                    f"The fits below use the {len(run.specs) - len(run.remaining)} finished run(s) only.", "", ""]
            md.write_text("\n".join(note) + (md.read_text() if md.exists() else ""))
            sj = out_dir / "summary.json"
            if sj.exists():
                data = json.loads(sj.read_text())
                data.update(incomplete=True, failed_runs=run.errors)
                sj.write_text(json.dumps(data, indent=1, default=str))
        if args.preregister_above is not None:  # prediction against outcome, next to the fits
            from analysis.predictions import report as prediction_report

            prediction_report([run.store_dir], out_dir)
            print(f"predictions: {out_dir / 'predictions.md'}")
        print(f"report: {out_dir}")
        print(md.read_text() if md.exists() else json.dumps(summary, indent=1, default=str))
    return 1 if run.remaining and not run.stop_file.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
