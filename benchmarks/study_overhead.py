"""Study-machinery benchmarks: a trial's orchestration overhead, and ASHA's compute against the grid.

1. Overhead: ``--trials`` runs (tiny SwiFT v2, ~``--target-s`` seconds of training each) in-process
   (``study.train.train``, one after another) and as one sweep of Ray Tune trials (``study.sweep.run_trials``,
   one trial at a time) per ``--variants`` entry: ``inline`` (train() in a reused Tune trial actor, the default
   for one-worker runs), ``ray-train`` (a ``TorchTrainer`` per trial) and ``ray-train+stage`` (the same with
   the next trial staged). Overhead per trial = (sweep wall time - in-process wall time) / trials, reported
   as a fraction of the in-process run time. Target: <= 10% of a 60 s trial.
2. ASHA: an LR grid, first run to completion (the grid), then with ASHA (``--asha``); compute = optimizer
   steps actually run (from the results store). Reports whether ASHA's best configuration is the grid's and
   its compute as a fraction of the grid's. Target: <= 40%.

Writes JSON and a Markdown table::

    python benchmarks/study_overhead.py --out benchmarks/results/study_overhead
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def base_spec(manifest: str, steps: int):
    from study.spec import RunSpec

    return RunSpec(study="bench", family="swift_v2", size="debug", width=32, grid=(24, 24, 24), sequence_length=8,
                   batch_size=4, budget=steps, eval_every=max(1, steps // 9), eval_windows=4, lr=3e-3,
                   manifest=manifest, precision="fp32", checkpoint_every=0, schedule="constant", warmup_frac=0.0)


def store_steps(store_dir: Path, run_ids) -> dict[str, dict]:
    from analysis.store import read_table

    df = read_table(store_dir, "train")
    df = df[df.run_id.isin(set(run_ids))]
    out = {}
    for rid, g in df.groupby("run_id"):
        last = g.sort_values("step").iloc[-1]
        out[rid] = {"steps": int(last["step"]), "val_loss": float(last["val_loss"])}
    return out


PHASES = [("trial_start", "fit_call"), ("fit_call", "worker_start"), ("worker_start", "train_start"),
          ("train_start", "loop_start"), ("loop_start", "loop_end"), ("loop_end", "train_returned"),
          ("train_returned", "fit_returned")]


def run_marks(trace_file: Path, run_ids: list[str]) -> dict[str, dict[str, float]]:
    """``{run_id: {mark: first time}}`` of the ``study.trace`` marks of ``run_ids``."""
    from study.trace import read

    marks: dict[str, dict[str, float]] = {}
    for m in read(trace_file):
        if m.get("run") in run_ids:
            marks.setdefault(m["run"], {}).setdefault(m["what"], m["t"])
    return marks


def phases(trace_file: Path, run_ids: list[str]) -> dict[str, float]:
    """Median seconds of each traced phase over ``run_ids`` (``study.trace`` marks), plus ``slot_gap``: from
    one trial's ``fit_returned`` to the next trial's ``loop_start`` (the time a slot does no training)."""
    import statistics

    marks = run_marks(trace_file, run_ids)
    out: dict[str, float] = {}
    for a, b in PHASES:
        d = [r[b] - r[a] for r in marks.values() if a in r and b in r]
        if d:
            out[f"{a}->{b}"] = statistics.median(d)
    seq = sorted((r for r in marks.values() if "loop_start" in r and "fit_returned" in r), key=lambda r: r["loop_start"])
    gaps = [nxt["loop_start"] - prev["fit_returned"] for prev, nxt in zip(seq, seq[1:])]
    gaps += [nxt["loop_start"] - prev["loop_end"] for prev, nxt in zip(seq, seq[1:])]
    if len(seq) > 1:
        out["slot_gap(fit_returned->next loop_start)"] = statistics.median(gaps[:len(seq) - 1])
        out["slot_gap(loop_end->next loop_start)"] = statistics.median(gaps[len(seq) - 1:])
    return out


def loop_seconds(trace_file: Path, run_ids: list[str]) -> float:
    """Total seconds the runs spent in their training loops (``loop_start`` -> ``loop_end`` marks)."""
    marks = run_marks(trace_file, run_ids)
    return sum(r["loop_end"] - r["loop_start"] for r in marks.values() if "loop_start" in r and "loop_end" in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/study_overhead")
    ap.add_argument("--target-s", type=float, default=60.0)
    ap.add_argument("--asha-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0])
    ap.add_argument("--asha-n", type=int, default=None,
                    help="instead of --asha-lrs: this many LRs log-spaced over [3e-4, 3]")
    ap.add_argument("--asha-steps", type=int, default=81)
    ap.add_argument("--trials", type=int, default=3, help="runs in the overhead sweep")
    ap.add_argument("--variants", nargs="+", default=["inline", "ray-train+stage"],
                    choices=["inline", "ray-train", "ray-train+stage"], help="trial launchers to compare")
    ap.add_argument("--asha-launcher", choices=["inline", "ray-train"], default="inline")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-asha", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    from data.synthetic import generate_cohort
    from study.devices import local_context
    from study.reporters import MemoryReporter
    from study.run_env import RunEnv
    from study.runner import connect_ray
    from study.sweep import plan_placement, run_trials
    from study.train import train

    manifest = str(generate_cohort(work / "cohort", n_subjects=24, grid=(24, 24, 24), n_frames=16, seed=0,
                                   progress=False))
    res: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(),
                 "load_avg_start": os.getloadavg()[0]}
    trace_file = work / "trace.jsonl"
    trace_file.unlink(missing_ok=True)
    os.environ["NEUROX_TRACE_FILE"] = str(trace_file)  # study.trace marks from driver and Ray workers
    connect_ray(None, os.cpu_count(), REPO)
    import ray

    env = RunEnv(storage=str(work / "runs"), store_dir=str(work / "store"))

    def placed(launcher: str, stage: int = 0, max_concurrent: int | None = 1):
        """One launcher's placement on this machine's CPUs, and the trial setup it gives."""
        pl = plan_placement(float(os.cpu_count() or 1), 0.0, 1, False, max_concurrent=max_concurrent,
                            stage_ahead=stage, launcher=launcher)
        return pl.trial_setup(), pl
    if not args.skip_overhead:
        probe = base_spec(manifest, 12)
        rep = MemoryReporter()
        train(probe, local_context("cpu"), rep)
        per_step = 1.0 / max(1e-9, sorted(r["samples_per_s"] for r in rep.logs[2:])[len(rep.logs[2:]) // 2]) * probe.batch_size
        steps = max(10, int(args.target_s / per_step))
        specs = [base_spec(manifest, steps).replace(seed=100 + i) for i in range(args.trials)]
        t0 = time.perf_counter()
        for spec in specs:
            train(spec, local_context("cpu"), MemoryReporter())
        t_in = time.perf_counter() - t0
        res["overhead"] = {"steps": steps, "trials": args.trials, "in_process_s": t_in,
                           "in_process_per_run_s": t_in / args.trials, "by_variant": {}}
        for k, variant in enumerate(args.variants):
            c, pl = placed("inline" if variant == "inline" else "ray-train", stage=int(variant.endswith("+stage")))
            run_specs = [sp.replace(seed=1000 * (k + 1) + sp.seed) for sp in specs]  # new run ids: nothing skipped
            t0 = time.perf_counter()
            run_trials(run_specs, env=env, setup=c, storage=str(work / "tune"), study=f"overhead-{variant}",
                       concurrency=1, stage_ahead=pl.stage_ahead)
            t_sweep = time.perf_counter() - t0
            per_trial = (t_sweep - t_in) / args.trials
            r = res["overhead"]["by_variant"][variant] = {
                "sweep_s": t_sweep, "overhead_per_trial_s": per_trial,
                "overhead_frac": per_trial / (t_in / args.trials), "overhead_frac_of_60s": per_trial / 60.0}
            r["phases_s"] = phases(trace_file, [s.run_id for s in run_specs])
            # the loops themselves may run faster or slower than in-process (CPU frequency, Ray's own
            # processes on the same cores): the time a sweep spends outside its training loops is the
            # stricter measure of orchestration
            r["outside_loops_per_trial_s"] = (t_sweep - loop_seconds(trace_file, [s.run_id for s in run_specs])) \
                / args.trials
            r["outside_loops_frac_of_60s"] = r["outside_loops_per_trial_s"] / 60.0
            print(json.dumps({"variant": variant, **r}), flush=True)
        res["overhead"]["in_process_phases_s"] = phases(trace_file, [s.run_id for s in specs])
    if not args.skip_asha:
        lrs = args.asha_lrs if not args.asha_n else [float(f"{3e-4 * 1e4 ** (i / (args.asha_n - 1)):.3g}")
                                                     for i in range(args.asha_n)]
        specs = [base_spec(manifest, args.asha_steps).replace(lr=lr, seed=7) for lr in lrs]
        setup, pa = placed(args.asha_launcher, max_concurrent=None)
        ids = [s.run_id for s in specs]
        # separate Train storage per phase: the same run ids would otherwise restore finished runs
        run_trials(specs, env=RunEnv(storage=str(work / "runs_grid"), store_dir=str(work / "store_grid")),
                   setup=setup, storage=str(work / "tune"),
                   study="grid", concurrency=pa.concurrency)
        grid = store_steps(work / "store_grid", ids)
        run_trials(specs, env=RunEnv(storage=str(work / "runs_asha"), store_dir=str(work / "store_asha")),
                   setup=setup, storage=str(work / "tune"),
                   study="asha", concurrency=pa.concurrency, asha=True, max_steps=args.asha_steps)
        asha = store_steps(work / "store_asha", ids)
        best_grid = min(grid, key=lambda k: grid[k]["val_loss"])
        finished = {k: v for k, v in asha.items() if v["steps"] >= args.asha_steps}
        best_asha = min(finished, key=lambda k: finished[k]["val_loss"]) if finished else None
        res["asha"] = {"configs": len(specs), "grid_steps": sum(v["steps"] for v in grid.values()),
                       "asha_steps": sum(v["steps"] for v in asha.values()), "grid_best": best_grid,
                       "asha_best": best_asha, "same_best": best_grid == best_asha,
                       "grid_best_val_loss": grid[best_grid]["val_loss"],
                       "per_run": {k: {"grid": grid.get(k), "asha": asha.get(k)} for k in ids}}
        res["asha"]["compute_frac"] = res["asha"]["asha_steps"] / res["asha"]["grid_steps"]
        print(json.dumps({k: v for k, v in res["asha"].items() if k != "per_run"}), flush=True)
    ray.shutdown()
    res["load_avg_end"] = os.getloadavg()[0]
    (out / "study_overhead.json").write_text(json.dumps(res, indent=1))
    md = ["| benchmark | measured | target |", "|---|---|---|"]
    if "overhead" in res:
        o = res["overhead"]
        for variant, r in o["by_variant"].items():
            md.append(f"| trial orchestration overhead, {variant} launcher ({o['trials']} runs of {o['steps']} steps, "
                      f"{o['in_process_per_run_s']:.0f} s each in-process) | {r['overhead_frac']:.1%} "
                      f"({r['overhead_per_trial_s']:.1f} s per trial; sweep {r['sweep_s']:.0f} s vs "
                      f"{o['in_process_s']:.0f} s); outside the training loops {r['outside_loops_per_trial_s']:.1f} s "
                      f"per trial = {r['outside_loops_frac_of_60s']:.1%} of a 60 s trial | <= 10% of a 60 s trial |")
        names = list(dict.fromkeys(k for r in o["by_variant"].values() for k in r.get("phases_s", {})))
        if names:
            md += ["", "Median seconds per traced phase (`study.trace`), in-process vs as Tune trials:", "",
                   "| phase | in-process | " + " | ".join(o["by_variant"]) + " |",
                   "|---|---|" + "---|" * len(o["by_variant"])]
            for n in names:
                ip = o.get("in_process_phases_s", {}).get(n)
                md.append(f"| {n} | {'' if ip is None else f'{ip:.2f}'} | " + " | ".join(
                    f"{r['phases_s'].get(n, float('nan')):.2f}" for r in o["by_variant"].values()) + " |")
            md.append("")
    if "asha" in res:
        a = res["asha"]
        md.append(f"| ASHA compute vs grid ({a['configs']} LRs, {args.asha_launcher} launcher) | {a['compute_frac']:.1%} "
                  f"({a['asha_steps']} / {a['grid_steps']} steps), best config found: {a['same_best']} | <= 40% |")
    md.append(f"\nmachine: {res['cpus']} CPUs, load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f}")
    (out / "study_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
