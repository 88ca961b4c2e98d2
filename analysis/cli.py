"""Command line: fit any table of runs (CSV, TSV or Parquet), not only the results store.

Examples::

    python -m analysis fit chinchilla runs.csv --params N --tokens D --loss L [--json]
    python -m analysis fit chinchilla runs.csv --params N --flops C --loss L      # D = C / (6 N)
    python -m analysis fit power runs.csv --x C --loss L
    python -m analysis fit isoflop runs.csv --flops C --params N --loss L [--drop-bad-budgets] [--bootstrap 200]
    python -m analysis fit chinchilla runs.csv --params N --tokens D --loss L --shared-exponent --objective lsq \
        --predict 1.4e9:9e11,6.9e9:1.38e11 --json                                    # Gadre et al. 2024
    python -m analysis fit data-constrained runs.csv --params N --tokens D --unique U --loss L \
        --base A,B,E,alpha,beta --json                                               # Muennighoff et al. 2023
    python -m analysis fit power optima.csv --x C --y n_opt --weights w --loglog --json  # Porian et al. 2024
    python -m analysis mutransfer sweep.csv --lr lr --loss val_loss --width width --param parametrization
    python -m analysis rank results.csv --config config --task task --value value --subset no_ukb=ADHD,sex
    python -m analysis efficiency scaling.csv --units nodes --throughput samples_per_s --baseline 1 --baseline 64
    python -m analysis summarize <store_dir> <out_dir>
    python -m analysis predictions <store_dir> [<store_dir> ...] [--out DIR] [--json]   # pre-registered vs outcome
    python -m analysis diversity <store_dir> [--out DIR] [--loss val_loss] [--strict]  # the law per data mixture

Every fit reports ``valid`` and ``warnings`` (see :mod:`analysis.validity`); ``--strict`` turns a fit
that is not a valid law into exit status 3.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.fits import FitError, bootstrap_fit, compute_optimal, extrapolation_check, fit_form, fit_isoflop
from analysis.forms import FORMS, cli_commands, form_for_cli
from analysis.objective import OBJECTIVES

__all__ = ["main", "read_any", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_NOT_VALID"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_NOT_VALID = 0, 2, 3
EXIT_CODES = """exit status:
  0  success (a fit that is not a valid law is still reported, with valid: False and its warnings)
  2  bad input or a fit that could not be done (the message says why, on stderr)
  3  --strict and the result is not a valid law (see its warnings)"""


def read_any(path: str) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet file (or a Parquet directory) into a DataFrame."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file")
    if p.is_dir() or p.suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    if p.suffix in (".tsv", ".tab"):
        return pd.read_csv(p, sep="\t")
    return pd.read_csv(p)


def _col(df: pd.DataFrame, name: str, path: str) -> np.ndarray:
    if name is None:
        raise ValueError("a column argument is missing (see --help)")
    if name not in df.columns:
        raise ValueError(f"{path}: column {name!r} not found; columns are {list(df.columns)}")
    v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    return v


def _emit(obj: dict, table: pd.DataFrame | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    else:
        for k, v in obj.items():
            if not isinstance(v, (dict, list)):
                print(f"{k}: {v}")
        if "exponent_ci" in obj:
            lo, hi = obj["exponent_ci"]
            print(f"exponent interval ({100 * obj.get('level', 0.95):g}%, {obj.get('interval_method', 't')}): "
                  f"[{lo:.6g}, {hi:.6g}]")
        if obj.get("bootstrap_attempted"):
            print(f"bootstrap: {obj.get('n_bootstrap_failed', 0)} of {obj['bootstrap_attempted']} replicates failed "
                  f"({100 * obj.get('bootstrap_failed_fraction', 0.0):.1f}%)")
        if table is not None:
            print(table.to_string(float_format=lambda x: f"{x:.6g}"))
        for k, v in obj.items():
            if k in ("params", "intervals", "vertices", "table", "ranking"):
                continue  # already shown as the table
            if k == "warnings":
                continue  # printed last
            if isinstance(v, list) and v and isinstance(v[0], dict):
                print(f"\n{k}:")
                print(pd.DataFrame(v).to_string(float_format=lambda x: f"{x:.6g}"))
            elif isinstance(v, dict):
                print(f"\n{k}:")
                for kk, vv in v.items():
                    print(f"  {kk}: {vv}")
        _print_verdict(obj)


def _print_verdict(obj: dict) -> None:
    """Text output: say plainly whether the result is a law, then one line per warning."""
    if "valid" not in obj:
        return
    if obj["valid"]:
        print("\nvalid law: yes (no warning)")
    else:
        print("\nNOT A VALID LAW:")
        for w in obj.get("warnings", []):
            print(f"  warning: {w}")


def _with_extrapolation(out: dict) -> dict:
    """The command's verdict covers the extrapolation check too (its warnings prefixed)."""
    e = out.get("extrapolation")
    if e is not None and not e["valid"]:
        out["warnings"] = list(out["warnings"]) + [f"extrapolation: {w}" for w in e["warnings"]]
        out["valid"] = False
    return out


