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
from typing import Any, Sequence

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
    from study.cli_args import add_bad_data_arg

    add_bad_data_arg(ap)  # --bad-data stop|skip
    return ap


def with_bad_data(specs: list, args: argparse.Namespace) -> list:
    """``specs`` with ``--bad-data`` (if given) as their ``bad_data`` policy (not part of a run's id: a rerun with
    another policy resumes the same runs)."""
    policy = getattr(args, "bad_data", None)
    return [s.replace(bad_data=policy) for s in specs] if policy else list(specs)


def rerun_command(option: str, value: str, argv: list[str] | None = None) -> str:
    """This process's command line with ``option value`` set (replacing the option if it was given)."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    out, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    prog = argv[0] if argv else "python"
    head = ["python", prog] if prog.endswith(".py") else ["python", "-m", Path(prog).stem] if prog else ["python"]
    return shlex.join([*head, *out, option, value])


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
    bad_data_stop: bool = False
    """A trial failed on a bad subject file and the study stopped launching trials."""
    not_run: int = 0
    """Trials stopped or never started because of that."""
    bad_files: list = field(default_factory=list)
    """Bad subject files found by this invocation's trials (:class:`data.quarantine.Entry`, policy ``stop``)."""
    quarantined: list = field(default_factory=list)
    """The study's quarantine list when its runs skip bad files (:class:`data.quarantine.Entry`, every record)."""

    lr_search: Any = None
    """The plan's LR search, if any: its runs are the searched LRs, so a spec is done when its group's search is."""

    @property
    def remaining(self) -> list:
        if self.lr_search is not None:  # study.search_state: the search's trials, durable in its journal
            from study.search_state import unfinished_searches

            return unfinished_searches(self.store_dir, self.specs, self.lr_search)
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


def check_plan(plan, args, extra_specs: Sequence[Any] = ()) -> str:
    """Resolve the plan's manifest and verify the subject files its runs (and ``extra_specs``, e.g. the
    fine-tuning runs that follow a config search) read, under ``--bad-data`` if given; returns the manifest path."""
    from study.preflight import check_specs

    manifest = resolve_manifest(plan, args)
    check_specs(with_bad_data([*plan.specs, *extra_specs], args), manifest)
    return manifest


def run_plan(plan, args: argparse.Namespace, *, repo_root: Path, lr_search=None) -> StudyRun:
    """Execute ``plan``; raises ``ValueError`` / ``ConnectionError`` / ``RuntimeError`` on bad input."""
    manifest = resolve_manifest(plan, args)  # checks the name and the storage before anything is written
    storage = Path(args.storage).resolve()
    specs = [s.replace(manifest=str(manifest)) for s in with_bad_data(plan.specs, args)]

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
    run = StudyRun(name=name, study_dir=study_dir, store_dir=store_dir, specs=specs, stop_file=stop_file,
                   lr_search=lr_search or plan.lr_search)
    from data.quarantine import Quarantine
    from study.preflight import quarantine_found

    quarantine = Quarantine(store_dir)
    skip = bool(specs) and all(s.bad_data == "skip" for s in specs)
    if skip:
        quarantine_found(quarantine, manifest)  # what the pre-flight check found: skipped from the first trial on
    t_start = time.time()

    done = finished_runs(store_dir)
    todo = run.remaining
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
                            stage_ahead=pl.stage_ahead, grid=specs)
    finally:
        disconnect_ray()
    run.failed = counts["failed"]
    run.errors = list(counts.get("errors", ()))
    run.bad_data_stop = bool(counts.get("bad_data_stop"))
    run.not_run = max(0, len(todo) - int(counts.get("done", 0)) - run.failed) if run.bad_data_stop else 0
    run.bad_files = [x for x in quarantine.found_since(t_start) if x.policy == "stop"]
    if skip:
        run.quarantined = quarantine.entries()
    if run.failed:
        print("\n".join(failure_summary(run)), file=sys.stderr)
    if run.bad_data_stop and hasattr(args, "no_report"):  # the entry point's report would read as a study's result
        args.no_report = True
        print("no report: the study stopped on bad data (see above); the report comes with the finished study",
              file=sys.stderr)
    if run.quarantined:
        print("\n".join(quarantine_summary(run)), file=sys.stderr)
    return run


def quarantine_summary(run: "StudyRun") -> list[str]:
    """The study's quarantine list as the console's (and the report's) last words: every file the runs skipped."""
    lines = [f"warning: {len(run.quarantined)} subject file(s) quarantined: every run skipped their windows "
             f"(list: {run.store_dir / 'quarantine'})"]
    lines += [f"  {e.path}: {e.what} (found by {e.found_by})" for e in run.quarantined]
    return lines


def failure_summary(run: "StudyRun") -> list[str]:
    """What failed, grouped by cause, and what to do about it (the console's last words after failed trials)."""
    by_cause: dict[str, list[str]] = {}
    for e in run.errors:
        by_cause.setdefault(e["cause"], []).append(e["run_id"])
    lines = [f"error: {run.failed} trial(s) failed ({run.failed} of {len(run.specs)} runs):"]
    bad_files = getattr(run, "bad_files", None) or []
    for cause, ids in by_cause.items():
        if bad_files and "BadDataError" in cause:  # named below, once per file
            continue
        lines.append(f"  {cause}  [{len(ids)} run(s): {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}]")
    if len(run.errors) < run.failed:
        lines.append(f"  {run.failed - len(run.errors)} more without an error text")
    causes = " ".join(by_cause)
    if bad_files:
        stopped = getattr(run, "bad_data_stop", False)
        lines.append(f"  bad subject file(s) met by a trial{'; the study stopped launching trials' if stopped else ''}"
                     f"{f' ({run.not_run} other run(s) stopped or not started)' if getattr(run, 'not_run', 0) else ''}:")
        lines += [f"    {e.path}: {e.what} (met by {e.found_by})" for e in bad_files]
        manifest = run.specs[0].manifest if run.specs else "the manifest"
        if all(e.what.startswith("(validation split)") for e in bad_files):  # study.train.VAL_BAD_PREFIX
            lines.append(f"  fix or remove them from {manifest} (validation files cannot be skipped: every run's "
                         "val_loss must use the same windows)")
        else:
            lines.append(f"  fix or remove them from {manifest}, or quarantine them and train without them: "
                         f"{rerun_command('--bad-data', 'skip')}")
    elif "BadDataError" in causes:
        lines.append("  a subject file is unreadable: fix it or remove it from the manifest, or rerun with "
                     "--bad-data skip to quarantine it and train around it")
    if "TrainingDiverged" in causes:
        lines.append("  a run diverged: lower its LR (or check its data); the rest of the study is unaffected")
    lines.append(f"  tracebacks: {run.study_dir / 'tune'} (each trial's error.txt)" + (
        "" if bad_files else "; rerunning the same command retries only the failed and unfinished runs"))
    return lines
