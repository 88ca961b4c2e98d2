"""µTransfer study: LR sweeps across widths under SP and muP, then the transfer analysis.

Does a learning rate tuned on a small model transfer to a big one? Under muP (``mup`` package: MuReadout,
1/d attention, MuAdamW, base shapes from ``--base-width``) the optimal LR should stay put as the width
grows; under standard parametrization it drifts (typically down). The study trains every
(parametrization, width, LR) cell as a Ray Tune trial, then fits, per width, a quadratic of the final
validation loss in log2 LR around the best point (``analysis.mutransfer``), and the slope of
log2 LR* against log2 width with a 95% interval, SP and muP side by side, plus a plot.

Laptop / CI (tiny SwiFT v2 widths on the synthetic cohort; a few minutes on 2 CPU cores)::

    python study/mutransfer.py --quick

On a cluster::

    ray job submit --working-dir . -- python study/mutransfer.py --family swift_v2 --size 51M \\
        --widths 96 192 384 768 --manifest /lus/.../manifest.parquet --storage /lus/.../studies --gpus-per-trial 4
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python study/mutransfer.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from typing import Any, Sequence

from study.lr_transfer import TRANSFER_FILE, TransferredLR, pooled_base_lr
from study.plans import StudyPlan
from study.spec import RunSpec


def plan_mutransfer(*, family: str, size: str, widths: Sequence[int], lrs: Sequence[float], base_width: int,
                    steps: int, opts: Any = None, grid=(24, 24, 24), sequence_length: int = 8, batch_size: int = 4,
                    parametrizations: Sequence[str] = ("sp", "mup"), use_gpu: bool = False,
                    num_workers: int = 1, seeds: Sequence[int] = (0,), eval_windows: int = 8) -> StudyPlan:
    """Every (parametrization, width, LR, seed) run of the sweep."""
    if len(set(widths)) < 4:
        raise ValueError(f"widths={list(widths)}: µTransfer needs at least 4 distinct widths")
    if len(set(lrs)) < 3:
        raise ValueError(f"lrs={list(lrs)}: the quadratic fit of loss in log2 LR needs at least 3 LRs")
    base = RunSpec(study=getattr(opts, "study_name", None) or "mutransfer", family=family, size=size,
                   grid=tuple(grid), sequence_length=sequence_length, batch_size=batch_size, budget_kind="steps",
                   budget=steps, schedule="constant", warmup_frac=0.1, eval_every=steps, eval_windows=eval_windows,
                   checkpoint_every=0, manifest=getattr(opts, "manifest", None) or "", precision="auto",
                   mup_base_width=base_width)
    if not list(seeds):
        raise ValueError("seeds: at least one seed is needed")
    specs = [base.replace(parametrization=p, width=w, lr=float(lr), seed=int(seed))
             for p in parametrizations for w in widths for lr in lrs for seed in seeds]
    return StudyPlan(name="mutransfer", specs=specs, num_workers=num_workers, use_gpu=use_gpu,
                     description="LR x width sweep under SP and muP",
                     cohort={"n_subjects": 24, "grid": tuple(grid), "n_frames": 16, "seed": 0})


def analyse(store_dir: Path, out_dir: Path, specs: Sequence[RunSpec]) -> dict[str, Any]:
    """Optimal LR per width and the transfer slope per parametrization; writes a plot and a summary."""
    import matplotlib

    matplotlib.use("Agg")
    from analysis.mutransfer import lr_transfer
    from analysis.plots import plot_lr_transfer
    from analysis.report import final_rows
    from analysis.store import read_table

    df = final_rows(read_table(store_dir, "train"))
    df = df[df["run_id"].isin({s.run_id for s in specs})].copy()
    # the run's base LR, never a per-step optimizer LR (under MuAdamW a param group's LR is base / width mult)
    df["base_lr"] = df["run_id"].map({s.run_id: s.lr for s in specs})
    per_width, slopes = lr_transfer(df, lr_col="base_lr", loss_col="val_loss", width_col="width",
                                    param_col="parametrization")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = plot_lr_transfer(df, per_width, lr_col="base_lr", loss_col="val_loss", width_col="width", slopes=slopes)
    fig.savefig(out_dir / "mutransfer.png", dpi=120)
    per_width.to_csv(out_dir / "optimal_lr_per_width.csv", index=False)
    slopes.to_csv(out_dir / "lr_transfer_slopes.csv", index=False)
    md = ["# µTransfer", "", *verdict_lines(slopes, min(s.width for s in specs)), "",
          "Optimal LR per width (quadratic in log2 LR around the best point):", "",
          per_width.to_markdown(index=False), "", "Slope of log2 LR* against log2 width (95% interval):", "",
          slopes.to_markdown(index=False), ""]
    out = {"per_width": per_width.to_dict("records"), "slopes": slopes.to_dict("records"),
           "plot": str(out_dir / "mutransfer.png")}
    art = transfer_artifact(per_width, slopes, specs, lrs=sorted({s.lr for s in specs}))
    if art is not None:
        path = art.write(out_dir / TRANSFER_FILE)
        md += ["Transferred base LR (consume with `study/scaling_law.py --lr-from <this study>`):", "",
               f"- {art.describe()}", *[f"- warning: {w}" for w in art.warnings], f"- written to {path}", ""]
        out["transfer"] = art.to_dict()
    (out_dir / "mutransfer.md").write_text("\n".join(md))
    return {**out, "markdown": "\n".join(md)}


def verdict_lines(slopes, base_width: int) -> list[str]:
    """One plain sentence per parametrization: does its optimal LR drift with width, and can we tell?"""
    out = []
    for r in slopes.to_dict("records"):
        par, b, lo, hi = str(r["parametrization"]).upper().replace("MUP", "muP"), r["slope"], r["lo"], r["hi"]
        iv = f"slope {b:+.2f} log2-LR per log2-width, 95% [{lo:+.2f}, {hi:+.2f}]"
        if r.get("valid") is False:
            out.append(f"- **{par}: inconclusive** ({iv}): " + "; ".join(map(str, r.get("warnings") or [])))
        elif r.get("transfers"):
            out.append(f"- **{par}: the optimal LR does not drift with width** ({iv}): an LR tuned at width "
                       f"{base_width} transfers to the wider models.")
        else:
            out.append(f"- **{par}: the optimal LR drifts with width** ({iv}): an LR tuned at width {base_width} "
                       f"is {'too large' if b < 0 else 'too small'} for the wider models; it does not transfer.")
    return out


def transfer_artifact(per_width, slopes, specs: Sequence[RunSpec], *, lrs: Sequence[float]) -> TransferredLR | None:
    """The muP result as a :class:`~study.lr_transfer.TransferredLR`, or None without muP runs."""
    mup = per_width[per_width["parametrization"] == "mup"] if len(per_width) else per_width
    srow = slopes[slopes["parametrization"] == "mup"] if len(slopes) else slopes
    if len(mup) < 2 or not len(srow):
        return None
    srow = srow.iloc[0]
    lr, lo, hi = pooled_base_lr(mup["log2_lr_opt"])
    sp = slopes[slopes["parametrization"] == "sp"]
    first = next(s for s in specs if s.parametrization == "mup")
    warnings = [str(w) for w in (srow.get("warnings") if isinstance(srow.get("warnings"), (list, tuple)) else [])]
    lo_grid, hi_grid = min(lrs), max(lrs)
    for r in mup.itertuples():
        if not r.interior or r.best_lr in (lo_grid, hi_grid):
            warnings.append(f"width {int(r.width)}: the best LR {r.best_lr:.3g} is at the edge of the grid or the "
                            f"fitted optimum {r.lr_opt:.3g} lies outside the points fitted; widen --lrs")
    return TransferredLR(family=first.family, size=first.size, base_width=int(first.mup_base_width),
                         base_lr=lr, lr_lo=lo, lr_hi=hi, widths=tuple(int(w) for w in sorted(mup["width"])),
                         slope=float(srow["slope"]), slope_lo=float(srow["lo"]), slope_hi=float(srow["hi"]),
                         sp_slope=float(sp["slope"].iloc[0]) if len(sp) else None, study=first.study,
                         warnings=tuple(warnings))


#: ``--quick``: the smallest sweep that shows the physics on 2 CPU cores (docs/LOG.md, 2026-12-06): widths
#: 16-128 (3 doublings, so SP's drift spans octaves), 40 steps (at 20 SP's wide runs barely leave the
#: initial loss at any LR, and the optimum is noise), 7 LRs one octave apart that bracket every optimum (with
#: 2^-10..2^-4, seed 1's muP optimum at width 32 sat on the grid's edge and the verdict was inconclusive)
QUICK = dict(widths=[16, 32, 64, 128], lrs=[2.0 ** e for e in range(-9, -2)], steps=40)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.cli_args import HelpFormatter, set_study_name
    from study.runner import add_common_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(ap)
    set_study_name(ap, "mutransfer")
    ap.add_argument("--family", default="swift_v2", help="model family whose width is swept")
    ap.add_argument("--size", default="debug", help="named size of the family; only its width changes")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="widths (embed dims) to sweep, at least 4; default 16 32 64 128")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="base LRs of the grid; default 2^-12 .. 2^-3 one octave apart (--quick: 2^-9 .. 2^-3)")
    ap.add_argument("--base-width", type=int, default=None, help="muP base width (default: the smallest width)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (--quick: 40)")
    ap.add_argument("--seeds", type=int, default=1, help="repeats per (parametrization, width, LR); losses are averaged")
    ap.add_argument("--grid", type=int, default=24, help="spatial size of the synthetic cohort's volumes")
    ap.add_argument("--sequence-length", type=int, default=8, help="frames per training window")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch in windows")
    ap.add_argument("--eval-windows", type=int, default=8, help="validation windows behind each final loss")
    ap.add_argument("--gpus-per-trial", type=int, default=0, help="GPUs per run (0: CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="the 2-CPU demonstration: widths 16-128, LRs 2^-9..2^-3, 40 steps, SP and muP "
                         "(56 runs, about 5 minutes)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.runner import fail, run_plan

    widths = args.widths or QUICK["widths"]
    lrs = args.lrs or (QUICK["lrs"] if args.quick else [2.0 ** e for e in range(-12, -2)])
    steps = QUICK["steps"] if args.quick and args.steps == 100 else args.steps
    try:
        plan = plan_mutransfer(family=args.family, size=args.size, widths=widths, lrs=lrs,
                               base_width=args.base_width or min(widths), steps=steps, opts=args,
                               grid=(args.grid,) * 3, sequence_length=args.sequence_length,
                               batch_size=args.batch_size, use_gpu=args.gpus_per_trial > 0,
                               num_workers=max(1, args.gpus_per_trial), seeds=range(args.seeds),
                               eval_windows=args.eval_windows)
        plan.validate()
        from study.runner import check_plan

        check_plan(plan, args)  # every subject file the runs read, before any trial starts
        run = run_plan(plan, args, repo_root=Path(__file__).resolve().parent.parent)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        return fail(str(exc))
    if not args.no_report:
        summary = analyse(run.store_dir, run.study_dir / "report", run.specs)
        print(summary["markdown"])
        print(f"plot: {summary['plot']}")
        (run.study_dir / "report" / "mutransfer.json").write_text(json.dumps(summary, indent=1, default=str))
    return 1 if run.remaining and not run.stop_file.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
