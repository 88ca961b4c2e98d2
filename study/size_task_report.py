"""Size versus task (the seed report's Table 3): per task, every model size's metric with a 95% interval, the FC
baseline row, the best size and a verdict on "bigger is better".

Input: rows of the fine-tuning study's ``finetune`` table (:mod:`study.finetune`: ``task, metric, value, strategy,
checkpoint, repeat`` and the per-metric columns), FC baseline rows (``strategy == "fc"``) and a map
``checkpoint label -> parameters of the pre-trained model``. :mod:`study.size_task` runs the study; this module only
aggregates, so it is tested on hand-made tables.

Statistics (all two-sided, level 0.95):

* a size's cell: mean over repeats with a Student-t interval (``n - 1`` degrees of freedom); NaN bounds for n < 2;
* **best size**: the best mean (AUROC: highest, MAE: lowest) among the sizes whose cell is not degenerate (a
  constant predictor, flagged as :func:`study.finetune.degenerate_reason` does), with its interval, and the paired
  difference to the runner-up (:func:`analysis.fc.paired_gain`, paired by repeat index = fine-tuning seed);
* **bigger is better**: the slope of the metric against log10(parameters), fitted by least squares within each
  repeat (the repeats share seeds across sizes, so each repeat is one paired series), then the mean slope over
  repeats with a t interval over repeats (a summary-statistic paired test; with 2 sizes it is the paired test of
  largest vs smallest, divided by the log-size gap). With one repeat, the slope of the per-size values with its
  OLS interval (``k - 2`` degrees of freedom, needs 3 sizes). Verdict: "bigger is better" when the interval lies
  on the improving side of 0 (AUROC up, MAE down), "bigger is worse" on the other side, else "no trend shown".
  The largest-vs-smallest paired difference and Spearman's rho of the size means are reported beside it
  (descriptive: with 3-4 sizes rho cannot be significant).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from analysis.fc import STRATEGY as FC_STRATEGY
from analysis.fc import below_chance, paired_gain
from study.finetune import METHOD_NAMES, _chance_by_task, degenerate_reason
from study.metrics import HIGHER_IS_BETTER, TASK_METRICS

LEVEL = 0.95


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of the finite ``values``: Student-t interval of the mean; NaN bounds when n < 2 (a
    zero spread gives ``lo == hi == mean``)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half, n


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def human_params(n: float) -> str:
    if not np.isfinite(n):
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def size_summary(df: pd.DataFrame, sizes: Mapping[str, float]) -> pd.DataFrame:
    """One row per (task, strategy, size) and one FC row per task: ``task, metric, strategy, method, checkpoint,
    n_params, mean, lo, hi, std, n, degenerate, below_chance, chance``, sorted by task, strategy, size (FC first).

    ``sizes`` maps a row's ``checkpoint`` label to the parameters of its pre-trained model; rows of other
    checkpoints (e.g. From scratch) are left out."""
    chance = _chance_by_task(df)
    rows = []
    for (task, strategy, checkpoint), g in df.groupby(["task", "strategy", "checkpoint"], sort=False):
        fc = strategy == FC_STRATEGY
        if not fc and checkpoint not in sizes:
            continue
        metric = str(g["metric"].iloc[0])
        mean, lo, hi, n = t_interval(g["value"])
        v = g["value"].astype("float64")
        ttype = str(g["task_type"].iloc[0]) if "task_type" in g else ""
        second = TASK_METRICS.get(ttype, (None, None))[1]
        sv = g[second].astype("float64") if second in g else pd.Series(dtype="float64")
        rows.append({"second_metric": second, "second_mean": float(sv.mean()) if sv.notna().any() else float("nan"),
                     "one_sided": bool(second == "bacc" and sv.notna().any() and (sv.dropna() == 0.5).all()),
                     "task": task, "metric": metric, "strategy": strategy,
                     "method": str(g["method"].iloc[0]) if fc else METHOD_NAMES.get(strategy, strategy),
                     "checkpoint": checkpoint, "n_params": float("nan") if fc else float(sizes[checkpoint]),
                     "mean": mean, "lo": lo, "hi": hi,
                     "std": float(v.std(ddof=1)) if v.notna().sum() > 1 else float("nan"), "n": n,
                     "degenerate": degenerate_reason(g),
                     "below_chance": bool(below_chance(metric, mean, chance.get(task))),
                     "chance": chance.get(task, float("nan"))})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_fc"] = out["strategy"] != FC_STRATEGY
    out = out.sort_values(["task", "_fc", "strategy", "n_params"], kind="stable").drop(columns="_fc")
    return out.reset_index(drop=True)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc ** 2).sum())


def size_trend(g: pd.DataFrame, sizes: Mapping[str, float], level: float = LEVEL) -> dict[str, Any]:
    """Slope of ``value`` against log10(parameters) of one (task, strategy)'s rows with its interval (see the
    module docstring): ``slope, lo, hi, p, n, how``."""
    from scipy import stats

    g = g.assign(logn=np.log10([float(sizes[c]) for c in g["checkpoint"]]))
    g = g[np.isfinite(g["value"].astype("float64"))]
    nan = {"slope": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan"), "n": 0, "how": ""}
    if g["logn"].nunique() < 2:
        return {**nan, "how": "fewer than 2 sizes"}
    per = []
    for _, r in g.groupby("repeat"):
        if r["logn"].nunique() >= 2:
            per.append(_slope(r["logn"].to_numpy(), r["value"].to_numpy(dtype=np.float64)))
    if len(per) >= 2:
        mean, lo, hi, n = t_interval(per, level)
        sd = float(np.std(per, ddof=1))
        p = (float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)) if sd > 0
             else (0.0 if mean != 0 else 1.0))
        return {"slope": mean, "lo": lo, "hi": hi, "p": p, "n": n,
                "how": f"per-repeat OLS slope, t interval over {n} repeats"}
    means = g.groupby("logn")["value"].mean()
    x, y = means.index.to_numpy(dtype=np.float64), means.to_numpy(dtype=np.float64)
    b = _slope(x, y)
    k = len(x)
    if k < 3:
        return {**nan, "slope": b, "n": k, "how": "one repeat and 2 sizes: no interval"}
    resid = y - (y.mean() + b * (x - x.mean()))
    se = math.sqrt((resid ** 2).sum() / (k - 2) / ((x - x.mean()) ** 2).sum())
    q = float(stats.t.ppf(0.5 + level / 2, k - 2))
    p = float(2 * stats.t.sf(abs(b) / se, k - 2)) if se > 0 else (0.0 if b != 0 else 1.0)
    return {"slope": b, "lo": b - q * se, "hi": b + q * se, "p": p, "n": k,
            "how": f"OLS over {k} size means (one repeat), t interval with {k - 2} dof"}


def size_verdicts(df: pd.DataFrame, summary: pd.DataFrame, sizes: Mapping[str, float]) -> pd.DataFrame:
    """One row per (task, strategy): the best size with its interval and its paired difference to the runner-up,
    the trend against log10(parameters) with the verdict, largest vs smallest, best vs the FC baseline."""
    from scipy import stats

    rows = []
    fc_all = df[df["strategy"] == FC_STRATEGY]
    for (task, strategy), s in summary[summary["strategy"] != FC_STRATEGY].groupby(["task", "strategy"], sort=False):
        metric = str(s["metric"].iloc[0])
        up = HIGHER_IS_BETTER[metric]
        rows_ts = df[(df["task"] == task) & (df["strategy"] == strategy) & df["checkpoint"].isin(list(sizes))]

        def vals(ck: str) -> np.ndarray:
            return rows_ts[rows_ts["checkpoint"] == ck].sort_values("repeat")["value"].to_numpy(dtype=np.float64)

        ok = s[~s["degenerate"].astype(bool) & s["mean"].notna()]
        ranked = ok.sort_values("mean", ascending=not up)
        r: dict[str, Any] = {"task": task, "metric": metric, "strategy": strategy,
                             "method": METHOD_NAMES.get(strategy, strategy), "n_sizes": int(len(s)),
                             "degenerate_sizes": [c for c, d in zip(s["checkpoint"], s["degenerate"]) if d]}
        if ranked.empty:
            r.update(best=None, best_n_params=float("nan"), best_mean=float("nan"), best_lo=float("nan"),
                     best_hi=float("nan"), note="every size degenerate")
        else:
            b = ranked.iloc[0]
            r.update(best=b["checkpoint"], best_n_params=b["n_params"], best_mean=b["mean"], best_lo=b["lo"],
                     best_hi=b["hi"], note="")
            if len(ranked) > 1:
                nxt = ranked.iloc[1]
                gn = paired_gain(vals(b["checkpoint"]), vals(nxt["checkpoint"]))
                r.update(runner_up=nxt["checkpoint"], **{f"vs_next_{k}": gn[k] for k in ("diff", "lo", "hi", "p")})
            fcv = fc_all[fc_all["task"] == task].sort_values("repeat")["value"].to_numpy(dtype=np.float64)
            if fcv.size:
                gf = paired_gain(vals(b["checkpoint"]), fcv)
                r.update({f"vs_fc_{k}": gf[k] for k in ("diff", "lo", "hi", "p")})
        tr = size_trend(rows_ts, sizes)
        r.update({f"slope_{k}" if k != "slope" else "slope": v for k, v in tr.items()})
        if np.isfinite(tr["lo"]):
            better = tr["lo"] > 0 if up else tr["hi"] < 0
            worse = tr["hi"] < 0 if up else tr["lo"] > 0
            r["verdict"] = "bigger is better" if better else "bigger is worse" if worse else "no trend shown"
        else:
            r["verdict"] = "no interval: " + (tr["how"] or "no data")
        by_size = s.sort_values("n_params")
        small, large = by_size.iloc[0]["checkpoint"], by_size.iloc[-1]["checkpoint"]
        if small != large:
            gl = paired_gain(vals(large), vals(small))
            r.update({f"large_vs_small_{k}": gl[k] for k in ("diff", "lo", "hi", "p")})
        if s["mean"].notna().sum() >= 2 and s["mean"].nunique() >= 2:
            rho = stats.spearmanr(s["n_params"], s["mean"], nan_policy="omit")
            r["spearman_rho"] = float(rho.statistic if hasattr(rho, "statistic") else rho[0])
        rows.append(r)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _g(r: Mapping[str, Any], k: str) -> float:
    v = r.get(k, float("nan"))
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan")


def _diff(r: Mapping[str, Any], prefix: str) -> str:
    d, lo, hi, p = (_g(r, f"{prefix}_{k}") for k in ("diff", "lo", "hi", "p"))
    if not np.isfinite(d):
        return "-"
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else ""
    return f"{d:+.3f}{ci}" + (f", p = {p:.3f}" if np.isfinite(p) else "")


def size_task_markdown(summary: pd.DataFrame, verdicts: pd.DataFrame,
                       title: str = "Size versus task (test split, per subject)") -> str:
    """Per task and strategy: a table of sizes (FC baseline first) with mean [95% CI], then the best size and the
    verdict; † marks degenerate cells, ‡ cells below chance."""
    if summary.empty:
        return f"# {title}\n\n(no results)\n"
    lines = [f"# {title}", "",
             "Mean over repeats [95% t interval]; † = degenerate (constant prediction), ‡ = below chance. "
             "Best size: best mean among non-degenerate sizes. Trend: slope of the metric per decade of "
             "parameters (per-repeat least squares, t interval over repeats; see docs/finetune.md).", ""]
    for (task, strategy), v in verdicts.groupby(["task", "strategy"], sort=False):
        r = v.iloc[0].to_dict()
        metric = r["metric"]
        arrow = "↑" if HIGHER_IS_BETTER[metric] else "↓"
        s = summary[(summary["task"] == task) & (summary["strategy"] == strategy)]
        fc = summary[(summary["task"] == task) & (summary["strategy"] == FC_STRATEGY)]
        second = (s["second_metric"].dropna().iloc[0] if "second_metric" in s and s["second_metric"].notna().any()
                  else "other metric")
        lines += [f"## {task} ({metric.upper()} {arrow}), {r['method']}", "",
                  "| Model | Parameters | " + f"{metric.upper()} mean [95% CI] | n | {second} mean |",
                  "|---|---|---|---|---|"]
        for _, c in pd.concat([fc, s]).iterrows():
            mark = (" †" if c["degenerate"] else "") + (" ‡" if c["below_chance"] else "")
            name = c["method"] if c["strategy"] == FC_STRATEGY else c["checkpoint"]
            cell = fmt_ci(c["mean"], c["lo"], c["hi"]) + mark
            if c["strategy"] != FC_STRATEGY and c["checkpoint"] == r.get("best"):
                cell = f"**{cell}**"
            sm = c.get("second_mean", float("nan"))
            other = (f"{sm:.3f}" + (" §" if c.get("one_sided") else "")) if np.isfinite(sm) else "-"
            lines.append(f"| {name} | {human_params(c['n_params'])} | {cell} | {int(c['n'])} | {other} |")
        ch = s["chance"].iloc[0] if len(s) else float("nan")
        if np.isfinite(ch):
            lines.append(f"\nChance: {metric.upper()} {ch:.3f}.")
        if "one_sided" in s and s["one_sided"].any():
            lines.append("§ bacc exactly 0.5 in every repeat: every test subject's probability on one side of 0.5 "
                         "(the scores may rank subjects; the threshold is uncalibrated).")
        lines.append("")
        if r.get("best") is None:
            lines.append(f"* Best size: none ({r.get('note')}).")
        else:
            nxt = (f"; vs runner-up {r['runner_up']}: {_diff(r, 'vs_next')}" if isinstance(r.get("runner_up"), str)
                   else "")
            lines.append(f"* Best size: **{r['best']}** ({human_params(r['best_n_params'])}), "
                         f"{fmt_ci(r['best_mean'], r['best_lo'], r['best_hi'])}{nxt}.")
            if np.isfinite(_g(r, "vs_fc_diff")):
                lines.append(f"* Best size vs FC baseline: {_diff(r, 'vs_fc')}.")
        sl = fmt_ci(_g(r, "slope"), _g(r, "slope_lo"), _g(r, "slope_hi"))
        p = _g(r, "slope_p")
        lines.append(f"* Bigger is better? **{r['verdict']}**: slope {sl} {metric.upper()} per decade of "
                     f"parameters" + (f", p = {p:.3f}" if np.isfinite(p) else "") + f" ({r.get('slope_how', '')}).")
        extra = [f"largest vs smallest {_diff(r, 'large_vs_small')}"]
        if np.isfinite(_g(r, "spearman_rho")):
            extra.append(f"Spearman rho of size means {_g(r, 'spearman_rho'):+.2f} (descriptive)")
        lines.append("* " + "; ".join(extra) + ".")
        if r["degenerate_sizes"]:
            lines.append(f"* † degenerate: {', '.join(r['degenerate_sizes'])} (excluded from the best size; kept in "
                         "the trend).")
        lines.append("")
    return "\n".join(lines)


def plot_size_task(summary: pd.DataFrame, path: Path) -> Path | None:
    """One panel per (task, strategy): mean with 95% interval against parameters (log x), the FC baseline as a
    horizontal band (its interval, or its mean as a line when the interval has no width), chance dashed;
    degenerate sizes as hollow markers."""
    s_all = summary[summary["strategy"] != FC_STRATEGY]
    if s_all.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(zip(s_all["task"], s_all["strategy"])))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, (task, strategy) in zip(axes[0], keys):
        s = s_all[(s_all["task"] == task) & (s_all["strategy"] == strategy)].sort_values("n_params")
        metric = str(s["metric"].iloc[0])
        err = np.vstack([s["mean"] - s["lo"], s["hi"] - s["mean"]])
        ax.errorbar(s["n_params"], s["mean"], yerr=np.where(np.isfinite(err), err, 0), color="#4c72b0", lw=1.5,
                    capsize=3, zorder=3, label=f"{METHOD_NAMES.get(strategy, strategy)} (95% CI)")
        deg = s["degenerate"].astype(bool).to_numpy()
        ax.scatter(s["n_params"][~deg], s["mean"][~deg], color="#4c72b0", zorder=4)
        if deg.any():
            ax.scatter(s["n_params"][deg], s["mean"][deg], facecolors="white", edgecolors="#4c72b0", zorder=4,
                       label="degenerate †")
        fc = summary[(summary["task"] == task) & (summary["strategy"] == FC_STRATEGY)]
        if len(fc):
            f = fc.iloc[0]
            wide = bool(np.isfinite(f["lo"]) and f["hi"] - f["lo"] > 1e-9 * max(1.0, abs(f["mean"])))
            if wide:
                ax.axhspan(f["lo"], f["hi"], color="#888888", alpha=0.35, label="FC baseline (95% CI)")
            ax.axhline(f["mean"], color="#555555", lw=1.2,
                       label=None if wide else "FC baseline (repeats agree: no interval)")
        ch = s["chance"].iloc[0]
        if np.isfinite(ch):
            ax.axhline(ch, ls="--", color="black", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(list(s["n_params"]), [human_params(n) for n in s["n_params"]], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("parameters of the pre-trained model")
        ax.set_ylabel(f"test {metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
        ax.set_title(f"{task}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def write_report(df: pd.DataFrame, sizes: Mapping[str, float], out_dir: Path) -> dict[str, Path]:
    """``size_task.md``, ``size_task.json`` (summary rows, verdicts, sizes) and ``size_task.png`` in ``out_dir``."""
    summary = size_summary(df, sizes)
    verdicts = size_verdicts(df, summary, sizes) if not summary.empty else pd.DataFrame()
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = out_dir / "size_task.md", out_dir / "size_task.json", out_dir / "size_task.png"
    md.write_text(size_task_markdown(summary, verdicts))
    js.write_text(json.dumps(_jsonable({"sizes": dict(sizes), "level": LEVEL,
                                        "summary": summary.to_dict("records"),
                                        "verdicts": verdicts.to_dict("records")}), indent=1))
    out = {"md": md, "json": js}
    if plot_size_task(summary, png) is not None:
        out["png"] = png
    return out


def intervals_markdown(df: pd.DataFrame, label_col: str = "checkpoint",
                       title: str = "Mean over repeats [95% t interval]") -> str:
    """Every (label, task) cell of a fine-tuning table (FC baseline rows first) as ``mean [95% CI]`` with n and the
    degenerate mark: the interval table of reports that rank checkpoints (the config search)."""
    if df.empty:
        return ""
    tasks = list(dict.fromkeys(df["task"]))
    metric_of = df.drop_duplicates("task").set_index("task")["metric"].to_dict()
    df = df.assign(_fc=df["strategy"] != FC_STRATEGY)
    lines = [f"{title}; † = degenerate (constant prediction):", "",
             "| Model | " + " | ".join(f"{t} ({metric_of[t].upper()} "
                                   f"{'↑' if HIGHER_IS_BETTER[metric_of[t]] else '↓'})" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for (_, label), g in df.sort_values("_fc", kind="stable").groupby(["_fc", label_col], sort=False):
        is_fc = (g["strategy"] == FC_STRATEGY).all()
        name = str(g["method"].iloc[0]) if is_fc else ("From scratch" if label == "scratch" else str(label))
        cells = []
        for t in tasks:
            gt = g[g["task"] == t]
            if gt.empty:
                cells.append("-")
                continue
            m, lo, hi, n = t_interval(gt["value"])
            cells.append(fmt_ci(m, lo, hi) + f" (n={n})" + (" †" if degenerate_reason(gt) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
