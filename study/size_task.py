"""Size versus task (the seed report's Table 3, issue #27 item 3): fine-tune every size of a pre-training ladder on
every task and report, per task, each size's metric with its 95% interval, the FC baseline row, the best size and
whether bigger is better.

The ladder is the checkpoints of a pre-training study (``--from-study``: a study folder, e.g. the main job's
``<storage>/demo`` written by ``python study/scaling_law.py --storage <storage>``, or its ``store`` folder), one per
size, or explicit exported weights (``--weights``); ``--quick`` pre-trains its own tiny ladder (SwiFT v2 debug at
widths 16/32/48)::

    python -m study.size_task --quick                                  # 2 CPUs, a few minutes
    python -m study.size_task --from-study studies/demo --tasks trait_bin:classification trait_cont:regression
    python -m study.size_task --weights w51M.safetensors w202M.safetensors w806M.safetensors \\
        --manifest cohort/manifest.parquet --tasks sex:classification age:regression --strategies last_block

Every run is an ordinary fine-tuning run of :mod:`study.finetune` (its grid, runner, store, resume, ``--ray``, FC
baseline): each size gets the fine-tuning defaults of ``study.finetune.base_spec`` with the architecture fields of
its checkpoint. From a study, each size's checkpoint is that of the run with the lowest final validation loss among
its finished runs (``--pick best``) or of its largest budget (``--pick largest``), from the study's main data
mixture; it is exported to ``<out>/weights/``. The statistics are in :mod:`study.size_task_report`.

Outputs under ``<storage>/<study-name>/`` (default ``studies/size-task/``): ``size_task.md``, ``size_task.json``,
``size_task.png``, ``ladder.json`` (size label -> parameters, source run), the ``finetune`` store table, the FC
baseline cache and every run's folder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from study import finetune as FT

#: ``--quick``'s ladder: SwiFT v2 debug widths (decoder as wide as the encoder, as in the main job)
QUICK_WIDTHS = (16, 32, 48)
#: ``--quick``'s pre-training steps per width and fine-tuning steps per run (4-frame windows, batch 8)
QUICK_PRETRAIN_STEPS, QUICK_STEPS = 60, 40
ARCH_FIELDS = ("family", "size", "width", "grid", "sequence_length", "model_overrides", "parametrization",
               "mup_base_width", "scaling")


@dataclass
class Rung:
    """One size of the ladder: its exported weights, the parameters of the pre-trained model, where it came from."""
    label: str
    weights: str
    n_params: int
    run_id: str | None = None
    val_loss: float | None = None


def rung_label(spec: dict[str, Any]) -> str:
    """``swift_v2-debug-w16`` (the file stem, hence the ``checkpoint`` label of the fine-tuning rows)."""
    return f"{spec.get('family')}-{spec.get('size')}" + (f"-w{spec['width']}" if spec.get("width") else "")


def weights_params(path: str | Path) -> int:
    """Parameters of the pre-trained model of an exported weights file (every tensor of its state dict)."""
    from study import checkpoint as ckpt

    sd, _ = ckpt.load_exported(path)
    return int(sum(t.numel() for t in sd.values()))


def ladder_from_weights(paths: Sequence[str]) -> list[Rung]:
    """Rungs of explicit weights files, labelled by file stem, sorted by size."""
    rungs = [Rung(Path(p).stem, str(Path(p).resolve()), weights_params(p)) for p in paths]
    if len({r.label for r in rungs}) < len(rungs):
        raise ValueError("two weights files share a file name; the stems label the sizes")
    return sorted(rungs, key=lambda r: r.n_params)


def _study_paths(source: Path) -> tuple[Path, Path]:
    source = Path(source)
    if (source / "store").is_dir():
        return source, source / "store"
    if source.name == "store" and source.is_dir():
        return source.parent, source
    raise ValueError(f"{source} is neither a study folder (with store/ and runs/) nor its store folder")


def ladder_from_study(source: Path, out_dir: Path, *, pick: str = "best") -> list[Rung]:
    """One rung per model size (family, size, width) of a pre-training study: the finished run with the lowest
    final ``val_loss`` (``pick="best"``) or the largest budget (``"largest"``) of the study's main data mixture
    (the most common ``spec.cohorts``); its newest complete checkpoint exported to ``out_dir/<label>.safetensors``."""
    from analysis.store import read_table
    from study import checkpoint as ckpt
    from study.run_math import model_config
    from study.spec import RunSpec

    study_dir, store_dir = _study_paths(source)
    df = read_table(store_dir, "train")
    final = df[df["is_final"].fillna(False).astype(bool)] if "is_final" in df else df.iloc[:0]
    if final.empty:
        raise ValueError(f"no finished pre-training run in {store_dir}")
    final = final.drop_duplicates("run_id", keep="last")
    if "spec.cohorts" in final:
        main = final["spec.cohorts"].astype(str).mode().iloc[0]
        final = final[final["spec.cohorts"].astype(str) == main]
    key = [c for c in ("spec.family", "spec.size", "spec.width") if c in final]
    rungs = []
    for _, g in final.groupby(key, dropna=False, sort=False):
        g = g.sort_values("val_loss" if pick == "best" else "flops", ascending=pick == "best")
        row = g.iloc[0]
        found = ckpt.resume_point(study_dir / "runs" / row["run_id"])
        if found is None:
            print(f"warning: no checkpoint of {row['run_id']} under {study_dir / 'runs'}; size left out",
                  file=sys.stderr)
            continue
        state = json.loads((found / ckpt.STATE_FILE).read_text())
        spec = RunSpec.from_dict(state["spec"])
        label = rung_label(spec.to_dict())
        out = out_dir / f"{label}.safetensors"
        if not out.exists():
            ckpt.export_weights(found, out, model_config=model_config(spec), spec_json=spec.to_json(),
                                mup_base_width=spec.mup_base_width)
        rungs.append(Rung(label, str(out.resolve()), weights_params(out), str(row["run_id"]),
                          float(row["val_loss"]) if "val_loss" in row and pd.notna(row["val_loss"]) else None))
    if len({r.label for r in rungs}) < len(rungs):
        raise ValueError("two sizes of the study share a label (family-size-width)")
    return sorted(rungs, key=lambda r: r.n_params)


def quick_ladder(manifest: str, out_dir: Path, *, steps: int, ctx, widths: Sequence[int] = QUICK_WIDTHS,
                 sequence_length: int = 4) -> list[Rung]:
    """``--quick``: pre-train SwiFT v2 debug at each width for ``steps`` steps (``study.finetune.pretrain_and_export``)
    and export; labelled by width."""
    rungs = []
    for w in widths:
        base = FT.base_spec(manifest, quick=True, overrides={"width": w, "model_overrides": {"decoder_dim": w},
                                                            "sequence_length": sequence_length})
        print(f"pre-training swift_v2/debug width {w} for {steps} steps ...", flush=True)
        src = FT.pretrain_and_export(base, out_dir, steps=steps, ctx=ctx)
        label = rung_label({"family": "swift_v2", "size": "debug", "width": w})
        dst = out_dir / f"{label}.safetensors"
        if not dst.exists():
            dst.write_bytes(Path(src).read_bytes())
        rungs.append(Rung(label, str(dst.resolve()), weights_params(dst), src.stem))
    return rungs


def size_cells(rungs: Sequence[Rung], tasks, strategies: Sequence[str], repeats: int, *, manifest: str,
               quick: bool, overrides: dict[str, Any]) -> list:
    """The fine-tuning cells of every rung (``study.finetune.grid_specs``): ``base_spec`` defaults and
    ``overrides``, with each checkpoint's architecture fields; each rung's weights checked against its spec."""
    from study import checkpoint as ckpt
    from study.spec import RunSpec

    cells = []
    for r in rungs:
        _, info = ckpt.load_exported(r.weights)
        pre = RunSpec.from_dict(info["spec"]) if info.get("spec") else None
        arch = {k: getattr(pre, k) for k in ARCH_FIELDS} if pre is not None else {}
        base = FT.base_spec(manifest, quick=quick, overrides={**arch, **overrides})
        FT.check_weights(base, [r.weights])
        cells += FT.grid_specs(base, tasks, strategies, [r.weights], repeats)
    return cells


def load_study(study_dir: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """The rows (fine-tuning + FC baseline) and sizes of a finished size-vs-task study folder (for notebooks)."""
    from analysis.store import read_table

    study_dir = Path(study_dir)
    ladder = json.loads((study_dir / "ladder.json").read_text())
    sizes = {r["label"]: float(r["n_params"]) for r in ladder["rungs"]}
    df = read_table(study_dir / "store", FT.TABLE)
    df = df[df["checkpoint"].isin(list(sizes)) & df["strategy"].isin(ladder["strategies"])
            & df["task"].isin(ladder["tasks"])]
    fc = study_dir / "fc_baseline.parquet"
    if fc.exists():
        df = pd.concat([df, pd.read_parquet(fc).drop(columns=["cache_key"], errors="ignore")], ignore_index=True)
    return df.reset_index(drop=True), sizes


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.cli_args import HelpFormatter, add_bad_data_arg

    ap = argparse.ArgumentParser(prog="python -m study.size_task", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--storage", default="studies",
                    help="root folder of studies: outputs go to <storage>/<study-name>/")
    ap.add_argument("--study-name", default="size-task", help="name of the study (letters, digits, . _ -)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-study", default=None,
                     help="pre-training study folder (or its store/) whose sizes form the ladder, e.g. <storage>/demo")
    src.add_argument("--weights", nargs="+", default=None, help="exported weights (.safetensors), one per size")
    ap.add_argument("--pick", default="best", choices=["best", "largest"],
                    help="with --from-study: each size's run with the lowest final val_loss, or its largest budget")
    ap.add_argument("--manifest", default=None,
                    help="cohort with the task labels; default: a synthetic cohort (planted traits) on the ladder's "
                         "grid under <storage>/<study-name>/")
    ap.add_argument("--tasks", nargs="+", default=list(FT.DEFAULT_TASKS),
                    help="downstream tasks as <label column>:<classification|regression>")
    ap.add_argument("--strategies", nargs="+", default=["full"], choices=[s for s in FT.STRATEGIES if s != "scratch"],
                    help="fine-tuning strategies (one table per task and strategy)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fine-tuning runs per (size, task) (seeds seed, seed+1, ...)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 150, --quick 40)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="--quick's pre-training steps per width (60)")
    ap.add_argument("--quick", action="store_true",
                    help="pre-train its own 3-width ladder and fine-tune it: 2 CPUs, at most ~10 minutes")
    ap.add_argument("--spec-json", default=None,
                    help="JSON object of RunSpec fields overriding the fine-tuning defaults")
    ap.add_argument("--device", default=None, choices=["cuda", "xpu", "cpu"], help="device of in-process runs")
    ap.add_argument("--ray", type=int, default=0, metavar="WORKERS",
                    help="run each fine-tuning run as a Ray Train job with this many workers (0: in this process)")
    ap.add_argument("--address", default=None, help="with --ray: Ray cluster address (default $RAY_ADDRESS or local)")
    ap.add_argument("--num-cpus", type=int, default=None, help="with --ray: CPUs of the embedded local Ray")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_bad_data_arg(ap)
    return ap.parse_args(argv)


def _cohort(study_dir: Path, grid: Sequence[int], quick: bool) -> str:
    from data.synthetic import generate_cohort

    root = study_dir / ("cohort_quick" if quick else "cohort") / "x".join(map(str, grid))
    if (root / "manifest.parquet").exists():
        return str(root / "manifest.parquet")
    n, frames = (60, 16) if quick else (80, 32)
    return str(generate_cohort(root, n_subjects=n, grid=tuple(grid), n_frames=frames, seed=0, progress=True,
                               fractions=(0.5, 0.2, 0.3), trait_scale=FT.STUDY_TRAIT_SCALE))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.devices import context_from_env

    try:
        tasks, overrides = FT.tasks_and_overrides(args)
        if not (args.quick or args.from_study or args.weights):
            raise ValueError("name the ladder: --from-study <pre-training study> or --weights <files>, or --quick")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats} must be >= 1")
        study_dir = FT.make_study_dir(args.storage, args.study_name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = context_from_env(args.device)
    t0 = time.perf_counter()
    overrides["study"] = args.study_name
    if args.steps is not None or args.quick:
        overrides["budget"] = args.steps or QUICK_STEPS
        overrides.setdefault("budget_kind", "steps")
    if args.quick:
        overrides.setdefault("eval_every", overrides["budget"])
    if args.bad_data:
        overrides["bad_data"] = args.bad_data
    try:
        if args.weights:
            rungs = ladder_from_weights(args.weights)
        elif args.from_study:
            rungs = ladder_from_study(Path(args.from_study), study_dir / "weights", pick=args.pick)
        else:
            rungs = []
        grid = None
        if rungs:
            from study import checkpoint as ckpt

            grid = ckpt.load_exported(rungs[0].weights)[1].get("spec", {}).get("grid")
        manifest = args.manifest or _cohort(study_dir, grid or (24, 24, 24), args.quick)
        manifest = str(Path(manifest).resolve())
        if not Path(manifest).is_file():
            raise ValueError(f"manifest {manifest} does not exist")
        if args.quick and not rungs:
            rungs = quick_ladder(manifest, study_dir / "pretrained", ctx=ctx,
                                 steps=args.pretrain_steps or QUICK_PRETRAIN_STEPS)
        if len(rungs) < 2:
            raise ValueError(f"the ladder has {len(rungs)} size(s); a size-vs-task study needs at least 2")
        cells = size_cells(rungs, tasks, args.strategies, args.repeats, manifest=manifest, quick=args.quick,
                           overrides={k: v for k, v in overrides.items() if k not in ARCH_FIELDS})
        from study.preflight import check_specs

        check_specs([c[0] for c in cells[:: max(1, len(cells) // len(rungs))]], manifest)
    except (ValueError, FT.ckpt.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (study_dir / "ladder.json").write_text(json.dumps(
        {"rungs": [asdict(r) for r in rungs], "tasks": [t for t, _ in tasks], "strategies": list(args.strategies),
         "repeats": args.repeats, "manifest": manifest, "source": args.from_study or args.weights or "quick"},
        indent=1))
    print("ladder: " + ", ".join(f"{r.label} ({r.n_params:,} parameters)" for r in rungs), flush=True)
    cpw = 1.0
    if args.ray:
        from study.sweep import cluster_cpus

        FT.connect_ray(args.address, args.num_cpus)
        cpw = max(0.1, min(8.0, math.floor(90 * cluster_cpus() / args.ray) / 100))
    try:
        df = FT.run_grid(cells, study_dir=study_dir, ctx=ctx, progress=not args.no_progress, ray_workers=args.ray,
                         cpus_per_worker=cpw, device=args.device)
    except FT.BadDataStopped as exc:
        print("\n".join(FT.bad_data_summary(exc, study_dir / "store", manifest)), file=sys.stderr)
        return 1
    try:
        df = pd.concat([df, FT.fc_rows(manifest, tasks, args.repeats, study_dir)], ignore_index=True)
    except (ValueError, OSError) as exc:
        print(f"warning: no FC baseline row: {exc}", file=sys.stderr)
    from study.size_task_report import write_report

    out = write_report(df, {r.label: float(r.n_params) for r in rungs}, study_dir)
    print(out["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in out.values())} ({len(df)} rows, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
