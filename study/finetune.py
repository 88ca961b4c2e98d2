"""Fine-tuning study: tasks x strategies x checkpoints x repeats, written as the seed's Table 2.

Run the default study (synthetic cohort with planted labels, a tiny SwiFT v2 debug model pre-trained for
a few steps first, every strategy, 3 repeats) on a laptop CPU in a few minutes::

    python -m study.finetune --quick

or on real data with exported weights (``study.checkpoint.export_weights``) of one or more pre-training runs::

    python -m study.finetune --manifest cohort/manifest.parquet --weights w51M.safetensors w202M.safetensors \\
        --tasks sex:classification age:regression --strategies scratch last_block lora --repeats 3 \\
        --spec-json '{"size": "51M", "grid": [96, 96, 96], "sequence_length": 20, "batch_size": 16}'

Outputs under ``<storage>/<study-name>/`` (default ``studies/finetune/``):

* ``store/finetune/part-*.parquet``: one results-store row per (run, task, strategy, repeat) with the
  headline metric in ``metric``/``value`` (``auroc`` for classification, ``mae`` for regression) and every
  metric as its own column (``auroc``, ``bacc``, ``mae``, ``pearson_r``), plus ``pretrain_run_id``, ``size``,
  ``checkpoint``, the trainable fraction and the spec;
* ``finetune_table.md`` / ``finetune_table.parquet``: rows = methods, columns = tasks, cells
  ``mean ± std`` over repeats (sample std, ddof=1) with the % change against "From scratch" (↑ / ↓), the
  best method of each task in bold — the layout of the seed's Table 2 (and Table 3 with several checkpoints);
* ``runs/<run_id>/metrics.jsonl`` and checkpoints of every fine-tuning run.

A run whose rows are already in the store is skipped, so an interrupted study resumes where it stopped.
Runs execute in this process, or with ``--ray N`` each as a Ray Train job of ``N`` workers
(:func:`study.launch_ray.fit_run`, the same path a Ray Tune trial of :mod:`study.sweep` takes); both call
:func:`study.train.train`, which dispatches ``task="finetune"`` specs to :mod:`study.finetune_engine`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from study import checkpoint as ckpt
from study.metrics import HIGHER_IS_BETTER, TASK_METRICS
from study.spec import STRATEGIES, RunSpec

#: How each strategy is called in the table (the seed's wording where it has one)
METHOD_NAMES: dict[str, str] = {
    "scratch": "From scratch",
    "full": "Fine-tuned all",
    "last_block": "Fine-tuned last block",
    "lora": "LoRA",
    "prompt": "Prompt tuning",
    "frozen_mlp": "Frozen encoder + MLP head",
}
DEFAULT_TASKS = ("trait_bin:classification", "trait_cont:regression")
TABLE = "finetune"


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def parse_tasks(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["label:classification", ...]`` -> ``[(label, task_type), ...]``."""
    out = []
    for it in items:
        target, _, task_type = it.partition(":")
        if task_type not in TASK_METRICS or not target:
            raise ValueError(f"task {it!r} must be '<label column>:<task type>' with task type in {list(TASK_METRICS)}")
        out.append((target, task_type))
    return out


