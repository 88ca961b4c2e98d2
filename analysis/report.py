"""End-of-study summary: fits, plots and a Markdown/JSON report from a results store.

The study runner calls :func:`summarize_study` once a study has finished::

    from analysis.report import summarize_study
    summary = summarize_study("runs/my_study/store", "runs/my_study/report")
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.fits import (FORMS, FitError, bootstrap_fit, compute_optimal, extrapolation_validity, fit_chinchilla,
                           fit_isoflop, fit_power_law, pareto_frontier)
from analysis.store import read_table

__all__ = ["final_rows", "summarize_study"]


def final_rows(df: pd.DataFrame, *, run_col: str = "run_id", step_col: str = "step") -> pd.DataFrame:
    """The last evaluation row of every run (rows flagged ``is_final`` first, else the largest step)."""
    if df.empty:
        return df
    for c in (run_col, step_col):
        if c not in df.columns:
            raise ValueError(f"train table has no {c!r} column; columns are {list(df.columns)}")
    d = df
    if "is_final" in d.columns:
        flag = d["is_final"].fillna(False).astype(bool)
        finished = d.loc[flag, run_col].unique()
        d = pd.concat([d[flag], d[~d[run_col].isin(finished)]])
    return d.sort_values([run_col, step_col]).groupby(run_col, as_index=False).tail(1).reset_index(drop=True)


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def summarize_study(store_dir, out_dir, *, loss_col: str = "val_loss", compute_col: str = "flops",
                    params_col: str = "n_params", data_col: str = "tokens_seen", n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Fit and plot a finished study: ``L(C)`` on the compute frontier and, when possible, approach 3.

    Parameters
    ----------
    store_dir : str or Path
        The study's results store (``<storage>/<study>/store``); its ``train`` table is read.
    out_dir : str or Path
        Where ``summary.json``, ``summary.md`` and the PNG plots are written (created if needed).
    loss_col, compute_col, params_col, data_col : str
        Columns of the train table used as loss, compute (FLOPs), parameters and tokens.
    n_boot : int
        Bootstrap replicates (seeded by ``seed``) for the intervals.
    level : float
        Interval level.

    Returns
    -------
    dict
        ``n_runs, n_final_points, power_law`` (parameters, intervals, ``exponent_excludes_zero``,
        ``frontier_points``), ``extrapolation`` (relative error predicting the largest run from the
        others), ``chinchilla`` (approach 3 with intervals and compute-optimal allocations, or the
        reason it was skipped; an allocation that cannot be computed gives ``compute_optimal_error``),
        ``isoflop`` (approach 2 over the planned FLOP budgets, when the table has ``budget`` and
        ``budget_kind``), ``plots`` (file names), ``errors`` and ``warnings``. Each fitted part
        carries ``valid`` and ``warnings`` (:mod:`analysis.validity`); the top-level ``warnings``
        repeats them all, prefixed with the part's key. Parts that cannot be fitted carry an
        ``error`` message instead of numbers.

    Raises
    ------
    ValueError
        If the train table is empty or lacks the loss or compute column.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = read_table(store_dir, "train")
    if df.empty:
        raise ValueError(f"results store {store_dir}: the 'train' table is empty or missing")
    for c in (loss_col, compute_col):
        if c not in df.columns:
            raise ValueError(f"results store {store_dir}: train table has no {c!r} column; columns are {list(df.columns)}")
    # the final row of a run is its last row with a usable loss and compute (train-only log rows
    # without a validation loss are skipped); runs without any usable row are counted as dropped
    lv = pd.to_numeric(df[loss_col], errors="coerce"); cv = pd.to_numeric(df[compute_col], errors="coerce")
    ok = (np.isfinite(lv) & (lv > 0) & np.isfinite(cv) & (cv > 0)).to_numpy()
    n_runs = int(df["run_id"].nunique()) if "run_id" in df.columns else 0
    fin = final_rows(df[ok].reset_index(drop=True)) if ok.any() else df.iloc[:0]
    summary: dict = dict(store=str(store_dir), n_runs=n_runs, n_final_points=int(len(fin)),
                         n_dropped=n_runs - int(len(fin)), level=level, n_boot=n_boot, plots=[], errors=[],
                         warnings=[])
    fin = fin.reset_index(drop=True)
    C = fin[compute_col].to_numpy(float); L = fin[loss_col].to_numpy(float)

    # -- one-variable law on the compute frontier
    power = None
    front = pareto_frontier(C, L) if len(C) else np.array([], int)
    try:
        use = front if len(front) >= 4 and len(np.unique(C[front])) >= 3 else np.arange(len(C))
        power = bootstrap_fit(fit_power_law(C[use], L[use]), n_boot, seed=seed)
        d = power.to_dict(level)
        d["frontier_points"] = int(len(front))
        d["fitted_on"] = "frontier" if len(use) == len(front) else "all final runs (frontier too small)"
        d["exponent_excludes_zero"] = bool(d["intervals"]["alpha"]["lo"] > 0 or d["intervals"]["alpha"]["hi"] < 0)
        summary["power_law"] = d
    except (FitError, ValueError) as exc:
        summary["power_law"] = dict(error=str(exc))
        summary["errors"].append(f"power law: {exc}")

    # -- extrapolation: predict the best loss at the largest budget from the smaller budgets
    try:
        # the largest budget: runs within 25% of the top compute (IsoFLOP runs of one budget differ by
        # step rounding, a few %); budgets of a study are spaced wider than that
        top = C >= C.max() / 1.25
        rest = np.nonzero(~top)[0]
        if len(rest) < 4:
            raise FitError(f"needs at least 4 runs below the largest budget to fit, got {len(rest)}")
        fr = rest[pareto_frontier(C[rest], L[rest])]
        use = fr if len(fr) >= 4 and len(np.unique(C[fr])) >= 3 else rest
        f = fit_power_law(C[use], L[use])
        big = np.nonzero(top)[0][np.argmin(L[top])]
        pred = float(f.predict([C[big]])[0])
        rel = (pred - L[big]) / L[big]
        summary["extrapolation"] = dict(run_id=str(fin["run_id"].iloc[big]), compute=float(C[big]), actual=float(L[big]),
                                        predicted=pred, rel_error=rel, n_fit=int(len(use)),
                                        fitted_on="frontier" if len(use) == len(fr) else "all smaller runs",
                                        **extrapolation_validity(rel, f).to_dict())
    except (FitError, ValueError) as exc:
        summary["extrapolation"] = dict(error=str(exc))

    # -- approach 3 when the study varied both size and data
    chin = None
    if params_col in fin.columns and data_col in fin.columns:
        N = pd.to_numeric(fin[params_col], errors="coerce").to_numpy(float)
        D = pd.to_numeric(fin[data_col], errors="coerce").to_numpy(float)
        good = np.isfinite(N) & np.isfinite(D) & (N > 0) & (D > 0)
        nN, nD = len(np.unique(N[good])), len(np.unique(D[good]))
        if nN >= 3 and nD >= 3 and good.sum() >= 8:
            try:
                chin = bootstrap_fit(fit_chinchilla(N[good], D[good], L[good]), n_boot, seed=seed)
                summary["chinchilla"] = d = chin.to_dict(level)
            except (FitError, ValueError) as exc:
                summary["chinchilla"] = dict(error=str(exc))
                summary["errors"].append(f"approach 3: {exc}")
            if chin is not None:
                try:  # an allocation needs alpha, beta > 0: an invalid fit keeps its numbers and warnings
                    budgets = np.geomspace(C.min(), C.max() * 100, 7)
                    d["compute_optimal"] = compute_optimal(chin, budgets, level=level).to_dict(orient="records")
                except (FitError, ValueError) as exc:
                    d["compute_optimal_error"] = str(exc)
                    summary["errors"].append(f"approach 3: {exc}")
        else:
            summary["chinchilla"] = dict(skipped=f"needs >= 3 distinct {params_col} and {data_col} values and >= 8 runs; "
                                                 f"got {nN}, {nD} and {int(good.sum())}")
    else:
        summary["chinchilla"] = dict(skipped=f"train table lacks {params_col!r} or {data_col!r}")

    summary["isoflop"] = _isoflop(fin, L, params_col)

    # every law's warnings in one list (each prefixed with its section), for a reader of the JSON
    for key in ("power_law", "extrapolation", "chinchilla", "isoflop"):
        for w in summary[key].get("warnings", []):
            summary["warnings"].append(f"{key}: {w}")

    # -- plots
    from analysis.plots import plot_loss_vs_flops, plot_optimal_allocation

    curves = None
    dd = df[["run_id", compute_col, loss_col]].dropna()
    dd = dd[(dd[compute_col] > 0) & (dd[loss_col] > 0)]
    if len(dd):
        curves = dd.rename(columns={"run_id": "run", compute_col: "C", loss_col: "L"})
    if len(C):
        size_col = next((c for c in (params_col, "width") if c in fin.columns and fin[c].notna().all()), None)
        marks, mark_name = _marker_series(fin)
        fig = plot_loss_vs_flops(C, L, fit=power, frontier=front, curves=curves,
                                 sizes=fin[size_col] if size_col else None, size_name=size_col or "size",
                                 labels=None if size_col else (fin["size"] if "size" in fin.columns else None),
                                 markers=marks, marker_name=mark_name, loss_name=f"validation loss ({loss_col})")
        fig.savefig(out / "loss_vs_flops.png", dpi=120)
        summary["plots"].append("loss_vs_flops.png")
    if chin is not None and "compute_optimal" in summary["chinchilla"]:
        fig = plot_optimal_allocation(pd.DataFrame(summary["chinchilla"]["compute_optimal"]),
                                      valid=summary["chinchilla"]["valid"])
        fig.savefig(out / "optimal_allocation.png", dpi=120)
        summary["plots"].append("optimal_allocation.png")

    if len(C):
        _size_plots(fin, C, L, out, summary, params_col=params_col, loss_col=loss_col)
    _finetune_and_benchmark(store_dir, out, summary)
    summary["bad_subject_files"] = bad_subject_files(store_dir)

    summary = _clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def bad_subject_files(store_dir) -> list[dict]:
    """The study's quarantine list (:mod:`data.quarantine`, ``<store>/quarantine/``): one dict per bad subject file
    (``path``, ``what``, ``found_by``, ``policy``), oldest first; empty when no file was found bad."""
    from data.quarantine import Quarantine

    return [dict(path=e.path, what=e.what, found_by=e.found_by, policy=e.policy)
            for e in Quarantine(store_dir).entries()]


def _isoflop(fin: pd.DataFrame, L: np.ndarray, params_col: str) -> dict:
    """Approach 2 on the runs of a FLOP-budget study (``budget_kind == "flops"``): per planned budget a
    parabola of loss in log N, then ``N_opt ~ C^a``. Budgets with fewer than 3 distinct sizes are left
    out (named in ``budgets_left_out``); runs off the study's most common data mixture (``cohorts``)
    are left out so a mixture ablation does not bend a profile."""
    # a study's store names the spec's fields ``spec.<field>``; hand-made tables often use the bare names
    bcol, kcol, ccol = (next((c for c in (f"spec.{f}", f) if c in fin.columns), None)
                        for f in ("budget", "budget_kind", "cohorts"))
    if bcol is None or kcol is None or params_col not in fin.columns:
        return dict(skipped=f"train table lacks 'spec.budget', 'spec.budget_kind' (or 'budget', 'budget_kind') "
                            f"or {params_col!r}")
    m = (fin[kcol] == "flops").to_numpy(dtype=bool, copy=True)
    if ccol is not None and m.any():
        mix = fin[ccol].astype(str)
        m &= (mix == mix[m].mode().iloc[0]).to_numpy()
    B = pd.to_numeric(fin[bcol], errors="coerce").to_numpy(float)
    N = pd.to_numeric(fin[params_col], errors="coerce").to_numpy(float)
    m &= np.isfinite(B) & (B > 0) & np.isfinite(N) & (N > 0)
    counts = {b: len(np.unique(N[m & (B == b)])) for b in np.unique(B[m])}
    keep = [b for b, k in counts.items() if k >= 3]
    left_out = [b for b, k in counts.items() if k < 3]
    if len(keep) < 3:
        return dict(skipped=f"needs >= 3 FLOP budgets with >= 3 distinct {params_col} each; got {len(keep)}")
    m &= np.isin(B, keep)
    try:
        d = fit_isoflop(B[m], N[m], L[m], variable=params_col).to_dict()
    except (FitError, ValueError) as exc:
        return dict(error=str(exc))
    d["budgets_left_out"] = left_out
    return d


#: the report's Figure-3 panels (the seed's NeuroMamba figure, drawn for every study): file -> what it shows
SIZE_PLOTS = {"loss_vs_compute_by_size.png": "final loss vs training FLOPs, one line per model size",
              "loss_vs_params_by_size.png": "final loss vs parameters, one colour per model size, budgets dashed"}


def _size_plots(fin: pd.DataFrame, C: np.ndarray, L: np.ndarray, out: Path, summary: dict, *, params_col: str,
                loss_col: str) -> None:
    """The seed's Figure 3 for any study: final loss against compute and against parameters, one colour per model
    size (:func:`analysis.plots.plot_loss_by_size`); against parameters the runs of one planned budget (``budget`` or
    ``spec.budget``) are joined. Skipped, with the reason in ``summary["size_plots"]``, without a parameter count."""
    from analysis.plots import plot_loss_by_size, size_labels

    N = pd.to_numeric(fin[params_col], errors="coerce").to_numpy(float) if params_col in fin.columns else None
    if N is None or not (np.isfinite(N) & (N > 0)).any():
        summary["size_plots"] = dict(skipped=f"train table has no usable {params_col!r} column")
        return
    labels = size_labels(N, fin["size"] if "size" in fin.columns else None,
                         fin["width"] if "width" in fin.columns else None)
    bcol = next((c for c in ("budget", "spec.budget") if c in fin.columns), None)
    kcol = next((c for c in ("budget_kind", "spec.budget_kind") if c in fin.columns), None)
    groups = None
    if bcol:
        b = pd.to_numeric(fin[bcol], errors="coerce")
        kind = fin[kcol].astype(str) if kcol else pd.Series([""] * len(fin))
        groups = [f"{v:.3g} {k}".strip() if np.isfinite(v) else "?" for v, k in zip(b, kind)]
    loss_name = f"final validation loss ({loss_col})"
    figs = {"loss_vs_compute_by_size.png": plot_loss_by_size(
                C, L, N, labels=labels, loss_name=loss_name, title="Loss vs compute, one line per model size"),
            "loss_vs_params_by_size.png": plot_loss_by_size(
                N, L, N, labels=labels, groups=groups, x_name=f"parameters N ({params_col})", loss_name=loss_name,
                title="Loss vs parameters, one colour per model size")}
    for fn, fig in figs.items():
        fig.savefig(out / fn, dpi=120)
        summary["plots"].append(fn)
    summary["size_plots"] = dict(sizes=int(len(np.unique(N[np.isfinite(N)]))), files=list(figs),
                                 grouped_by=bcol, what=dict(SIZE_PLOTS))


def _finetune_and_benchmark(store_dir, out: Path, summary: dict) -> None:
    """Radar plot of the fine-tuning table and strong-scaling tables of the benchmark table, when present."""
    from analysis.efficiency import scaling_table
    from analysis.plots import plot_radar, plot_scaling

    ft = read_table(store_dir, "finetune")
    if not ft.empty and {"metric", "value", "task"} <= set(ft.columns):
        metric = "auroc" if (ft["metric"] == "auroc").any() else str(ft["metric"].iloc[0])
        group = "size" if "size" in ft.columns else "pretrain_run_id"
        m = ft[ft["metric"] == metric].pivot_table(index=group, columns="task", values="value", aggfunc="mean")
        summary["finetune"] = dict(metric=metric, table={str(k): v for k, v in m.to_dict(orient="index").items()})
        if m.shape[1] >= 3:
            plot_radar(m, title=f"Downstream tasks ({metric})").savefig(out / "finetune_radar.png", dpi=120)
            summary["plots"].append("finetune_radar.png")
    bench = read_table(store_dir, "benchmark")
    if not bench.empty and {"name", "metric", "value", "device_count"} <= set(bench.columns):
        thr = bench[bench["metric"].astype(str).str.contains("throughput")]
        for name, g in thr.groupby("name"):
            g = g.groupby("device_count", as_index=False)["value"].mean()
            if len(g) < 2:
                continue
            t = scaling_table(g["device_count"], g["value"])
            summary.setdefault("scaling", {})[str(name)] = t.to_dict(orient="records")
            fn = f"scaling_{''.join(c if c.isalnum() else '_' for c in str(name))}.png"
            plot_scaling(t, unit_label="devices").savefig(out / fn, dpi=120)
            summary["plots"].append(fn)


def _marker_series(fin: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """What the loss-vs-FLOPs markers distinguish: the data mixture when runs differ in it, else nothing."""
    if "mixture" in fin.columns and fin["mixture"].nunique() > 1:
        def readable(m):
            try:
                pairs = json.loads(m) if isinstance(m, str) else m
            except ValueError:
                return str(m)
            return "all cohorts" if not pairs else "+".join(f"{c}" for c, _ in pairs)
        return fin["mixture"].map(readable), "data:"
    return None, ""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _markdown(s: dict) -> str:
    lines = ["# Study summary", "", f"Store: `{s['store']}`; {s['n_runs']} runs, {s['n_final_points']} final points "
             f"({s['n_dropped']} runs without a row with positive loss and compute).", ""]
    bad = s.get("bad_subject_files") or []
    if bad:
        lines += ["## Bad subject files (the study's quarantine list)", "",
                  f"{len(bad)} subject file(s) were found unusable; runs with bad_data='skip' skipped their windows "
                  "(store/quarantine/), runs with bad_data='stop' stopped at them.", "",
                  "| file | what is wrong | found by | policy |", "|---|---|---|---|"]
        lines += [f"| `{b['path']}` | {b['what']} | {b['found_by']} | {b['policy']} |" for b in bad]
        lines.append("")
    for key, title in (("power_law", FORMS["power"].title), ("chinchilla", FORMS["chinchilla"].title)):
        d = s.get(key, {})
        lines += [f"## {title}", ""]
        if "params" not in d:
            lines += [d.get("error") or d.get("skipped", "not fitted"), ""]
            continue
        lines += [*_verdict(d), f"| param | estimate | SE | {int(100 * s['level'])}% interval |", "|---|---|---|---|"]
        for k, v in d["params"].items():
            iv = d.get("intervals", {}).get(k, {})
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(iv.get('se'))} | [{_fmt(iv.get('lo'))}, {_fmt(iv.get('hi'))}] |")
        if key == "power_law":
            lines += ["", f"Exponent interval excludes zero: **{d['exponent_excludes_zero']}** "
                          f"({d['fitted_on']}, {d['frontier_points']} frontier points)."]
        if "compute_optimal_error" in d:
            lines += ["", f"No compute-optimal allocation: {d['compute_optimal_error']}"]
        lines.append("")
    d = s.get("isoflop", {})
    lines += ["## Approach 2 (IsoFLOP profiles): N_opt ~ C^a", ""]
    if "exponent" not in d:
        lines += [d.get("error") or d.get("skipped", "not fitted"), ""]
    else:
        lines += [*_verdict(d), f"a = {d['exponent']:.4g} (SE {_fmt(d['exponent_se'])}, interval "
                  f"[{_fmt(d['exponent_ci'][0])}, {_fmt(d['exponent_ci'][1])}]) over {len(d['vertices'])} budgets.", ""]
    e = s.get("extrapolation", {})
    lines += ["## Extrapolation", ""]
    if "error" in e:
        lines.append(e["error"])
    else:
        lines += [*_verdict(e),
                  f"Best run at the largest budget `{e['run_id']}` (C = {e['compute']:.3g}): predicted {e['predicted']:.4g}, "
                  f"actual {e['actual']:.4g}, relative error {100 * e['rel_error']:+.2f}% (fit on {e['n_fit']} points)."]
    lines += ["", *[f"![{p}]({p})" for p in s["plots"]], ""]
    return "\n".join(lines)


def _verdict(d: dict) -> list[str]:
    """Markdown lines saying whether a fit is a valid law, with its warnings."""
    if d.get("valid", True):
        return ["Valid law: **yes** (no warning).", ""]
    return ["Valid law: **NO**, not a law as fitted:", "", *[f"- {w}" for w in d.get("warnings", [])], ""]
