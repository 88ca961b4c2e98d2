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
import os
import time
from typing import Any

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="demo | polaris | aurora | pkg.module:function")
    ap.add_argument("--study-name", default=None, help="name of the study (default: the preset's name)")
    ap.add_argument("--storage", default="studies", help="shared-filesystem directory for everything durable")
    ap.add_argument("--manifest", default=None, help="cohort manifest (Parquet); demo generates a synthetic one")
    ap.add_argument("--address", default=None,
                    help="Ray address ('auto' inside a cluster or `ray job submit`); default: embedded local Ray")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    ap.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once")
    ap.add_argument("--lr-search", type=int, default=0, metavar="N",
                    help="Optuna search of the LR per run group with N trials each (0: use the plan's LRs)")
    ap.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on val_loss)")
    ap.add_argument("--wandb", action="store_true", help="log runs to W&B (offline unless a key is set)")
    ap.add_argument("--on-change", choices=["refuse", "new-version"], default="refuse",
                    help="what to do when code or data changed since the study started")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="device memory for the --dry-run fit check")
    ap.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="per-device peak for GPU-hour estimates")
    ap.add_argument("--assumed-mfu", type=float, default=0.35, help="MFU assumed by the GPU-hour estimate")
    ap.add_argument("--walltime-s", type=float, default=None,
                    help="stop trials gracefully (final checkpoint) this many seconds from now")
    ap.add_argument("--no-report", action="store_true", help="skip the final fit and plots")
    return ap.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def check_storage(storage: Path) -> None:
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"storage path {storage} is not writable: {exc}") from exc


def print_plan(plan, args) -> None:
    from study.plans import memory_estimate_gib, run_summary

    world = plan.num_workers
    print(f"study plan {plan.name!r}: {len(plan.specs)} runs, {world} worker(s)/trial, "
          f"{'GPU' if plan.use_gpu else 'CPU'}")
    hdr = f"{'run_id':58s} {'params':>10s} {'steps':>7s} {'samples':>9s} {'FLOPs':>10s} {'GPU-h':>8s} {'mem GiB':>8s} fits"
    print(hdr)
    total_gpu_h = 0.0
    for s in plan.specs:
        r = run_summary(s)
        gpu_h = r["flops"] / (args.gpu_peak_tflops * 1e12 * args.assumed_mfu) / 3600
        total_gpu_h += gpu_h
        mem = memory_estimate_gib(s, world)
        fits = "yes" if mem < args.gpu_mem_gib else "NO"
        print(f"{r['run_id']:58s} {r['params']:10.3g} {r['steps']:7d} {r['samples']:9d} {r['flops']:10.3g} "
              f"{gpu_h:8.3g} {mem:8.2f} {fits}")
    print(f"total: {total_gpu_h:.3g} GPU-hours at {args.assumed_mfu:.0%} MFU of {args.gpu_peak_tflops:g} TFLOP/s "
          f"(model-state memory under ZeRO stage {plan.specs[0].zero_stage if plan.specs[0].distributed == 'deepspeed' else 0})")


def ensure_cohort(plan, storage: Path) -> str:
    """Generate (once) the plan's synthetic cohort under storage and return its manifest path."""
    from data.synthetic import generate_cohort

    key = "-".join(f"{k}{v}" for k, v in sorted(plan.cohort.items())).replace(" ", "").replace(",", "x")
    root = storage / "cohorts" / key.replace("(", "").replace(")", "")
    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest)
    print(f"generating synthetic cohort under {root} ...", flush=True)
    return str(generate_cohort(root, progress=True, **plan.cohort))


def study_guard(study_dir: Path, fingerprint: dict[str, Any], on_change: str, name: str,
                storage: Path) -> tuple[str, Path]:
    """Refuse (or version) a study whose code or data changed since it started."""
    meta_file = study_dir / "study.json"
    if not meta_file.exists():
        study_dir.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(fingerprint, indent=1))
        return name, study_dir
    old = json.loads(meta_file.read_text())
    changed = [k for k in ("source_hash", "data_manifest_hash") if old.get(k) != fingerprint.get(k)]
    if not changed:
        return name, study_dir
    what = ", ".join(f"{k}: {old.get(k)} -> {fingerprint.get(k)}" for k in changed)
    if on_change == "refuse":
        raise ValueError(f"study {name!r} was started with other code or data ({what}); refusing to mix results. "
                         f"Use a new --study-name or --on-change new-version")
    v = 2
    while (storage / f"{name}-v{v}" / "study.json").exists():
        old_v = json.loads((storage / f"{name}-v{v}" / "study.json").read_text())
        if all(old_v.get(k) == fingerprint.get(k) for k in ("source_hash", "data_manifest_hash")):
            break
        v += 1
    new = f"{name}-v{v}"
    print(f"code or data changed since study {name!r} started ({what}); continuing as new version {new!r}")
    return study_guard(storage / new, fingerprint, "refuse", new, storage)