def base_spec(manifest: str, *, quick: bool, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Fine-tuning defaults: the debug SwiFT v2 on a 24^3 grid; ``quick``: 4-frame windows and 20 steps,
    else 8-frame windows and 150 steps (where the planted labels start to be learned, see docs/finetune.md)."""
    kw: dict[str, Any] = dict(task="finetune", family="swift_v2", size="debug", grid=(24, 24, 24),
                              sequence_length=4 if quick else 8, batch_size=8, budget=20 if quick else 150,
                              eval_every=10 if quick else 50,
                              lr=1e-3, warmup_frac=0.1, precision="auto", manifest=manifest, target="trait_bin",
                              log_every=5, study="finetune")
    kw.update(overrides or {})
    return RunSpec(**kw)


def grid_specs(base: RunSpec, tasks: Sequence[tuple[str, str]], strategies: Sequence[str],
               checkpoints: Sequence[str], repeats: int) -> list[tuple[RunSpec, str, int]]:
    """``(spec, checkpoint label, repeat)`` of every cell; ``scratch`` runs once per task (no checkpoint).

    ``checkpoints`` are weight files; their label is the file stem. Repeat ``r`` uses ``seed = base.seed + r``.
    """
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"strategies {bad} are not allowed; choose from {list(STRATEGIES)}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if any(s != "scratch" for s in strategies) and not checkpoints:
        raise ValueError("strategies other than 'scratch' need at least one checkpoint (--weights)")
    out = []
    for target, task_type in tasks:
        for strategy in strategies:
            ckpts = ["scratch"] if strategy == "scratch" else list(checkpoints)
            for c in ckpts:
                for r in range(repeats):
                    spec = base.replace(target=target, task_type=task_type, strategy=strategy,
                                        init_from=None if c == "scratch" else str(c), seed=base.seed + r)
                    out.append((spec, "scratch" if c == "scratch" else Path(c).stem, r))
    return out


# --------------------------------------------------------------------------------------------------
# pre-training a tiny model and synthetic data (the default study)
# --------------------------------------------------------------------------------------------------
def ensure_cohort(root: Path, *, n_subjects: int = 40, n_frames: int = 16) -> str:
    """A synthetic cohort (24^3 grid) with a large downstream test split (30% of subjects)."""
    from data.synthetic import generate_cohort

    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest)
    return str(generate_cohort(root, n_subjects=n_subjects, grid=(24, 24, 24), n_frames=n_frames, seed=0,
                               progress=True, fractions=(0.5, 0.2, 0.3)))


def pretrain_and_export(base: RunSpec, out_dir: Path, *, steps: int, ctx) -> Path:
    """Pre-train ``base``'s model (MIM / next-token) on the train split for ``steps`` steps; export its weights.

    The pre-training run takes the architecture and input fields of ``base`` (family, size, width, grid,
    sequence length, overrides, parametrization, manifest) so its weights fit the fine-tuning runs.
    """
    from study.train import model_config, train

    arch = {k: getattr(base, k) for k in ("family", "size", "width", "grid", "sequence_length", "model_overrides",
                                          "parametrization", "mup_base_width", "manifest", "scaling")}
    spec = RunSpec(task="pretrain", batch_size=8, budget=steps, eval_every=max(1, steps), lr=2e-3,
                   study="finetune-pretrain", precision="auto", **arch)
    out = out_dir / f"{spec.run_id}.safetensors"
    if out.exists():
        return out
    run_dir = out_dir / spec.run_id
    resume = ckpt.latest_checkpoint(run_dir / "checkpoints")
    result = train(spec, ctx, None, run_dir=run_dir, resume_from=resume)
    return ckpt.export_weights(result.last_checkpoint, out, model_config=model_config(spec), spec_json=spec.to_json(),
                               mup_base_width=spec.mup_base_width)


def check_weights(base: RunSpec, weights: Sequence[str]) -> None:
    """Every weights file fits ``base``'s model (else :class:`study.checkpoint.CheckpointError`), before any run."""
    from study.finetune_engine import load_weights
    from study.train import model_config

    cfg = model_config(base)
    for w in weights:
        load_weights(base.replace(strategy="full", init_from=str(w)), cfg)


# --------------------------------------------------------------------------------------------------
# running the grid
# --------------------------------------------------------------------------------------------------
def result_row(spec: RunSpec, checkpoint: str, repeat: int, final: dict[str, Any]) -> dict[str, Any]:
    """The ``finetune`` table row of one finished run (test-split metrics)."""
    pretrain_run_id, size = None, spec.size
    if spec.init_from:
        try:
            _, info = ckpt.load_exported(spec.init_from)
            pre = info.get("spec") or {}
            pretrain_run_id = RunSpec.from_dict(pre).run_id if pre else None
            size = pre.get("size", size)
        except (ckpt.CheckpointError, ValueError, TypeError):
            pass
    metrics = TASK_METRICS[spec.task_type]
    row = {"run_id": spec.run_id, "study": spec.study, "pretrain_run_id": pretrain_run_id, "checkpoint": checkpoint,
           "family": spec.family, "size": size, "task": spec.target, "task_type": spec.task_type,
           "strategy": spec.strategy, "method": METHOD_NAMES[spec.strategy], "repeat": repeat, "seed": spec.seed,
           "metric": metrics[0], "value": float(final.get(f"test_{metrics[0]}", float("nan"))),
           "n_params": final.get("n_params"), "n_trainable": final.get("n_trainable"),
           "trainable_frac": final.get("trainable_frac"), "n_test_subjects": final.get("test_n_subjects"),
           "steps": final.get("step"), "wall_time_s": final.get("wall_time_s")}
    for m in metrics:
        row[m] = float(final.get(f"test_{m}", float("nan")))
        row[f"val_{m}"] = float(final.get(f"val_{m}", float("nan")))
    row.update(spec.flat_columns())
    return row


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address`` or ``$RAY_ADDRESS``) or start a local one (loopback only):
    :func:`study.runner.connect_ray`, unless this process is already connected."""
    import ray

    from study.runner import connect_ray as _connect

    if not ray.is_initialized():
        _connect(address, num_cpus, Path(__file__).resolve().parents[1])


def _run_in_process(spec: RunSpec, run_dir: Path, ctx) -> dict[str, Any]:
    from study.reporters import JSONLReporter
    from study.train import train

    reporter = JSONLReporter(run_dir / "metrics.jsonl")
    try:
        resume = ckpt.latest_checkpoint(run_dir / "checkpoints")
        return train(spec, ctx, reporter, run_dir=run_dir, resume_from=resume).final_metrics
    finally:
        reporter.close()


def _run_on_ray(spec: RunSpec, storage: Path, *, num_workers: int, cpus_per_worker: float, device: str | None
                ) -> dict[str, Any]:
    """One fine-tuning run as a Ray Train ``TorchTrainer`` (``study.launch_ray.fit_run``); its last report."""
    from study.launch_ray import fit_run

    result = fit_run(spec, storage=str(storage), num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                     use_gpu=device == "cuda", device=device)
    if result.error is not None:
        raise RuntimeError(f"fine-tuning run {spec.run_id} failed under Ray Train: {result.error}")
    return dict(result.metrics or {})


def run_grid(cells: Sequence[tuple[RunSpec, str, int]], *, study_dir: Path, ctx=None, progress: bool = True,
             ray_workers: int = 0, cpus_per_worker: float = 1.0, device: str | None = None) -> pd.DataFrame:
    """Run every cell not yet in the store and return the ``finetune`` table.

    ``ray_workers == 0`` runs each cell in this process (context ``ctx``); ``ray_workers = N`` runs each
    as a Ray Train job with ``N`` workers (connect first with :func:`connect_ray`).
    """
    from analysis.store import ResultsStore

    store = ResultsStore(study_dir / "store")
    done = set(store.read(TABLE)["run_id"]) if store.parts(TABLE) else set()
    todo = [c for c in cells if c[0].run_id not in done]
    bar = tqdm(todo, desc="fine-tune runs", disable=not progress)
    for spec, label, repeat in bar:
        bar.set_postfix_str(f"{spec.target}/{spec.strategy}/{label}/r{repeat}")
        if ray_workers:
            final = _run_on_ray(spec, study_dir / "ray", num_workers=ray_workers, cpus_per_worker=cpus_per_worker,
                                device=device)
        else:
            final = _run_in_process(spec, study_dir / "runs" / spec.run_id, ctx)
        store.append(TABLE, [result_row(spec, label, repeat, final)])
    df = store.read(TABLE)
    ids = {c[0].run_id for c in cells}
    return df[df["run_id"].isin(ids)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# the seed's Table 2
# --------------------------------------------------------------------------------------------------
def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1) and count per (method, checkpoint, task) with the % change vs From scratch.

    Returns one row per cell: ``method, strategy, checkpoint, task, metric, mean, std, n, pct_change, cell``.
    """
    rows = []
    several = df.loc[df["strategy"] != "scratch", "checkpoint"].nunique() > 1
    for (strategy, checkpoint, task, metric), g in df.groupby(["strategy", "checkpoint", "task", "metric"],
                                                               sort=False):
        v = g["value"].astype("float64").to_numpy()
        rows.append({"method": METHOD_NAMES[strategy] + (f" [{checkpoint}]" if several and checkpoint != "scratch" else ""),
                     "strategy": strategy, "checkpoint": checkpoint, "task": task, "metric": metric,
                     "mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                     "std": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan"),
                     "n": int(len(v))})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    scratch = out[out["strategy"] == "scratch"].set_index("task")["mean"].to_dict()
    pct = []
    for r in out.itertuples():
        s = scratch.get(r.task)
        pct.append(float("nan") if r.strategy == "scratch" or s is None or not s else 100.0 * (r.mean - s) / abs(s))
    out["pct_change"] = pct
    out["cell"] = [_cell(r.mean, r.std, r.pct_change) for r in out.itertuples()]
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return out.sort_values(["strategy", "checkpoint"], key=lambda c: c.map(order) if c.name == "strategy" else c,
                           kind="stable").reset_index(drop=True)


