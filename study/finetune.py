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

Why one file of ~650 lines: the CLI, the grid of (task, strategy, checkpoint, repeat) runs, the FC baseline rows
and the Table-2 writer share one row schema (the store's ``finetune`` table); the training itself lives in
:mod:`study.finetune_engine` and the statistics in :mod:`analysis`.
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

from analysis.fc import STRATEGY as FC_STRATEGY
from analysis.fc import below_chance, paired_gain
from study import checkpoint as ckpt
from study.metrics import HIGHER_IS_BETTER, TASK_METRICS, parse_tasks  # noqa: F401 (parse_tasks: its former home)
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
#: Planted-effect multiplier of the default study's cohorts: at 1 (the generator's default) ``trait_bin`` is not
#: learnable from 16-frame runs even by the FC baseline (test AUROC 0.49 ± 0.02); at 2 the FC baseline reaches
#: AUROC ~0.9 and MAE ~0.3 (chance 1.0) on 60 subjects: a ceiling a model can be measured against (data/README.md).
STUDY_TRAIT_SCALE = 2.0


def ensure_cohort(root: Path, *, n_subjects: int = 60, n_frames: int = 16, trait_scale: float = STUDY_TRAIT_SCALE
                  ) -> str:
    """A synthetic cohort (24^3 grid) with a large downstream test split (30% of subjects)."""
    from data.synthetic import generate_cohort

    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest)
    return str(generate_cohort(root, n_subjects=n_subjects, grid=(24, 24, 24), n_frames=n_frames, seed=0,
                               progress=True, fractions=(0.5, 0.2, 0.3), trait_scale=trait_scale))


def pretrain_and_export(base: RunSpec, out_dir: Path, *, steps: int, ctx, quarantine=None) -> Path:
    """Pre-train ``base``'s model (MIM / next-token) on the train split for ``steps`` steps; export its weights.

    The pre-training run takes the architecture and input fields of ``base`` (family, size, width, grid,
    sequence length, overrides, parametrization, manifest) so its weights fit the fine-tuning runs.
    """
    from study.run_math import model_config
    from study.train import train

    arch = {k: getattr(base, k) for k in ("family", "size", "width", "grid", "sequence_length", "model_overrides",
                                          "parametrization", "mup_base_width", "manifest", "scaling")}
    spec = RunSpec(task="pretrain", batch_size=8, budget=steps, eval_every=max(1, steps), lr=2e-3,
                   study="finetune-pretrain", precision="auto", bad_data=base.bad_data, **arch)
    out = out_dir / f"{spec.run_id}.safetensors"
    if out.exists():
        return out
    run_dir = out_dir / spec.run_id
    resume = ckpt.latest_checkpoint(run_dir / "checkpoints")
    result = train(spec, ctx, None, run_dir=run_dir, resume_from=resume, quarantine=quarantine)
    return ckpt.export_weights(result.last_checkpoint, out, model_config=model_config(spec), spec_json=spec.to_json(),
                               mup_base_width=spec.mup_base_width)


