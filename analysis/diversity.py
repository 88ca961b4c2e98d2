"""The data-diversity comparison (the seed report's Figure 2; issue #27 item 5): one ladder trained on a single
cohort and on a mixture of cohorts, the report's law fitted per mixture, side by side.

Per data mixture (the train table's ``mixture`` column: the run's ``cohorts`` as JSON, ``[]`` for every cohort),
:func:`compare_mixtures` runs the study report itself (:func:`analysis.report.summarize_study`) on that mixture's
runs alone, so every number is the one the report gives a study of that mixture: the one-variable law
``L(C) = E + A C^-alpha`` on the compute frontier with bootstrap intervals, approach 3 (``alpha`` for N, ``beta`` for
D) when the mixture varied both size and data, the held-out extrapolation (fit on the runs below the largest budget,
predict the best run there: ``extrapolation.rel_error``) and every part's ``valid`` and ``warnings``
(:mod:`analysis.validity`). Nothing here fits anything.

A mixture's verdict ``valid`` is True when the law on the frontier and the extrapolation were computed and no part of
its report has a warning or an error (the same rules as the report's top-level ``warnings``). Exponents of two
mixtures are compared by their intervals: disjoint intervals tell them apart, overlapping ones do not.

Outputs of :func:`write_report` in ``out_dir``: ``diversity.json``, ``diversity.md`` (table), ``diversity.png``
(one panel per mixture) and ``<mixture>/`` with that mixture's full study report (summary.md, plots).
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.forms import get_form
from analysis.report import final_rows, summarize_study
from analysis.store import append_rows, read_table

__all__ = ["ALL", "mixture_label", "split_mixtures", "compare_mixtures", "diversity_table", "plot_diversity",
           "write_report", "report"]

ALL = "all"
"""Label of the natural mixture of every cohort (an empty ``cohorts``)."""

#: exponents reported per mixture: (report part, parameter) -> name in the table
EXPONENTS = {("power_law", "alpha"): "alpha_C", ("chinchilla", "alpha"): "alpha_N", ("chinchilla", "beta"): "beta_D"}


def mixture_label(value) -> str:
    """A readable name for a ``mixture`` cell: ``all`` (no cohort named), ``cohort_a`` (one cohort, or cohorts in
    equal shares joined by ``+``) or ``cohort_a:0.7+cohort_b:0.3``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ALL
    pairs = value
    if isinstance(value, str):
        try:
            pairs = json.loads(value)
        except ValueError:
            return value.strip() or ALL
    if isinstance(pairs, dict):
        pairs = list(pairs.items())
    pairs = [(str(c), float(w)) for c, w in (pairs or [])]
    if not pairs:
        return ALL
    if len({w for _, w in pairs}) == 1:
        return "+".join(c for c, _ in pairs)
    return "+".join(f"{c}:{w:g}" for c, w in pairs)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._-") or "mixture"


def split_mixtures(df: pd.DataFrame, mixture_col: str = "mixture") -> dict[str, pd.DataFrame]:
    """The train table's rows per data mixture (every row of a run, not only the final one), single cohorts first
    and ``all`` last. A table without ``mixture_col`` is one mixture, ``all``."""
    if df.empty:
        return {}
    labels = df[mixture_col].map(mixture_label) if mixture_col in df.columns else pd.Series(ALL, index=df.index)
    names = sorted(labels.unique(), key=lambda s: (s == ALL, s))
    return {n: df[labels == n].reset_index(drop=True) for n in names}


def _interval(part: dict, name: str) -> dict:
    iv = part.get("intervals", {}).get(name, {})
    return dict(estimate=part["params"][name], lo=iv.get("lo"), hi=iv.get("hi"), se=iv.get("se"),
                valid=bool(part.get("valid", False)))