def _cell(mean: float, std: float, pct: float) -> str:
    s = f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"
    if np.isfinite(pct):
        s += f" ({abs(pct):.2f}%{'↑' if pct > 0 else '↓' if pct < 0 else ''})"
    return s


def table_markdown(summary: pd.DataFrame, *, title: str = "Downstream performance (test split, per subject)"
                   ) -> str:
    """The seed's Table 2 layout: rows = methods, columns = tasks, the best method per task in bold."""
    if summary.empty:
        return f"**{title}**\n\n(no results)\n"
    tasks = list(dict.fromkeys(summary["task"]))
    metric_of = summary.drop_duplicates("task").set_index("task")["metric"].to_dict()
    best = {}
    for t in tasks:
        sub = summary[(summary["task"] == t) & summary["mean"].notna()]
        if not sub.empty:
            best[t] = (sub["mean"].idxmax() if HIGHER_IS_BETTER[metric_of[t]] else sub["mean"].idxmin())
    head = ["Method"] + [f"{t} ({metric_of[t].upper()} {'↑' if HIGHER_IS_BETTER[metric_of[t]] else '↓'})"
                         for t in tasks]
    lines = [f"**{title}.** Mean ± std over repeats; % change vs From scratch in parentheses.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(summary["method"]):
        cells = [method]
        for t in tasks:
            sel = summary[(summary["method"] == method) & (summary["task"] == t)]
            if sel.empty:
                cells.append("-")
                continue
            text = sel["cell"].iloc[0]
            cells.append(f"**{text}**" if best.get(t) == sel.index[0] else text)
        lines.append("| " + " | ".join(cells) + " |")
    n = summary["n"].max()
    lines += ["", f"Repeats per cell: {n}. Trainable fraction per method is in the `finetune` table."]
    return "\n".join(lines) + "\n"


def all_metrics_markdown(df: pd.DataFrame) -> str:
    """Every per-subject metric (``auroc``, ``bacc``, ``mae``, ``pearson_r``) as ``mean ± std`` per method and task."""
    cols = []
    for task in dict.fromkeys(df["task"]):
        ttype = df.loc[df["task"] == task, "task_type"].iloc[0] if "task_type" in df else None
        for m in TASK_METRICS.get(ttype, ()):
            if m in df:
                cols.append((task, m))
    if not cols:
        return ""
    lines = ["All test metrics (mean ± std over repeats):", "",
             "| Method | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for method, g in df.groupby("method", sort=False):
        cells = []
        for t, m in cols:
            v = g.loc[g["task"] == t, m].astype("float64").to_numpy()
            v = v[np.isfinite(v)]
            cells.append("-" if not v.size else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1
                         else f"{v.mean():.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, study_dir: Path) -> tuple[Path, Path, pd.DataFrame]:
    summary = summarize(df)
    md = study_dir / "finetune_table.md"
    pq = study_dir / "finetune_table.parquet"
    frac = df.groupby("method")["trainable_frac"].mean().to_dict() if "trainable_frac" in df else {}
    text = table_markdown(summary)
    if frac:
        text += "\n| Method | trainable fraction |\n|---|---|\n" + "".join(
            f"| {m} | {f:.1%} |\n" for m, f in frac.items())
    text += "\n" + all_metrics_markdown(df)
    md.write_text(text)
    summary.to_parquet(pq, index=False)
    return md, pq, summary


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.cli_args import DeprecatedAlias, HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--storage", default="studies",
                    help="root folder of studies: outputs go to <storage>/<study-name>/")
    ap.add_argument("--study-name", default="finetune",
                    help="name of the study (a plain name: letters, digits, . _ -)")
    ap.add_argument("--manifest", default=None,
                    help="cohort manifest (Parquet); default: a synthetic cohort in "
                         "<storage>/<study-name>/cohort")
    ap.add_argument("--weights", nargs="*", default=None,
                    help="exported weights (.safetensors); default: pre-train the debug SwiFT v2 first")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                    help="downstream tasks as <label column>:<classification|regression>")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                    help="fine-tuning strategies (scratch: no pre-trained weights)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell (seeds seed, seed+1, ...)")
    ap.add_argument("--steps", type=int, default=None,
                    help="fine-tuning steps per run (default: 150, --quick: 20)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="steps of the default pre-training (default: 300, --quick: 30)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: runs on a 2-core CPU in a few minutes")
    ap.add_argument("--spec-json", default=None, help="JSON object of RunSpec fields overriding the defaults")
    ap.add_argument("--device", default=None, choices=["cuda", "xpu", "cpu"],
                    help="device of in-process runs (default: the best available)")
    ap.add_argument("--ray", type=int, default=0, metavar="WORKERS",
                    help="run each fine-tuning run as a Ray Train job with this many workers (0: in this process)")
    ap.add_argument("--address", default=None,
                    help="with --ray: Ray cluster address (default: $RAY_ADDRESS, else an embedded "
                         "local Ray)")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="with --ray: CPUs of the embedded local Ray (default: all)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # old spellings (before issue #28 aligned the entry points), hidden
    ap.add_argument("--study", dest="study_name", action=DeprecatedAlias, new="--study-name")
    ap.add_argument("--ray-address", dest="address", action=DeprecatedAlias, new="--address")
    ap.add_argument("--ray-cpus", dest="num_cpus", type=int, action=DeprecatedAlias, new="--num-cpus")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.devices import context_from_env

    try:
        tasks = parse_tasks(args.tasks)
        overrides = json.loads(args.spec_json) if args.spec_json else {}
        if not isinstance(overrides, dict):
            raise ValueError("--spec-json must be a JSON object of RunSpec fields")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # the spec must describe a buildable model before anything is written or generated
        from study.train import model_config

        model_config(base_spec("", quick=args.quick, overrides={"study": args.study_name, **overrides}))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from study.runner import confined
    from study.spec import check_name

    try:
        check_name("--study-name", args.study_name)
        study_dir = confined(Path(args.storage), args.study_name)  # a plain name that stays under --storage
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the study folder under --storage {args.storage}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = context_from_env(args.device)
    t0 = time.perf_counter()
    if args.manifest is None:
        args.manifest = (ensure_cohort(study_dir / "cohort_quick") if args.quick else
                         ensure_cohort(study_dir / "cohort", n_subjects=80, n_frames=32))
    manifest = str(Path(args.manifest).resolve())
    if args.steps is not None:
        overrides["budget"] = args.steps
        overrides.setdefault("budget_kind", "steps")
    try:
        base = base_spec(manifest, quick=args.quick, overrides={"study": args.study_name, **overrides})
        needs = any(s != "scratch" for s in args.strategies)
        weights = [str(Path(w).resolve()) for w in (args.weights or [])]
        if needs and weights:
            check_weights(base, weights)  # a weights file of another model fails before anything runs
        if not Path(manifest).is_file():
            raise ValueError(f"manifest {args.manifest} does not exist")
        from study.preflight import check_specs

        # every subject file the pre-training (if any) and the fine-tuning runs read, before any run starts
        check_specs([base, base.replace(task="pretrain", target=None)], manifest)
        if needs and not weights:
            steps = args.pretrain_steps or (30 if args.quick else 300)
            print(f"pre-training {base.family}/{base.size} for {steps} steps ...", flush=True)
            weights = [str(pretrain_and_export(base, study_dir / "pretrained", steps=steps, ctx=ctx))]
        cells = grid_specs(base, tasks, args.strategies, weights, args.repeats)
        if needs:
            check_weights(base, weights)
    except (ValueError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpw = 1.0
    if args.ray:
        import ray

        connect_ray(args.address, args.num_cpus)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        cpw = max(0.1, min(8.0, math.floor(90 * cpus / args.ray) / 100))  # leave room for the driver
    df = run_grid(cells, study_dir=study_dir.resolve(), ctx=ctx, progress=not args.no_progress, ray_workers=args.ray,
                  cpus_per_worker=cpw, device=args.device)
    md, pq, _ = write_tables(df, study_dir)
    print(md.read_text())
    print(f"wrote {md} and {pq} ({len(df)} runs, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