def _exit(valid: bool, strict: bool) -> int:
    return EXIT_NOT_VALID if strict and not valid else EXIT_OK


def _parse_points(text: str, variables) -> list[tuple[float, ...]]:
    """``"N:D,N:D"`` -> [(N, D), ...] (one value per variable of the form, ``:``-separated)."""
    pts = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        vals = item.split(":")
        if len(vals) != len(variables):
            raise ValueError(f"--predict {item!r}: expected {':'.join(variables)} (one value per variable)")
        pts.append(tuple(float(v) for v in vals))
    if not pts:
        raise ValueError(f"--predict {text!r}: no point given")
    return pts


def _fit(args) -> int:
    df = read_any(args.file)
    if args.form == "isoflop":
        return _fit_isoflop(args, df)
    cls = form_for_cli(args.form, {c.flag: bool(getattr(args, c.flag, False)) for c in FORMS.values() if c.flag})
    form = cls.from_cli(args)
    if form.target == "L" and not args.loss:
        raise ValueError(f"fit {args.form} needs --loss COLUMN")
    data = form.cli_data(lambda name: _col(df, name, args.file), args)
    grid = None if args.grid_step == 1 else {k: np.asarray(v)[::args.grid_step] for k, v in form.grid.items()}
    kw = dict(objective=args.objective, delta=args.delta, reduction=args.reduction, grid=grid)
    fit = fit_form(form, data, **kw)
    if args.bootstrap:
        bootstrap_fit(fit, args.bootstrap, seed=args.seed)
    out = fit.to_dict(args.level)
    table = fit.intervals(args.level) if args.bootstrap else pd.DataFrame({"estimate": fit.params})
    if args.budgets:
        co = compute_optimal(fit, [float(b) for b in args.budgets], flops_per_param_token=args.flops_per_param_token,
                             level=args.level)
        out["compute_optimal"] = co.to_dict(orient="records")
    if args.predict:
        pts = _parse_points(args.predict, form.variables)
        pred = fit.predict(*[np.array(v) for v in zip(*pts)])
        out["predictions"] = [{**dict(zip(form.variables, p)), form.target: float(y)} for p, y in zip(pts, pred)]
    if args.holdout:
        out["extrapolation"] = extrapolation_check(form, data, n_holdout=args.holdout,
                                                   flops_per_param_token=args.flops_per_param_token, **kw)
    out = _with_extrapolation(out)
    _emit(out, table, args.json)
    return _exit(out["valid"], args.strict)


def _fit_isoflop(args, df) -> int:
    """Approach 2 (a procedure over budgets, not a registry form: its law is the loglog form of the vertices)."""
    if not args.flops:
        raise ValueError("fit isoflop needs --flops C (the IsoFLOP budget of each run)")
    size_col = args.params or args.tokens
    if not size_col:
        raise ValueError("fit isoflop needs --params N (or --tokens D) as the size variable")
    res = fit_isoflop(_col(df, args.flops, args.file), _col(df, size_col, args.file), _col(df, args.loss, args.file),
                      variable=size_col, weighted=args.weighted, n_boot=args.bootstrap, seed=args.seed,
                      level=args.level, drop_bad_budgets=args.drop_bad_budgets)
    out = res.to_dict()
    table = res.vertices[["C", "n_runs", "opt", "L_min", "curvature", "inside"]]
    _emit(out, table, args.json)
    return _exit(out["valid"], args.strict)