def check_weights(base: RunSpec, weights: Sequence[str]) -> None:
    """Every weights file fits ``base``'s model (else :class:`study.checkpoint.CheckpointError`), before any run."""
    from study.finetune_engine import load_weights
    from study.run_math import model_config

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
    :func:`study.sweep.connect_ray`, unless this process is already connected (Ray is imported by the launch and
    sweep modules only)."""
    from study.sweep import connect_ray as _connect, ray_connected

    if not ray_connected():
        _connect(address, num_cpus, Path(__file__).resolve().parents[1])


def _run_in_process(spec: RunSpec, run_dir: Path, ctx, quarantine=None) -> dict[str, Any]:
    from study.reporters import JSONLReporter
    from study.train import train

    reporter = JSONLReporter(run_dir / "metrics.jsonl")
    try:
        resume = ckpt.latest_checkpoint(run_dir / "checkpoints")
        return train(spec, ctx, reporter, run_dir=run_dir, resume_from=resume, quarantine=quarantine).final_metrics
    finally:
        reporter.close()


def _run_on_ray(spec: RunSpec, storage: Path, *, num_workers: int, cpus_per_worker: float, device: str | None,
                store_dir: Path | None = None) -> dict[str, Any]:
    """One fine-tuning run as a Ray Train ``TorchTrainer`` (``study.launch_ray.fit_run``); its last report.

    With ``store_dir`` (the study's results store) the workers read and write the study's quarantine list
    (``study.launch_ray.quarantine_of``) and append their evaluation rows to its ``finetune_steps`` table."""
    from study.launch_ray import fit_run
    from study.run_env import RunEnv

    result = fit_run(spec, RunEnv(storage=str(storage), device=device,
                                  store_dir=str(store_dir) if store_dir is not None else None),
                     num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=device == "cuda")
    if result.error is not None:
        if "BadDataError" in str(result.error):
            raise BadDataStopped(spec.run_id, _bad_data_line(str(result.error)))
        raise RuntimeError(f"fine-tuning run {spec.run_id} failed under Ray Train: {result.error}")
    return dict(result.metrics or {})


class BadDataStopped(RuntimeError):
    """A fine-tuning run met an unusable subject file (``bad_data="stop"``, or a val/test window under either
    policy): :func:`run_grid` starts no further run. ``not_run``: the runs of the grid left unstarted."""

    def __init__(self, run_id: str, cause: str, not_run: int = 0) -> None:
        super().__init__(f"fine-tuning run {run_id} stopped on bad data: {cause}")
        self.run_id, self.cause, self.not_run = run_id, cause, not_run


def _bad_data_line(error: str) -> str:
    """The last ``BadDataError`` line of a (possibly wrapped) error text."""
    lines = [ln.strip() for ln in error.splitlines() if "BadDataError" in ln]
    return lines[-1] if lines else error.strip().splitlines()[-1]


def bad_data_summary(exc: BadDataStopped, store_dir: Path, manifest: str, since: float = 0.0) -> list[str]:
    """The one message of a fine-tuning grid stopped on bad data: the file(s) (from the study's quarantine list,
    :mod:`data.quarantine`) with what is wrong, who met them, and what to do (the rerun command that quarantines
    them, or fixing them when they are evaluation files, which cannot be skipped)."""
    from data.quarantine import Quarantine
    from study.runner import rerun_command

    found = [e for e in Quarantine(store_dir).found_since(since) if e.policy == "stop"]
    lines = [f"error: fine-tuning stopped on bad data: run {exc.run_id} met an unusable subject file"
             + (f" ({exc.not_run} other fine-tuning run(s) not started)" if exc.not_run else "") + ":"]
    lines += [f"  {e.path}: {e.what} (met by {e.found_by})" for e in found] or [f"  {exc.cause}"]
    if found and all(e.what.startswith("(validation split)") for e in found):  # study.loop.VAL_BAD_PREFIX
        lines.append(f"  fix or remove them from {manifest} (evaluation files cannot be skipped: every run must be "
                     "scored on the same subjects)")
    else:
        lines.append(f"  fix or remove them from {manifest}, or quarantine them and train without them: "
                     f"{rerun_command('--bad-data', 'skip')}")
    return lines


def run_grid(cells: Sequence[tuple[RunSpec, str, int]], *, study_dir: Path, ctx=None, progress: bool = True,
             ray_workers: int = 0, cpus_per_worker: float = 1.0, device: str | None = None,
             quarantine_dir: Path | None = None) -> pd.DataFrame:
    """Run every cell not yet in the store and return the ``finetune`` table.

    ``ray_workers == 0`` runs each cell in this process (context ``ctx``); ``ray_workers = N`` runs each
    as a Ray Train job with ``N`` workers (connect first with :func:`connect_ray`).

    Bad data (issue #28): every run reads and writes the quarantine list of the store ``quarantine_dir`` (default
    ``<study_dir>/store``; a config search passes its study's store, which pre-training used) and follows its
    spec's ``bad_data``; the first run that fails on a bad file raises :class:`BadDataStopped` and no further run
    starts (a rerun of the command resumes: finished cells are in the store).
    """
    from analysis.store import ResultsStore
    from data.quarantine import Quarantine
    from study.loop import BadDataError

    store = ResultsStore(study_dir / "store")
    qdir = Path(quarantine_dir) if quarantine_dir is not None else study_dir / "store"
    quarantine = Quarantine(qdir)
    done = set(store.read(TABLE)["run_id"]) if store.parts(TABLE) else set()
    todo = [c for c in cells if c[0].run_id not in done]
    bar = tqdm(todo, desc="fine-tune runs", disable=not progress)
    for k, (spec, label, repeat) in enumerate(bar):
        bar.set_postfix_str(f"{spec.target}/{spec.strategy}/{label}/r{repeat}")
        try:
            if ray_workers:
                final = _run_on_ray(spec, study_dir / "ray", num_workers=ray_workers,
                                    cpus_per_worker=cpus_per_worker, device=device, store_dir=qdir)
            else:
                final = _run_in_process(spec, study_dir / "runs" / spec.run_id, ctx, quarantine)
        except BadDataError as exc:
            bar.close()
            raise BadDataStopped(spec.run_id, str(exc), not_run=len(todo) - k - 1) from None
        except BadDataStopped as exc:
            bar.close()
            exc.not_run = len(todo) - k - 1
            raise
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
    several = df.loc[~df["strategy"].isin(["scratch", FC_STRATEGY]), "checkpoint"].nunique() > 1
    for (strategy, checkpoint, task, metric), g in df.groupby(["strategy", "checkpoint", "task", "metric"],
                                                               sort=False):
        v = g["value"].astype("float64").to_numpy()
        name = METHOD_NAMES.get(strategy) or str(g["method"].iloc[0])
        rows.append({"method": name + (f" [{checkpoint}]" if several and checkpoint not in ("scratch", FC_STRATEGY)
                                       else ""),
                     "strategy": strategy, "checkpoint": checkpoint, "task": task, "metric": metric,
                     "mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                     "std": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan"),
                     "n": int(len(v)), "degenerate": degenerate_reason(g)})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    chance = _chance_by_task(df)
    scratch = out[out["strategy"] == "scratch"].set_index("task")["mean"].to_dict()
    pct, notes = [], []
    for r in out.itertuples():
        s = scratch.get(r.task)
        if r.strategy in ("scratch", FC_STRATEGY) or s is None or not s:
            pct.append(float("nan"))
            notes.append("")
        elif below_chance(r.metric, s, chance.get(r.task)):
            pct.append(float("nan"))  # a relative gain over a baseline below chance is not a gain
            notes.append("scratch below chance")
        else:
            pct.append(100.0 * (r.mean - s) / abs(s))
            notes.append("")
    out["pct_change"] = pct
    out["chance"] = [chance.get(t, float("nan")) for t in out["task"]]
    out["cell"] = [_cell(r.mean, r.std, r.pct_change, note, r.degenerate) for r, note in zip(out.itertuples(), notes)]
    order = {s: i for i, s in enumerate((FC_STRATEGY,) + tuple(STRATEGIES))}
    return out.sort_values(["strategy", "checkpoint"], key=lambda c: c.map(order) if c.name == "strategy" else c,
                           kind="stable").reset_index(drop=True)


def _chance_by_task(df: pd.DataFrame) -> dict[str, float]:
    """Chance level of each task's headline metric: 0.5 for AUROC; for MAE, that of predicting the training mean
    (the FC baseline rows carry it; unknown without them)."""
    out = {}
    for task, g in df.groupby("task", sort=False):
        metric = str(g["metric"].iloc[0])
        c = g["chance"].dropna() if "chance" in g else pd.Series(dtype=float)
        out[task] = 0.5 if metric == "auroc" else float(c.iloc[0]) if len(c) else float("nan")
    return out


def degenerate_reason(g: pd.DataFrame) -> str:
    """Why the headline metric of one cell's runs is degenerate, or ``""``.

    FC rows carry ``degenerate`` from their predictions. A fine-tuning run keeps only its metrics, from which a
    constant predictor shows: Pearson r undefined (regression), or AUROC exactly 0.5 with balanced accuracy 0.5.
    """
    if "degenerate" in g and g["degenerate"].fillna("").astype(bool).any():
        return "; ".join(sorted(set(g["degenerate"].fillna("")) - {""}))
    metric = str(g["metric"].iloc[0])
    if metric == "mae" and "pearson_r" in g and g["pearson_r"].isna().any():
        return "constant prediction"
    if metric == "auroc" and {"auroc", "bacc"} <= set(g.columns):
        if ((g["auroc"] == 0.5) & (g["bacc"] == 0.5)).any():
            return "constant prediction"
    return ""


def _cell(mean: float, std: float, pct: float, note: str = "", degenerate: str = "") -> str:
    s = f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"
    if np.isfinite(pct):
        s += f" ({abs(pct):.2f}%{'↑' if pct > 0 else '↓' if pct < 0 else ''})"
    elif note:
        s += f" ({note})"
    return s + (" †" if degenerate else "")


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
    lines = [f"**{title}.** Mean ± std over repeats; % change vs From scratch in parentheses (not printed when "
             "From scratch is below chance); † = degenerate metric (see below).", "",
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
    chance = summary.drop_duplicates("task").set_index("task")["chance"] if "chance" in summary else {}
    known = [f"{t} {metric_of[t].upper()} {chance[t]:.3f}" for t in tasks if t in chance and np.isfinite(chance[t])]
    if known:
        lines.append("Chance (AUROC 0.5; MAE of predicting the training subjects' mean): " + ", ".join(known) + ".")
    deg = summary[summary["degenerate"].astype(bool)] if "degenerate" in summary else summary.iloc[:0]
    for r in deg.itertuples():
        lines.append(f"† {r.method} / {r.task}: {r.degenerate}.")
    return "\n".join(lines) + "\n"


def gains_table(df: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Gain of every method over From scratch and over the FC baseline, per task: the difference of the headline
    metric (method - baseline, paired by repeat index when the repeat counts match), its 95% t interval and
    p-value (``analysis.fc.paired_gain``), and the relative gain in % unless the baseline is below chance.

    Returns one row per (method, task, baseline) with ``diff, lo, hi, p, n, paired, pct, note``.
    """
    rows = []
    chance = _chance_by_task(df)
    for task, t in df.groupby("task", sort=False):
        metric = str(t["metric"].iloc[0])
        for base_strategy, base_name in (("scratch", "From scratch"), (FC_STRATEGY, "FC baseline")):
            b = t[t["strategy"] == base_strategy].sort_values("repeat")
            if b.empty:
                continue
            bv = b["value"].to_numpy(dtype=np.float64)
            base_mean = float(np.nanmean(bv)) if np.isfinite(bv).any() else float("nan")
            low = below_chance(metric, base_mean, chance.get(task))
            for (strategy, checkpoint), g in t.groupby(["strategy", "checkpoint"], sort=False):
                if strategy == base_strategy or strategy == FC_STRATEGY:
                    continue  # (From scratch vs the FC baseline is a row of the FC block)
                method = summary.loc[(summary["strategy"] == strategy) & (summary["checkpoint"] == checkpoint)
                                     & (summary["task"] == task), "method"]
                gain = paired_gain(g.sort_values("repeat")["value"].to_numpy(dtype=np.float64), bv)
                pct = float("nan") if low or not base_mean else 100.0 * gain["diff"] / abs(base_mean)
                better = gain["diff"] > 0 if HIGHER_IS_BETTER[metric] else gain["diff"] < 0
                shown = np.isfinite(gain["lo"]) and (gain["lo"] > 0 or gain["hi"] < 0)
                rows.append({"method": method.iloc[0] if len(method) else strategy, "task": task, "metric": metric,
                             "baseline": base_name, **gain, "pct": pct,
                             "verdict": ("better" if better else "worse") if shown else "no difference shown",
                             "note": f"baseline below chance ({base_mean:.3f})" if low else ""})
    return pd.DataFrame(rows)


def gains_markdown(gains: pd.DataFrame) -> str:
    """The gains as a Markdown table (improvement = higher AUROC / lower MAE; the sign is the raw difference)."""
    if gains.empty:
        return ""
    lines = ["Gains over the baselines (method - baseline, mean over repeats [95% t interval], paired t-test p "
             "where the repeats pair up; % of the baseline unless it is below chance; verdict: better / worse "
             "(for MAE lower is better) when the interval excludes 0):", "",
             "| Method | Task | vs | Δ [95% CI] | p | % | verdict |", "|---|---|---|---|---|---|---|"]
    for r in gains.itertuples():
        ci = f"{r.diff:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]" if np.isfinite(r.lo) else f"{r.diff:+.3f}"
        p = f"{r.p:.3f}" if np.isfinite(r.p) else "-"
        pct = r.note if r.note else f"{r.pct:+.1f}%" if np.isfinite(r.pct) else "-"
        lines.append(f"| {r.method} | {r.task} ({r.metric.upper()}) | {r.baseline} | {ci} | {p} | {pct} | "
                     f"{r.verdict} |")
    return "\n".join(lines) + "\n"


def plot_table(summary: pd.DataFrame, path: Path) -> Path | None:
    """One panel per task: mean ± std of every method (FC baseline hatched), chance as a dashed line."""
    if summary.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        s = summary[summary["task"] == task]
        y = np.arange(len(s))
        colors = ["#888888" if st == FC_STRATEGY else "#c44e52" if st == "scratch" else "#4c72b0"
                  for st in s["strategy"]]
        ax.barh(y, s["mean"], xerr=s["std"].fillna(0), color=colors,
                hatch=None, edgecolor="black", linewidth=0.5)
        ax.set_yticks(y, [m + (" †" if d else "") for m, d in zip(s["method"], s["degenerate"])], fontsize=8)
        ax.invert_yaxis()
        c = s["chance"].iloc[0] if "chance" in s else float("nan")
        if np.isfinite(c):
            ax.axvline(c, ls="--", color="black", lw=1, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        metric = str(s["metric"].iloc[0])
        ax.set_xlabel(f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
        ax.set_title(task, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    one_side = False
    lines = ["All test metrics (mean ± std over repeats):", "",
             "| Method | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for method, g in df.groupby("method", sort=False):
        cells = []
        for t, m in cols:
            v = g.loc[g["task"] == t, m].astype("float64").to_numpy()
            v = v[np.isfinite(v)]
            cell = ("-" if not v.size else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1
                    else f"{v.mean():.3f}")
            if m == "bacc" and v.size and (v == 0.5).all():
                cell += " †"
                one_side = True
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if one_side:
        lines += ["", "† bacc exactly 0.5 in every repeat: every test subject's probability on one side of 0.5 "
                  "(a threshold-degenerate predictor; its AUROC may still rank subjects)."]
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, study_dir: Path) -> tuple[Path, Path, pd.DataFrame]:
    """``finetune_table.md`` (Table 2, gains over scratch and the FC baseline, all metrics),
    ``finetune_table.parquet`` (the summary), ``finetune_gains.parquet`` and ``finetune_plot.png``."""
    summary = summarize(df)
    md = study_dir / "finetune_table.md"
    pq = study_dir / "finetune_table.parquet"
    frac = df.groupby("method")["trainable_frac"].mean().dropna().to_dict() if "trainable_frac" in df else {}
    text = table_markdown(summary)
    if frac:
        text += "\n| Method | trainable fraction |\n|---|---|\n" + "".join(
            f"| {m} | {f:.1%} |\n" for m, f in frac.items())
    gains = gains_table(df, summary) if not summary.empty else pd.DataFrame()
    if not gains.empty:
        text += "\n" + gains_markdown(gains)
        gains.to_parquet(study_dir / "finetune_gains.parquet", index=False)
    text += "\n" + all_metrics_markdown(df)
    md.write_text(text)
    summary.to_parquet(pq, index=False)
    plot_table(summary, study_dir / "finetune_plot.png")
    return md, pq, summary


def fc_rows(manifest: str, tasks: Sequence[tuple[str, str]], repeats: int, study_dir: Path) -> pd.DataFrame:
    """The FC baseline (``study.fc_baseline.run_fc``: ``auto`` atlas, i.e. ``parcellation.npz`` beside the manifest,
    else cubes of the brain mask; Fisher-z correlations,
    logistic / ridge regression fitted on the train split with inner CV) as rows of the ``finetune`` table,
    cached in ``fc_baseline.parquet`` by manifest content hash, tasks and repeats."""
    from analysis.fc import FCConfig
    from study.fc_baseline import run_fc
    from data.manifest import Manifest

    m = Manifest.load(manifest)
    cfg = FCConfig(repeats=repeats)
    key = json.dumps([m.content_hash, [list(t) for t in tasks], repr(cfg), "fc-v1"])
    cache = study_dir / "fc_baseline.parquet"
    if cache.exists():
        old = pd.read_parquet(cache)
        if len(old) and (old["cache_key"] == key).all():
            return old.drop(columns=["cache_key"])
    out = run_fc(m, tasks, cfg)
    out["trainable_frac"] = float("nan")
    out.assign(cache_key=key).to_parquet(cache, index=False)
    return out


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
    from study.cli_args import add_bad_data_arg

    add_bad_data_arg(ap)  # --bad-data stop|skip, as in the other study entry points
    # old spellings (before issue #28 aligned the entry points), hidden
    ap.add_argument("--study", dest="study_name", action=DeprecatedAlias, new="--study-name")
    ap.add_argument("--ray-address", dest="address", action=DeprecatedAlias, new="--address")
    ap.add_argument("--ray-cpus", dest="num_cpus", type=int, action=DeprecatedAlias, new="--num-cpus")
    return ap.parse_args(argv)


def tasks_and_overrides(args: argparse.Namespace) -> tuple[list, dict[str, Any]]:
    """``--tasks`` parsed and ``--spec-json`` as a dict of RunSpec fields, checked the same way by every fine-tuning
    entry point (this one, ``study.size_task``); a ``ValueError`` names what is wrong."""
    tasks = parse_tasks(args.tasks)
    overrides = json.loads(args.spec_json) if args.spec_json else {}
    if not isinstance(overrides, dict):
        raise ValueError("--spec-json must be a JSON object of RunSpec fields")
    return tasks, overrides


def make_study_dir(storage: str | Path, name: str) -> Path:
    """The study's folder: a plain ``--study-name`` that stays under ``--storage``, created; a ``ValueError`` says
    why not (a bad name, or the folder cannot be made)."""
    from study.runner import confined
    from study.spec import check_name

    check_name("--study-name", name)
    try:
        study_dir = confined(Path(storage), name)
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the study folder under --storage {storage}: {exc}") from None
    return study_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.devices import context_from_env

    try:
        tasks, overrides = tasks_and_overrides(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # the spec must describe a buildable model before anything is written or generated
        from study.run_math import model_config

        model_config(base_spec("", quick=args.quick, overrides={"study": args.study_name, **overrides}))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        study_dir = make_study_dir(args.storage, args.study_name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = context_from_env(args.device)
    t0, t0_wall = time.perf_counter(), time.time()
    if args.manifest is None:
        args.manifest = (ensure_cohort(study_dir / "cohort_quick_t2") if args.quick else
                         ensure_cohort(study_dir / "cohort_t2", n_subjects=80, n_frames=32))
    manifest = str(Path(args.manifest).resolve())
    if args.steps is not None:
        overrides["budget"] = args.steps
        overrides.setdefault("budget_kind", "steps")
    if args.bad_data:  # not part of the runs' ids: a rerun with it resumes the same runs
        overrides["bad_data"] = args.bad_data
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
        from data.quarantine import Quarantine

        quarantine = Quarantine(study_dir / "store")
        if base.bad_data == "skip":  # what the pre-flight check found: skipped from the first run on
            from study.preflight import quarantine_found

            quarantine_found(quarantine, manifest)
        if needs and not weights:
            steps = args.pretrain_steps or (30 if args.quick else 300)
            print(f"pre-training {base.family}/{base.size} for {steps} steps ...", flush=True)
            from study.loop import BadDataError

            try:
                weights = [str(pretrain_and_export(base, study_dir / "pretrained", steps=steps, ctx=ctx,
                                                   quarantine=quarantine))]
            except BadDataError as exc:
                stop = BadDataStopped("finetune-pretrain", str(exc), not_run=len(tasks) * len(args.strategies)
                                      * args.repeats)
                print("\n".join(bad_data_summary(stop, study_dir / "store", manifest, since=t0_wall)),
                      file=sys.stderr)
                return 1
        cells = grid_specs(base, tasks, args.strategies, weights, args.repeats)
        if needs:
            check_weights(base, weights)
    except (ValueError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpw = 1.0
    if args.ray:
        from study.sweep import cluster_cpus

        connect_ray(args.address, args.num_cpus)
        cpus = cluster_cpus()
        cpw = max(0.1, min(8.0, math.floor(90 * cpus / args.ray) / 100))  # leave room for the driver
    try:
        df = run_grid(cells, study_dir=study_dir.resolve(), ctx=ctx, progress=not args.no_progress,
                      ray_workers=args.ray, cpus_per_worker=cpw, device=args.device)
    except BadDataStopped as exc:
        print("\n".join(bad_data_summary(exc, study_dir.resolve() / "store", manifest, since=t0_wall)), file=sys.stderr)
        print("no table: the study stopped on bad data; it is written when the study finishes", file=sys.stderr)
        return 1
    try:  # the FC baseline: a row of every table (cheap: parcel series + linear models)
        df = pd.concat([df, fc_rows(manifest, tasks, args.repeats, study_dir)], ignore_index=True)
    except (ValueError, OSError) as exc:
        print(f"warning: no FC baseline row: {exc}", file=sys.stderr)
    md, pq, _ = write_tables(df, study_dir)
    print(md.read_text())
    print(f"wrote {md} and {pq} ({len(df)} runs, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
