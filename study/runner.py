"""Shared machinery of the study entry points (scaling_law, mutransfer, config_search, finetune).

``run_plan`` does what every study does: check the storage, generate (once) or check the cohort,
guard against mixing code/data versions, connect to Ray (embedded locally, or the cluster),
skip finished runs, run the rest as Tune trials, and return where the results are. The trials get the study's
:class:`~study.run_env.RunEnv` (store, run storage, STOP file, deadline, manifest hash, W&B) and the placement's
:class:`~study.sweep.TrialSetup`. This module does not import Ray (:mod:`study.sweep` does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


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


def confined(storage: Path, *parts: str) -> Path:
    """``storage/parts...`` resolved (symlinks included), refused with ``ValueError`` when it leaves ``storage``.

    Study names are checked against :data:`study.spec.NAME_PATTERN` first, so this only catches a symlink
    inside the storage that points elsewhere (another user's folder on shared project storage)."""
    root = Path(storage).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"storage path {root.joinpath(*parts)} resolves to {path}, outside --storage {root}; "
                         "refusing to write there")
    return path


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
    from study.spec import check_name

    check_name("study name", name)
    study_dir = confined(storage, name)
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
    while (confined(storage, f"{name}-v{v}") / "study.json").exists():
        old_v = json.loads((confined(storage, f"{name}-v{v}") / "study.json").read_text())
        if all(old_v.get(k) == fingerprint.get(k) for k in ("source_hash", "data_manifest_hash")):
            break
        v += 1
    new = f"{name}-v{v}"
    print(f"code or data changed since study {name!r} started ({what}); continuing as new version {new!r}")
    return study_guard(confined(storage, new), fingerprint, "refuse", new, storage)


def finished_runs(store_dir: Path) -> set[str]:
    import pandas as pd

    from analysis.store import read_table

    try:
        df = read_table(store_dir, "train")
    except (FileNotFoundError, ValueError):
        return set()
    if df is None or df.empty:
        return set()
    done = df["is_final"].fillna(False).astype(bool) if "is_final" in df else pd.Series(False, index=df.index)
    if "status" in df:  # stopped by ASHA: judged, not to be rerun (study.sweep.record_early_stop)
        done |= df["status"] == "early_stopped"
    return set(df.loc[done, "run_id"])


def connect_ray(address: str | None, num_cpus: int | None, repo_root: Path) -> None:
    """Connect this process to Ray: :func:`study.sweep.connect_ray` (Ray is imported by the sweep and launch
    modules only)."""
    from study.sweep import connect_ray as _connect

    _connect(address, num_cpus, repo_root)


