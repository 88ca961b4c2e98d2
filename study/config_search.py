"""Config search: the seed's Table 1 — vary each pre-training factor, fine-tune, rank by z-normalized sum.

From a default pre-training configuration, each of eight factors is varied on its own (one run per
value): input scaling (ISM), mask patch size (MPS), mask ratio (MR), mask type (MT), patch size (PS),
overlap between segments (SBS = ``stride_between``), sequence length (SL) and frame stride within a
segment (SWS). Every configuration is pre-trained (Ray Tune trials, the same machinery as the scaling
study), its final checkpoint exported, then fine-tuned on the downstream task suite (plus a "From
scratch" row); per-subject test metrics feed ``analysis.ranking.rank_configs``: each task's metric is
z-normalized across configurations with its direction (AUROC up, MAE down), summed and ranked.

Laptop / CI (debug SwiFT v2 on a 24^3 synthetic cohort, planted ``trait_bin`` / ``trait_cont`` tasks)::

    python study/config_search.py --quick

On a cluster, pass ``--manifest``, ``--size 51M --grid 96 --sequence-length 20`` and real tasks with
``--tasks label:classification ...``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python study/config_search.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from typing import Any, Sequence

from study.plans import StudyPlan
from study.spec import RunSpec

def factor_variants(grid: int, seq: int) -> dict[str, dict[str, Any]]:
    """``label -> RunSpec changes`` for every single-factor variant (labels follow the seed's names)."""
    v: dict[str, dict[str, Any]] = {}
    for s in ("minmax", "znorm_zeroback", "robust"):
        v[f"ISM_{s}"] = {"scaling": s}
    for mps in ((6, 6, 6, 2), (12, 12, 12, 4), (24, 24, 24, 2)):
        if mps[0] <= grid:
            v["MPS_" + "_".join(map(str, mps))] = {"model_overrides": {"mask_patch_size": mps}}
    for r in (0.2, 0.4, 0.9):
        v[f"MR_{str(r).replace('.', 'p')}"] = {"model_overrides": {"mask_ratio": r}}
    for t in ("tube", "temporal"):
        v[f"MT_{t}"] = {"model_overrides": {"masking_type": t}}
    for ps in ((6, 6, 6, 1), (12, 12, 12, 2)):
        v["PS_" + "_".join(map(str, ps))] = {"model_overrides": {"patch_size": ps,
                                                                 "mask_patch_size": (2 * ps[0],) * 3 + (ps[3] * 2,)}}
    for sb in (0.5, 0.75):
        v[f"SBS_{str(sb).replace('.', 'p')}"] = {"stride_between": sb}
    for sl in (seq // 2, seq * 2):
        v[f"SL_{sl}"] = {"sequence_length": sl}
    for sw in (2, 3):
        v[f"SWS_{sw}"] = {"stride_within": sw}
    return v


def default_config(manifest: str, *, grid: int, seq: int, steps: int, study: str, size: str = "debug") -> RunSpec:
    """The default pre-training configuration (mask ratio 0.6, 12x12x12x2 mask cells, random masks)."""
    return RunSpec(study=study, family="swift_v2", size=size, grid=(grid,) * 3, sequence_length=seq, batch_size=4,
                   lr=2e-3, budget_kind="steps", budget=steps, eval_every=steps, eval_windows=8, checkpoint_every=0,
                   scaling="znorm_minback", precision="auto", manifest=manifest,
                   model_overrides={"patch_size": (6, 6, 6, 2), "mask_patch_size": (12, 12, 12, 2),
                                    "mask_ratio": 0.6, "masking_type": "random"})


def plan_config_search(opts: Any, *, grid: int, seq: int, steps: int, size: str = "debug") -> tuple[StudyPlan, dict]:
    """The pre-training plan and a map ``label -> spec`` (``default`` first)."""
    study = getattr(opts, "study_name", None) or "config-search"
    base = default_config(getattr(opts, "manifest", None) or "", grid=grid, seq=seq, steps=steps, study=study,
                          size=size)
    labels = {"default": base}
    for label, change in factor_variants(grid, seq).items():
        ch = dict(change)
        if "model_overrides" in ch:
            ch["model_overrides"] = {**dict(base.model_overrides), **ch["model_overrides"]}
        labels[label] = base.replace(**ch)
    from study.run_math import model_config

    for label, s in list(labels.items()):
        try:
            model_config(s)  # drop variants the tiny grid cannot express, with the reason
        except ValueError as exc:
            print(f"skipping {label}: {exc}", file=sys.stderr)
            del labels[label]
    plan = StudyPlan(name="config-search", specs=list(labels.values()), description="seed Table 1",
                     cohort={"n_subjects": 40, "grid": (grid,) * 3, "n_frames": 32, "seed": 0,
                             "fractions": (0.5, 0.2, 0.3)})
    return plan, labels


def latest_run_checkpoint(train_storage: Path, run_id: str) -> Path:
    """The newest complete checkpoint of ``run_id``, whichever trial launcher wrote it (inline trials keep
    theirs in the run's own directory, Ray Train persists ``checkpoint_*`` copies)."""
    from study import checkpoint as ckpt

    found = ckpt.resume_point(train_storage / run_id)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint of {run_id} under {train_storage / run_id}")
    return found


def export_all(run, labels: dict[str, RunSpec], out_dir: Path) -> dict[str, Path]:
    from study import checkpoint as ckpt
    from study.run_math import model_config

    out = {}
    by_id = {s.run_id: s for s in run.specs}  # study and manifest path do not enter run ids
    for label, s in labels.items():
        spec = by_id[s.run_id]
        f = out_dir / f"{label}.safetensors"
        if not f.exists():
            c = latest_run_checkpoint(run.study_dir / "runs", spec.run_id)
            ckpt.export_weights(c, f, model_config=model_config(spec), spec_json=spec.to_json(),
                                mup_base_width=spec.mup_base_width)
        out[label] = f
    return out


def rank(df, labels: Sequence[str], subsets: dict[str, list[str]] | None = None):
    """Wide table (config x task metric) from the finetune rows and the seed's ranking."""
    import pandas as pd

    from analysis.ranking import rank_configs

    rows = []
    for (ckpt_label, target, metric), g in df.groupby(["checkpoint", "task", "metric"]):
        rows.append({"config": "From_scratch" if ckpt_label == "scratch" else ckpt_label,
                     "task": f"{target}/{metric}", "value": g["value"].mean()})
    wide = pd.DataFrame(rows).pivot(index="config", columns="task", values="value")
    ranked = rank_configs(wide, subsets=subsets)
    return wide, ranked


def write_report(df, fc, labels: Sequence[str], out: Path) -> str:
    """``config_ranking.{csv,md,json}`` under ``out``: the ranking (seed Table 1 layout) with the FC baseline as an
    unranked row (``FC_baseline``: it is not a pre-training configuration), then every configuration's and the FC
    baseline's mean [95% t interval] per task, and the gains over From scratch and the FC baseline with paired
    intervals (``study.finetune.gains_table``). ``fc``: the FC rows (``study.finetune.fc_rows``) or None."""
    import pandas as pd

    from study.finetune import gains_markdown, gains_table, summarize
    from study.size_task_report import intervals_markdown

    wide, ranked = rank(df, list(labels))
    out.mkdir(parents=True, exist_ok=True)
    table = wide.join(ranked[[c for c in ranked.columns if c.startswith(("score__", "rank__"))]])
    table = table.sort_values([c for c in table.columns if c.startswith("rank__")][0])
    full = df
    if fc is not None and len(fc):
        full = pd.concat([df, fc], ignore_index=True)
        means = fc.groupby(["task", "metric"])["value"].mean()
        table.loc["FC_baseline"] = {f"{t}/{m}": v for (t, m), v in means.items()}
    table.to_csv(out / "config_ranking.csv")
    md = ("# Config search (seed Table 1 layout)\n\n" + table.to_markdown(floatfmt=".4g") + "\n\n"
          + ("FC_baseline: the functional-connectivity baseline (not ranked: not a pre-training configuration).\n\n"
             if full is not df else "(no FC baseline row: it could not be fitted)\n\n"))
    md += "## Every configuration with the FC baseline\n\n" + intervals_markdown(full, title=(
        "Mean over repeats [95% t interval]")) + "\n"
    gains = gains_table(full, summarize(full))
    if not gains.empty:
        md += gains_markdown(gains)
    (out / "config_ranking.md").write_text(md)
    (out / "config_ranking.json").write_text(json.dumps(table.reset_index().to_dict("records"), default=str))
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.runner import add_common_args

    from study.cli_args import HelpFormatter, set_study_name
    from study.spec import STRATEGIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(ap)
    set_study_name(ap, "config-search")
    ap.add_argument("--size", default="debug", help="named SwiFT v2 size of every configuration (e.g. debug, 51M)")
    ap.add_argument("--grid", type=int, default=24, help="spatial size of the model grid (and of the synthetic cohort)")
    ap.add_argument("--sequence-length", type=int, default=8,
                    help="frames per window (the SL variants halve and double it)")
    ap.add_argument("--pretrain-steps", type=int, default=60, help="pre-training steps per configuration (--quick: 12)")
    ap.add_argument("--finetune-steps", type=int, default=60, help="fine-tuning steps per run (--quick: 12)")
    ap.add_argument("--tasks", nargs="+", default=["trait_bin:classification", "trait_cont:regression"],
                    help="downstream tasks as <label column>:<classification|regression>")
    ap.add_argument("--strategy", default="last_block", choices=[s for s in STRATEGIES if s != "scratch"],
                    help="how each configuration's checkpoint is fine-tuned (From scratch is always added)")
    ap.add_argument("--repeats", type=int, default=3, help="fine-tuning runs per (configuration, task) (--quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="12 pre-training and 12 fine-tuning steps, 1 repeat: the 2-CPU demonstration")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.runner import fail, run_plan

    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.repeats = 12, 12, 1
    try:
        from study.finetune import parse_tasks

        tasks = parse_tasks(args.tasks)
        plan, labels = plan_config_search(args, grid=args.grid, seq=args.sequence_length,
                                          steps=args.pretrain_steps, size=args.size)
        from study.runner import check_plan

        # every subject file the pre-training runs and the fine-tuning runs after them read, before any trial
        check_plan(plan, args, [s.replace(task="finetune", target=t, task_type=tt)
                                for s in labels.values() for t, tt in tasks])
        run = run_plan(plan, args, repo_root=Path(__file__).resolve().parent.parent)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    if run.bad_data_stop:  # the runner's last words named the file(s) and the command that quarantines them
        return 1
    if run.remaining:
        print(f"{len(run.remaining)} pre-training run(s) unfinished; rerun to continue", file=sys.stderr)
        return 1
    from study.devices import local_context
    from study.finetune import BadDataStopped, bad_data_summary, grid_specs, run_grid

    weights = export_all(run, labels, run.study_dir / "weights")
    manifest = run.specs[0].manifest
    cells = []
    for label, spec in labels.items():
        ft_base = spec.replace(task="finetune", target=tasks[0][0], task_type=tasks[0][1], study=run.name,
                               manifest=manifest, budget=args.finetune_steps,
                               eval_every=args.finetune_steps, lr=1e-3, batch_size=8,
                               bad_data=args.bad_data or spec.bad_data)
        strategies = [args.strategy] + (["scratch"] if label == "default" else [])
        cells += grid_specs(ft_base, tasks, strategies, [str(weights[label])], args.repeats)
    t_finetune = time.time()
    try:  # the fine-tuning runs share the study's bad-data policy and quarantine list with its pre-training
        df = run_grid(cells, study_dir=run.study_dir / "finetune", ctx=local_context(), quarantine_dir=run.store_dir)
    except BadDataStopped as exc:
        print("\n".join(bad_data_summary(exc, run.store_dir, manifest, since=t_finetune)), file=sys.stderr)
        print("no ranking: the study stopped on bad data; it is written when the study finishes", file=sys.stderr)
        return 1
    try:  # the FC baseline: a row of every fine-tuning report (issue #27), fitted on the same manifest and splits
        from study.finetune import fc_rows

        fc = fc_rows(manifest, tasks, args.repeats, run.study_dir / "finetune")
    except (ValueError, OSError) as exc:
        print(f"warning: no FC baseline row: {exc}", file=sys.stderr)
        fc = None
    md = write_report(df, fc, list(labels), run.study_dir / "report")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