def _entry(label: str, s: dict) -> dict:
    """One mixture's result from its study summary (``summarize_study``'s dict)."""
    exps = {}
    for (key, param), name in EXPONENTS.items():
        part = s.get(key, {})
        if "params" in part and param in part["params"]:
            exps[name] = _interval(part, param)
    ex = s.get("extrapolation", {})
    warnings = list(s.get("warnings", []))
    for e in s.get("errors", []):
        if not any(e.split(": ", 1)[-1] in w for w in warnings):
            warnings.append(e)
    pl = s.get("power_law", {})
    if "params" not in pl:
        warnings.append(f"power_law: not fitted ({pl.get('error', 'no result')})")
    if "rel_error" not in ex:
        warnings.append(f"extrapolation: not computed ({ex.get('error', 'no result')})")
    ch = s.get("chinchilla", {})
    return dict(mixture=label, n_runs=s.get("n_runs"), n_final_points=s.get("n_final_points"),
                valid=not warnings, warnings=warnings, exponents=exps,
                law=dict(params=pl.get("params"), valid=pl.get("valid"), fitted_on=pl.get("fitted_on"),
                         frontier_points=pl.get("frontier_points")) if "params" in pl else dict(error=pl.get("error")),
                chinchilla={k: ch[k] for k in ("valid", "warnings") if k in ch} if "params" in ch
                else dict(skipped=ch.get("skipped") or ch.get("error")),
                extrapolation={k: ex.get(k) for k in ("run_id", "compute", "predicted", "actual", "rel_error", "n_fit",
                                                       "valid", "warnings")} if "rel_error" in ex
                else dict(error=ex.get("error")))


def _points(rows: pd.DataFrame, loss_col: str, compute_col: str) -> pd.DataFrame:
    """Final (compute, loss) of every run, as the report takes them (last row with positive loss and compute)."""
    lv = pd.to_numeric(rows[loss_col], errors="coerce") if loss_col in rows else pd.Series(np.nan, index=rows.index)
    cv = pd.to_numeric(rows[compute_col], errors="coerce") if compute_col in rows else lv * np.nan
    ok = (np.isfinite(lv) & (lv > 0) & np.isfinite(cv) & (cv > 0)).to_numpy()
    fin = final_rows(rows[ok].reset_index(drop=True)) if ok.any() else rows.iloc[:0]
    return pd.DataFrame(dict(C=pd.to_numeric(fin[compute_col]).to_numpy(float) if len(fin) else [],
                             L=pd.to_numeric(fin[loss_col]).to_numpy(float) if len(fin) else []))


def compare_mixtures(df: pd.DataFrame, out_dir=None, *, loss_col: str = "val_loss", compute_col: str = "flops",
                     mixture_col: str = "mixture", n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     source: str = "") -> dict:
    """Per data mixture of the train table ``df``: the study report of its runs alone, reduced to the comparison.

    Parameters
    ----------
    df : pandas.DataFrame
        A study's ``train`` table (``read_table(store, "train")``): every evaluation row of every run.
    out_dir : str or Path, optional
        Where each mixture's full study report goes (``<out_dir>/<mixture>/summary.md``, plots); default: a
        temporary folder, removed afterwards.
    loss_col, compute_col : str
        Loss and compute columns, as in :func:`analysis.report.summarize_study` (``val_loss`` is every cohort's
        validation windows; ``val_loss__<cohort>`` is one cohort's).
    n_boot, seed, level : int, int, float
        Bootstrap replicates, their seed and the interval level of every fit.
    source : str
        What the table is (a store path), for the output.

    Returns
    -------
    dict
        ``mixtures``: one dict per mixture (``mixture, n_runs, n_final_points, valid, warnings, exponents``
        (``alpha_C``, and ``alpha_N``, ``beta_D`` when approach 3 was fitted; each ``estimate, lo, hi, se, valid``),
        ``law`` (the L(C) parameters), ``chinchilla``, ``extrapolation`` (``rel_error``, ``predicted``, ``actual``,
        ``compute``, ``valid``, ``warnings``, or ``error``), ``report`` (its folder when ``out_dir`` was given));
        ``comparison``: per exponent fitted for two or more mixtures, whether their intervals overlap and whether
        every one of those fits is a valid law (``comparable``; ``not_valid`` names the others);
        ``points``: per mixture the final ``C, L`` of its runs (for the plot); ``loss_col``, ``level``, ``n_boot``.

    Raises
    ------
    ValueError
        If the table is empty or lacks the loss or compute column, or holds fewer than two mixtures.
    """
    if df.empty:
        raise ValueError(f"{source or 'train table'}: no rows")
    for c in (loss_col, compute_col):
        if c not in df.columns:
            raise ValueError(f"{source or 'train table'}: no {c!r} column; columns are {list(df.columns)}")
    groups = split_mixtures(df, mixture_col)
    if len(groups) < 2:
        raise ValueError(f"{source or 'train table'}: the runs use {len(groups)} data mixture(s) "
                         f"({', '.join(groups) or 'none'}); a diversity comparison needs two or more")
    out: dict = dict(source=source, loss_col=loss_col, compute_col=compute_col, level=level, n_boot=n_boot,
                     seed=seed, mixtures=[], points={})
    with tempfile.TemporaryDirectory(prefix="neurox-diversity-") as tmp:
        for label, rows in groups.items():
            store = Path(tmp) / _slug(label) / "store"
            append_rows(store, "train", rows)
            rep = Path(out_dir) / _slug(label) if out_dir is not None else Path(tmp) / _slug(label) / "report"
            s = summarize_study(store, rep, loss_col=loss_col, compute_col=compute_col, n_boot=n_boot, seed=seed,
                                level=level)
            entry = _entry(label, s)
            if out_dir is not None:
                _name_source(rep, str(store), f"{source or 'train table'} [mixture {label}]")
                entry["report"] = str(rep)
            out["mixtures"].append(entry)
            out["points"][label] = _points(rows, loss_col, compute_col).to_dict(orient="list")
    out["comparison"] = _comparison(out["mixtures"], level)
    return out