def add_common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options every study entry point takes."""
    ap.add_argument("--study-name", default=None, help="name of the study (default: the preset's name)")
    ap.add_argument("--storage", default="studies", help="shared-filesystem directory for everything durable")
    ap.add_argument("--manifest", default=None, help="cohort manifest (Parquet); presets may generate a synthetic one")
    ap.add_argument("--address", default=None,
                    help="Ray address ('auto' inside a cluster or `ray job submit`); default: embedded local Ray")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    ap.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once")
    ap.add_argument("--asha", action="store_true",
                    help="stop poor trials early (ASHA on val_loss), comparing only runs that differ in LR alone")
    ap.add_argument("--wandb", action="store_true", help="log runs to W&B (offline unless a key is set)")
    ap.add_argument("--on-change", choices=["refuse", "new-version"], default="refuse",
                    help="what to do when code or data changed since the study started")
    ap.add_argument("--walltime-s", type=float, default=None,
                    help="stop trials gracefully (final checkpoint) this many seconds from now")
    ap.add_argument("--no-report", action="store_true", help="skip the final analysis and plots")
    ap.add_argument("--trial-launcher", choices=["auto", "inline", "ray-train"], default="auto",
                    help="how a trial trains: 'inline' runs train() in the Tune trial actor and reuses it for the "
                         "next trial (one worker per run; no per-trial process starts), 'ray-train' fits a Ray "
                         "Train TorchTrainer per trial (any number of workers, worker-level restarts); 'auto': "
                         "inline for one-worker runs")
    return ap


@dataclass
class StudyRun:
    name: str
    study_dir: Path
    store_dir: Path
    specs: list
    stop_file: Path
    failed: int = 0
    errors: list = field(default_factory=list)
    """One dict per failed trial: ``run_id``, ``cause`` (its error's last line), ``trial_path``."""

    @property
    def remaining(self) -> list:
        done = finished_runs(self.store_dir)
        return [s for s in self.specs if s.run_id not in done]


def resolve_manifest(plan, args: argparse.Namespace) -> str:
    """The manifest a study uses: ``--manifest``, or the plan's synthetic cohort generated once under ``--storage``;
    after the checks that come before anything is written (study name, writable storage)."""
    from study.spec import check_name

    check_name("--study-name", args.study_name or plan.name)
    storage = Path(args.storage).resolve()
    check_storage(storage)
    manifest = args.manifest
    if not manifest:
        if plan.cohort is None:
            raise ValueError(f"preset {plan.name!r} needs --manifest")
        manifest = ensure_cohort(plan, storage)
    if not Path(manifest).is_file():
        raise ValueError(f"manifest {manifest} does not exist")
    return str(manifest)


def run_plan(plan, args: argparse.Namespace, *, repo_root: Path, lr_search=None) -> StudyRun:
    """Execute ``plan``; raises ``ValueError`` / ``ConnectionError`` / ``RuntimeError`` on bad input."""
    manifest = resolve_manifest(plan, args)  # checks the name and the storage before anything is written
    storage = Path(args.storage).resolve()
    specs = [s.replace(manifest=str(manifest)) for s in plan.specs]

    from study.provenance import code_commit, manifest_content_hash, package_versions, source_hash

    name = args.study_name or plan.name
    fingerprint = {"source_hash": source_hash(), "code_commit": code_commit(),
                   "data_manifest_hash": manifest_content_hash(str(manifest)),
                   "package_versions": json.loads(package_versions()), "preset": plan.name,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    name, study_dir = study_guard(confined(storage, name), fingerprint, args.on_change, name, storage)
    specs = [s.replace(study=name) for s in specs]
    store_dir = study_dir / "store"
    stop_file = study_dir / "STOP"
    if stop_file.exists():  # left by the previous allocation's walltime guard
        stop_file.unlink()
    run = StudyRun(name=name, study_dir=study_dir, store_dir=store_dir, specs=specs, stop_file=stop_file)

    done = finished_runs(store_dir)
    todo = [s for s in specs if s.run_id not in done]
    print(f"study {name!r}: {len(specs)} runs, {len(done & {s.run_id for s in specs})} already finished, "
          f"{len(todo)} to run; results -> {store_dir}", flush=True)
    if not todo:
        return run
    from study.run_env import RunEnv
    from study.sweep import connect_ray as _connect_ray
    from study.sweep import disconnect_ray, placement, run_trials

    _connect_ray(args.address, args.num_cpus, repo_root)
    try:
        pl = placement(plan.num_workers, plan.use_gpu, args.max_concurrent,
                       launcher=getattr(args, "trial_launcher", "auto"))
        sweep_id = None
        if args.wandb:
            from study.wandb_reporter import create_sweep

            os.environ.setdefault("WANDB_DIR", str(study_dir / "wandb"))
            sweep_id = create_sweep(name, todo)
        env = RunEnv(storage=str(study_dir / "runs"), store_dir=str(store_dir), stop_file=str(stop_file),
                     manifest_hash=fingerprint["data_manifest_hash"],
                     deadline=time.time() + args.walltime_s if args.walltime_s else None,
                     wandb=args.wandb, wandb_sweep_id=sweep_id)
        print(f"{pl.concurrency} trial(s) at once, {pl.num_workers} worker(s) x "
              f"{'1 GPU' if pl.use_gpu else f'{pl.cpus_per_worker:g} CPU'} each, {pl.launcher} launcher",
              flush=True)
        counts = run_trials(todo, env=env, setup=pl.trial_setup(), storage=str(study_dir / "tune"), study=name,
                            concurrency=pl.concurrency, lr_search=lr_search or plan.lr_search, asha=args.asha,
                            stage_ahead=pl.stage_ahead)
    finally:
        disconnect_ray()
    run.failed = counts["failed"]
    run.errors = list(counts.get("errors", ()))
    if run.failed:
        print("\n".join(failure_summary(run)), file=sys.stderr)
    return run


def failure_summary(run: "StudyRun") -> list[str]:
    """What failed, grouped by cause, and what to do about it (the console's last words after failed trials)."""
    by_cause: dict[str, list[str]] = {}
    for e in run.errors:
        by_cause.setdefault(e["cause"], []).append(e["run_id"])
    lines = [f"error: {run.failed} trial(s) failed ({run.failed} of {len(run.specs)} runs):"]
    for cause, ids in by_cause.items():
        lines.append(f"  {cause}  [{len(ids)} run(s): {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}]")
    if len(run.errors) < run.failed:
        lines.append(f"  {run.failed - len(run.errors)} more without an error text")
    causes = " ".join(by_cause)
    if "BadDataError" in causes:
        lines.append("  a subject file is unreadable: fix it or remove it from the manifest, or set the runs' "
                     "bad_data='skip' to train around it")
    if "TrainingDiverged" in causes:
        lines.append("  a run diverged: lower its LR (or check its data); the rest of the study is unaffected")
    lines.append(f"  tracebacks: {run.study_dir / 'tune'} (each trial's error.txt); rerunning the same command "
                 "retries only the failed and unfinished runs")
    return lines