def _mutransfer(args) -> int:
    from analysis.mutransfer import lr_transfer

    df = read_any(args.file)
    per, slopes = lr_transfer(df, lr_col=args.lr, loss_col=args.loss, width_col=args.width, param_col=args.param,
                              window=args.window)
    if args.plot:
        from analysis.plots import plot_lr_transfer
        plot_lr_transfer(df, per, lr_col=args.lr, loss_col=args.loss, width_col=args.width,
                         param_col=args.param, slopes=slopes).savefig(args.plot, dpi=120)
    valid = bool(slopes["valid"].all()) if len(slopes) else False
    if args.json:
        _emit(dict(per_width=per.to_dict(orient="records"), slopes=slopes.to_dict(orient="records"), valid=valid),
              None, True)
    else:
        print(per.to_string()); print(); print(slopes.drop(columns=["warnings"], errors="ignore").to_string())
        for r in slopes.itertuples():
            print(f"\n{r.parametrization}: " + ("verdict trustworthy (no warning)" if r.valid else "VERDICT NOT TRUSTWORTHY:"))
            for w in r.warnings:
                print(f"  warning: {w}")
    return _exit(valid, args.strict)


def _rank(args) -> int:
    from analysis.ranking import rank_configs

    df = read_any(args.file)
    for c in (args.config, args.task, args.value):
        if c not in df.columns:
            raise ValueError(f"{args.file}: column {c!r} not found; columns are {list(df.columns)}")
    wide = df.pivot_table(index=args.config, columns=args.task, values=args.value, aggfunc="mean", dropna=False)
    directions = dict(d.split("=", 1) for d in args.direction)
    subsets = {s.split("=", 1)[0]: s.split("=", 1)[1].split(",") for s in args.subset} or None
    if subsets is not None and "all" not in subsets:
        subsets = {"all": list(wide.columns), **subsets}
    res = rank_configs(wide, directions=directions, subsets=subsets, missing=args.missing)
    cols = [c for c in res.columns if not c.startswith("z__")]
    _emit(dict(ranking=res[cols].reset_index().to_dict(orient="records")), res[cols], args.json)
    return 0


def _efficiency(args) -> int:
    from analysis.efficiency import scaling_table

    df = read_any(args.file)
    t = scaling_table(_col(df, args.units, args.file), _col(df, args.throughput, args.file),
                      baselines=[float(b) for b in args.baseline] or None, mode=args.mode)
    if args.plot:
        from analysis.plots import plot_scaling
        plot_scaling(t).savefig(args.plot, dpi=120)
    _emit(dict(table=t.to_dict(orient="records")), t, args.json)
    return 0


def _summarize(args) -> int:
    from analysis.report import summarize_study

    s = summarize_study(args.store, args.out, n_boot=args.bootstrap)
    print(json.dumps(s, indent=2) if args.json else (Path(args.out) / "summary.md").read_text())
    return 0


def _predictions(args) -> int:
    from analysis.predictions import markdown, report

    table, cal = report(args.stores, args.out)
    if args.json:
        print(json.dumps(dict(calibration=cal, predictions=json.loads(table.to_json(orient="records"))
                              if len(table) else []), indent=2, default=str))
    else:
        print(markdown(table, cal))
    return 0


def _diversity(args) -> int:
    from analysis.diversity import markdown, report

    out = Path(args.out) if args.out else Path(args.store).resolve().parent / "report" / "diversity"
    res = report(args.store, out, loss_col=args.loss, n_boot=args.bootstrap, seed=args.seed)
    if args.json:
        _emit({k: v for k, v in res.items() if k != "points"}, None, True)
    else:
        print(markdown(res))
        print(f"report: {res['files']['markdown']}\nplot: {res['files']['plot']}")
    return _exit(all(m["valid"] for m in res["mixtures"]), args.strict)