def _name_source(rep: Path, tmp_store: str, name: str) -> None:
    """The mixture's report names the study's store and the mixture, not the temporary store it was read from."""
    for f in ("summary.json", "summary.md"):
        p = rep / f
        if p.exists():
            p.write_text(p.read_text().replace(json.dumps(tmp_store)[1:-1], name).replace(tmp_store, name))


def _comparison(entries: list[dict], level: float) -> list[dict]:
    out = []
    for name in EXPONENTS.values():
        have = [(e["mixture"], e["exponents"][name]) for e in entries if name in e["exponents"]]
        have = [(m, x) for m, x in have if x["lo"] is not None and x["hi"] is not None]
        if len(have) < 2:
            continue
        lo = max(x["lo"] for _, x in have)
        hi = min(x["hi"] for _, x in have)
        out.append(dict(exponent=name, mixtures=[m for m, _ in have], overlap=bool(lo <= hi),
                        comparable=all(x["valid"] for _, x in have),
                        not_valid=[m for m, x in have if not x["valid"]],
                        estimates={m: x["estimate"] for m, x in have}, level=level))
    return out


def _iv(x: dict | None) -> str:
    if not x:
        return "-"
    if x.get("lo") is None:
        return f"{x['estimate']:.3g}"
    return f"{x['estimate']:.3g} [{x['lo']:.3g}, {x['hi']:.3g}]"


def diversity_table(result: dict) -> pd.DataFrame:
    """One row per mixture: runs, verdict, each exponent with its interval (text) and the held-out error."""
    rows = []
    for e in result["mixtures"]:
        ex = e["extrapolation"]
        rows.append({"mixture": e["mixture"], "runs": e["n_final_points"], "valid": e["valid"],
                     **{k: _iv(e["exponents"].get(k)) for k in EXPONENTS.values()},
                     "held-out rel. error": "-" if ex.get("rel_error") is None else f"{100 * ex['rel_error']:+.2f}%",
                     "warnings": len(e["warnings"])})
    return pd.DataFrame(rows)


def markdown(result: dict) -> str:
    """The comparison as Markdown: the table, what the intervals say, every mixture's warnings."""
    pct = int(round(100 * result["level"]))
    lines = ["# Data diversity: one ladder per data mixture", "",
             f"Source: `{result['source']}`; loss `{result['loss_col']}`; {pct}% bootstrap intervals "
             f"({result['n_boot']} replicates). alpha_C: `L(C) = E + A C^-alpha` on the compute frontier; alpha_N, "
             "beta_D: approach 3 (when the mixture varied both size and data); held-out: the best run at the largest "
             "budget predicted by the law fitted on the smaller budgets.", "",
             diversity_table(result).to_markdown(index=False), ""]
    for c in result["comparison"]:
        if not c["comparable"]:
            bad = c["not_valid"]
            verdict = (f"are not compared: the fit{'s' if len(bad) > 1 else ''} of {' and '.join(bad)} "
                       f"{'are not valid laws' if len(bad) > 1 else 'is not a valid law'} (warnings below); the "
                       "intervals are shown, not tested against each other")
        elif c["overlap"]:
            verdict = "overlap: the data do not tell these mixtures' exponents apart"
        else:
            verdict = "are disjoint: the exponents differ"
        lines.append(f"- {c['exponent']}: the {pct}% intervals of {', '.join(c['mixtures'])} {verdict}.")
    lines.append("")
    for e in result["mixtures"]:
        lines += [f"## {e['mixture']}: " + ("valid (no warning)" if e["valid"] else "NOT VALID"), ""]
        lines += [f"- {w}" for w in e["warnings"]] or ["No warning."]
        if e.get("report"):
            lines += ["", f"Full report of this mixture: `{e['report']}/summary.md`"]
        lines.append("")
    return "\n".join(lines)


