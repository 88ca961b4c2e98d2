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
                    num_workers: int = 1) -> StudyPlan:
    """Every (parametrization, width, LR) run of the sweep."""
    if len(set(widths)) < 4:
        raise ValueError(f"widths={list(widths)}: µTransfer needs at least 4 distinct widths")
    if len(set(lrs)) < 3:
        raise ValueError(f"lrs={list(lrs)}: the quadratic fit of loss in log2 LR needs at least 3 LRs")
    base = RunSpec(study=getattr(opts, "study_name", None) or "mutransfer", family=family, size=size,
                   grid=tuple(grid), sequence_length=sequence_length, batch_size=batch_size, budget_kind="steps",
                   budget=steps, schedule="constant", warmup_frac=0.1, eval_every=steps, eval_windows=8,
                   checkpoint_every=0, manifest=getattr(opts, "manifest", None) or "", precision="auto",
                   mup_base_width=base_width)
    specs = [base.replace(parametrization=p, width=w, lr=float(lr))
             for p in parametrizations for w in widths for lr in lrs]
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
    fig = plot_lr_transfer(df, per_width, lr_col="base_lr", loss_col="val_loss", width_col="width")
    fig.savefig(out_dir / "mutransfer.png", dpi=120)
    per_width.to_csv(out_dir / "optimal_lr_per_width.csv", index=False)
    slopes.to_csv(out_dir / "lr_transfer_slopes.csv", index=False)
    md = ["# µTransfer", "", "Optimal LR per width (quadratic in log2 LR around the best point):", "",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from study.runner import add_common_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--family", default="swift_v2")
    ap.add_argument("--size", default="debug")
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="default: 2^-12 .. 2^-5")
    ap.add_argument("--base-width", type=int, default=None, help="muP base width (default: the smallest width)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--sequence-length", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpus-per-trial", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5 LRs x 4 widths x {SP, muP}, 20 steps")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from study.runner import fail, run_plan

    lrs = args.lrs or [2.0 ** e for e in range(-12, -4)]
    steps = args.steps
    if args.quick:
        lrs = args.lrs or [2.0 ** e for e in (-11, -9, -7, -5, -3)]
        steps = 20
    try:
        plan = plan_mutransfer(family=args.family, size=args.size, widths=args.widths, lrs=lrs,
                               base_width=args.base_width or min(args.widths), steps=steps, opts=args,
                               grid=(args.grid,) * 3, sequence_length=args.sequence_length,
                               batch_size=args.batch_size, use_gpu=args.gpus_per_trial > 0,
                               num_workers=max(1, args.gpus_per_trial))
        plan.validate()
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