def _names_default(help_text: str | None) -> bool:
    """The help text already says its default (``... (default: X)``, ``default: X``)."""
    return any(k in (help_text or "") for k in ("(default", "default:"))


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written and every option's default (none for None, a flag's False, an empty list)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or (isinstance(d, list) and not d) or _names_default(action.help):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    raw = _Help
    p = argparse.ArgumentParser(prog="python -m analysis", description="NeuroX scaling-law analysis",
                                epilog=EXIT_CODES, formatter_class=raw)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit a scaling law to a table of runs", epilog=EXIT_CODES, formatter_class=raw,
                       description="Fit a scaling law; the output says whether it is a valid law (valid, warnings).")
    f.add_argument("form", choices=cli_commands() + ["isoflop"],
                   help="the law (forms from the registry, analysis.forms.FORMS) or approach 2 (isoflop)")
    f.add_argument("file", help="table of runs (CSV or Parquet), one row per run")
    for cls in FORMS.values():  # one flag per registered variant of a command
        if cls.flag:
            f.add_argument("--" + cls.flag.replace("_", "-"), dest=cls.flag, action="store_true",
                           help=f"fit {cls.command}: {cls.title} ({cls.paper}; {cls.recipe})")
    f.add_argument("--objective", choices=list(OBJECTIVES), default=None,
                   help="what is minimized (default: the form's; huber for approach 3, lsq with --shared-exponent): "
                        + "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    f.add_argument("--params", help="column with parameter counts N")
    f.add_argument("--tokens", help="column with training tokens D")
    f.add_argument("--flops", help="column with compute C (chinchilla: D = C / (6 N); isoflop: the budget)")
    f.add_argument("--x", help="column of the variable of the one-variable law")
    f.add_argument("--y", help="power --loglog: column of the quantity fitted as y = k x^a (default: --loss)")
    f.add_argument("--weights", help="power --loglog: column of per-point weights (Porian: 1/std^2)")
    f.add_argument("--unique", help="data-constrained: column with unique tokens U")
    f.add_argument("--base", help="data-constrained: the frozen base law A,B,E,alpha,beta")
    f.add_argument("--predict", help="predict at points N:D[,N:D...] (one value per variable of the form)")
    f.add_argument("--loss", help="column with the loss (every form but power --loglog)")
    f.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates (0: none)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    f.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    f.add_argument("--delta", type=float, default=1e-3, help="Huber delta on the log residual")
    f.add_argument("--reduction", choices=["sum", "mean"], default="sum",
                   help="how the per-point objective terms are combined")
    f.add_argument("--grid-step", type=int, default=1, help="use every k-th grid value per axis (1: full grid)")
    f.add_argument("--budgets", nargs="*", default=[], help="compute budgets for the compute-optimal table")
    f.add_argument("--holdout", type=int, default=0, help="hold out the k largest budgets and report the error")
    f.add_argument("--flops-per-param-token", type=float, default=6.0,
                   help="training FLOPs per parameter and token (C = k N D) for the compute-optimal table")
    f.add_argument("--weighted", action="store_true", help="isoflop: weight the power law by runs per budget")
    f.add_argument("--drop-bad-budgets", action="store_true",
                   help="isoflop: leave out (and name) budgets without an interior minimum instead of failing")
    f.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    f.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the fit (or its --holdout extrapolation) is not a valid law")
    f.set_defaults(func=_fit)
    m = sub.add_parser("mutransfer", help="optimal LR per width and its drift (SP vs muP)", epilog=EXIT_CODES,
                       formatter_class=raw)
    m.add_argument("file", help="table of final losses (CSV or Parquet), one row per (width, LR) run")
    m.add_argument("--lr", default="lr", help="column with the (base) learning rate")
    m.add_argument("--loss", default="val_loss", help="column with the loss to minimize")
    m.add_argument("--width", default="width", help="column with the model width")
    m.add_argument("--param", default="parametrization", help="column with the parametrization (sp, mup)")
    m.add_argument("--window", type=int, default=2,
                   help="LR grid points each side of the best one used by the quadratic fit in log2 LR")
    m.add_argument("--plot", help="write the LR-vs-loss plot to this file (PNG, PDF, ...)")
    m.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    m.add_argument("--strict", action="store_true",
                   help="exit with status 3 when a parametrization's transfer verdict is not trustworthy")
    m.set_defaults(func=_mutransfer)
    r = sub.add_parser("rank", help="rank configurations by summed z-scores (long table: config, task, value)",
                       formatter_class=raw)
    r.add_argument("file", help="long table (CSV or Parquet): one row per (configuration, task)")
    r.add_argument("--config", default="config", help="column naming the configuration")
    r.add_argument("--task", default="task", help="column naming the task (metric)")
    r.add_argument("--value", default="value", help="column with the metric's value")
    r.add_argument("--direction", action="append", default=[], help="TASK=max|min (repeatable)")
    r.add_argument("--subset", action="append", default=[], help="NAME=task1,task2 (repeatable)")
    r.add_argument("--missing", default="drop_config", choices=["drop_config", "skip", "drop_task", "error"],
                   help="configurations missing a task of a subset: drop_config leaves them unranked there "
                        "(the seed's #N/A)")
    r.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    r.set_defaults(func=_rank)
    e = sub.add_parser("efficiency", help="strong/weak scaling efficiency table", formatter_class=raw)
    e.add_argument("file", help="table of measurements (CSV or Parquet): units and throughput per row")
    e.add_argument("--units", default="nodes", help="column with the unit count (nodes, GPUs, ...)")
    e.add_argument("--throughput", default="throughput", help="column with the measured throughput")
    e.add_argument("--baseline", action="append", default=[],
                   help="unit count to compare against (repeatable; default: the smallest count)")
    e.add_argument("--mode", default="strong", choices=["strong", "weak"],
                   help="strong (fixed total work) or weak (fixed work per unit) scaling")
    e.add_argument("--plot", help="write the efficiency plot to this file (PNG, PDF, ...)")
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    e.set_defaults(func=_efficiency)
    s = sub.add_parser("summarize", help="fits, plots and a report of a results store", formatter_class=raw)
    s.add_argument("store", help="results store folder (<storage>/<study-name>/store)")
    s.add_argument("out", help="folder for the report (summary.md, plots, tables)")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of each fit")
    s.add_argument("--json", action="store_true", help="print the summary as JSON instead of Markdown")
    s.set_defaults(func=_summarize)
    pr = sub.add_parser("predictions", formatter_class=raw,
                        help="pre-registered predictions against outcomes, and calibration across studies",
                        description="Join each store's pre-registered predictions (table 'predictions', first row "
                                    "per run id, SHA-256 checked) with the runs' final val_loss; calibration: how "
                                    "often the interval held, over rows with an outcome, a matching hash and a "
                                    "prediction written before the run started (analysis/predictions.py).")
    pr.add_argument("stores", nargs="+", help="results store folders (<storage>/<study-name>/store)")
    pr.add_argument("--out", default=None, help="also write predictions.md/.json/.csv/.png to this folder")
    pr.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    pr.set_defaults(func=_predictions)
    dv = sub.add_parser("diversity", formatter_class=raw, epilog=EXIT_CODES,
                        help="the study report's law per data mixture, side by side (python -m study.diversity)",
                        description="Split a store's runs by data mixture (the train table's 'mixture' column) and "
                                    "run the study report on each: validity and warnings, exponents with bootstrap "
                                    "intervals, the held-out extrapolation error; a table (diversity.md/.json), one "
                                    "plot panel per mixture (diversity.png) and each mixture's full report "
                                    "(analysis/diversity.py).")
    dv.add_argument("store", help="results store folder (<storage>/<study-name>/store) with two or more mixtures")
    dv.add_argument("--out", default=None,
                    help="folder for the report (default: <storage>/<study-name>/report/diversity)")
    dv.add_argument("--loss", default="val_loss",
                    help="loss column (val_loss: every cohort's validation windows; val_loss__<cohort>: one cohort's)")
    dv.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of each fit")
    dv.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    dv.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    dv.add_argument("--strict", action="store_true", help="exit with status 3 when a mixture's result is not valid")
    dv.set_defaults(func=_diversity)
    return p


def main(argv=None) -> int:
    """Entry point of ``python -m analysis``; returns the exit status: 0, 2 on bad input (with the
    message), 3 with ``--strict`` when the result is not a valid law."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