def plot_diversity(result: dict, *, extend: float = 3.0) -> Figure:
    """One panel per mixture, shared axes: each run's final loss against compute, the compute frontier, the law
    fitted on it (dashed and labelled "not a valid law" when that law is not valid, as in :mod:`analysis.plots`) and
    the held-out prediction of the largest budget's best run against what it reached."""
    from analysis.fits import pareto_frontier
    from analysis.plots import _law_style

    entries = result["mixtures"]
    fig = Figure(figsize=(4.6 * len(entries) + 0.6, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(entries), sharex=True, sharey=True))
    power = get_form("power")
    for i, (ax, e) in enumerate(zip(axes, entries)):
        pts = result["points"].get(e["mixture"], {"C": [], "L": []})
        C, L = np.asarray(pts["C"], float), np.asarray(pts["L"], float)
        ax.scatter(C, L, s=22, color=f"C{i}", zorder=3, label="runs (final loss)")
        if len(C):
            f = pareto_frontier(C, L)
            ax.plot(C[f], L[f], "o", mfc="none", mec="k", ms=9, zorder=4, label="compute frontier")
        law = e["law"]
        if law.get("params") and len(C):
            xs = np.geomspace(C.min(), C.max() * extend, 200)
            a = e["exponents"].get("alpha_C", {})
            text = power.label(law["params"]) + (f"\nalpha = {_iv(a)}" if a.get("lo") is not None else "")
            ax.plot(xs, power.predict(law["params"], xs), color="r", zorder=5, **_law_style(bool(law["valid"]), text))
        ex = e["extrapolation"]
        if ex.get("rel_error") is not None:
            ax.plot([ex["compute"]], [ex["predicted"]], "x", color="k", ms=9, mew=2, zorder=6,
                    label=f"held-out prediction ({100 * ex['rel_error']:+.1f}% vs actual)")
        verdict = "valid" if e["valid"] else f"NOT VALID ({len(e['warnings'])} warning(s))"
        ax.set_title(f"{e['mixture']} ({e['n_final_points']} runs): {verdict}", fontsize=9)
        ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("training compute C (FLOPs)")
        ax.legend(fontsize=6.5, loc="upper right")
    axes[0].set_ylabel(f"validation loss ({result['loss_col']})")
    return fig


def write_report(result: dict, out_dir) -> dict:
    """``diversity.json``, ``diversity.md`` and ``diversity.png`` in ``out_dir``; returns the file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = dict(json=out / "diversity.json", markdown=out / "diversity.md", plot=out / "diversity.png")
    files["json"].write_text(json.dumps(result, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    files["markdown"].write_text(markdown(result))
    plot_diversity(result).savefig(files["plot"], dpi=120)
    return {k: str(v) for k, v in files.items()}


def report(store_dir, out_dir, *, loss_col: str = "val_loss", n_boot: int = 1000, seed: int = 0,
           level: float = 0.95) -> dict:
    """Read a study's results store, compare its mixtures and write the report (:func:`write_report`) with each
    mixture's own study report beside it; returns the result with ``files``."""
    df = read_table(store_dir, "train")
    if df.empty:
        raise ValueError(f"results store {store_dir}: the 'train' table is empty or missing")
    result = compare_mixtures(df, out_dir, loss_col=loss_col, n_boot=n_boot, seed=seed, level=level,
                              source=str(store_dir))
    result["files"] = write_report(result, out_dir)
    return result