def finished_runs(store_dir: Path) -> set[str]:
    from analysis.store import read_table

    try:
        df = read_table(store_dir, "train")
    except (FileNotFoundError, ValueError):
        return set()
    if df is None or df.empty or "is_final" not in df:
        return set()
    return set(df.loc[df["is_final"].fillna(False).astype(bool), "run_id"])


def connect_ray(address: str | None, num_cpus: int | None, repo_root: Path) -> None:
    import ray

    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")}
    os.environ.update(env)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError depending on the failure
            raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc
    else:
        pp = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**env, "PYTHONPATH": pp}})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo_root = Path(__file__).resolve().parent.parent
    storage = Path(args.storage).resolve()
    from study.plans import LRSearch, load_plan

    try:
        plan = load_plan(args.preset, args)
    except ValueError as exc:
        return fail(str(exc))
    if args.dry_run:
        print_plan(plan, args)
        return 0
    try:
        check_storage(storage)
    except ValueError as exc:
        return fail(str(exc))

    manifest = args.manifest
    if not manifest:
        if plan.cohort is None:
            return fail(f"preset {plan.name!r} needs --manifest")
        manifest = ensure_cohort(plan, storage)
    if not Path(manifest).exists():
        return fail(f"manifest {manifest} does not exist")
    specs = [s.replace(manifest=str(manifest)) for s in plan.specs]

    from study.provenance import code_commit, manifest_content_hash, package_versions, source_hash

    name = args.study_name or plan.name
    fingerprint = {"source_hash": source_hash(), "code_commit": code_commit(),
                   "data_manifest_hash": manifest_content_hash(str(manifest)),
                   "package_versions": json.loads(package_versions()), "preset": args.preset,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        name, study_dir = study_guard(storage / name, fingerprint, args.on_change, name, storage)
    except ValueError as exc:
        return fail(str(exc))
    specs = [s.replace(study=name) for s in specs]
    store_dir = study_dir / "store"
    stop_file = study_dir / "STOP"
    if stop_file.exists():  # left by the previous allocation's walltime guard
        stop_file.unlink()

    done = finished_runs(store_dir)
    todo = [s for s in specs if s.run_id not in done]
    print(f"study {name!r}: {len(specs)} runs, {len(done & {s.run_id for s in specs})} already finished, "
          f"{len(todo)} to run; results -> {store_dir}", flush=True)

    if todo:
        try:
            connect_ray(args.address, args.num_cpus, repo_root)
        except ConnectionError as exc:
            return fail(str(exc))
        import ray

        from study.sweep import placement, run_trials

        try:
            pl = placement(plan.num_workers, plan.use_gpu, args.max_concurrent)
        except RuntimeError as exc:
            return fail(str(exc))
        ctx = {"train_storage": str(study_dir / "runs"), "store_dir": str(store_dir),
               "num_workers": pl.num_workers, "use_gpu": pl.use_gpu, "cpus_per_worker": pl.cpus_per_worker,
               "stop_file": str(stop_file), "manifest_hash": fingerprint["data_manifest_hash"],
               "deadline": time.time() + args.walltime_s if args.walltime_s else None,
               "wandb": args.wandb}
        if args.wandb:
            os.environ.setdefault("WANDB_DIR", str(study_dir / "wandb"))
        print(f"{pl.concurrency} trial(s) at once, {pl.num_workers} worker(s) x "
              f"{'1 GPU' if pl.use_gpu else f'{pl.cpus_per_worker:g} CPU'} each", flush=True)
        lr_search = LRSearch(n_trials=args.lr_search) if args.lr_search else plan.lr_search
        counts = run_trials(todo, ctx=ctx, storage=str(study_dir / "tune"), study=name,
                            concurrency=pl.concurrency, lr_search=lr_search, asha=args.asha)
        ray.shutdown()
        if counts["failed"]:
            print(f"warning: {counts['failed']} trial(s) failed; rerun the same command to retry them",
                  file=sys.stderr)

    if args.no_report:
        return 0
    from analysis.report import summarize_study

    out_dir = study_dir / "report"
    summary = summarize_study(store_dir, out_dir)
    print(f"report: {out_dir}")
    print(summary.get("markdown", json.dumps(summary, indent=1, default=str)))
    remaining = [s for s in specs if s.run_id not in finished_runs(store_dir)]
    return 1 if remaining and not stop_file.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
